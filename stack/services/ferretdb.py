"""FerretDB 1.24: a MongoDB wire-protocol server on SQLite, built from its Go module.

The binary is built into ``<state>/bin``; Go's module and build caches stay in
their default places (``go env GOMODCACHE``/``GOCACHE``), so a re-install after
``rm -rf .stack`` recompiles from cache in seconds and needs no network.
Telemetry is disabled, and so is the debug HTTP listener, so the server opens
exactly one port on loopback and makes no outbound calls.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TypeVar

from ..service import Service, probe_ready, run_async

MODULE = "github.com/FerretDB/FerretDB"
# The newest 1.24 patch release. (FerretDB 2.x is the module .../FerretDB/v2 and
# needs PostgreSQL with DocumentDB: it has no SQLite backend.)
VERSION = "v1.24.2"

T = TypeVar("T")


class FerretDB(Service):
    name = "ferretdb"

    @property
    def binary(self) -> Path:
        return self.state / "bin" / "ferretdb"

    @property
    def version_stamp(self) -> Path:
        return self.state / "bin" / "VERSION"

    def is_installed(self) -> bool:
        return (self.binary.exists() and self.version_stamp.exists()
                and self.version_stamp.read_text().strip() == VERSION)

    def install(self) -> None:
        if self.is_installed():
            print(f"ferretdb: {VERSION} already built at {self.binary}")
            return
        go = shutil.which("go")
        if go is None:
            raise RuntimeError("ferretdb: the Go toolchain (`go`) is needed to build FerretDB")
        env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local"}
        t0 = time.monotonic()
        print(f"ferretdb: go mod download {MODULE}@{VERSION}", flush=True)
        out = subprocess.run([go, "mod", "download", "-json", f"{MODULE}@{VERSION}"],
                             env=env, capture_output=True, text=True, cwd=self.state, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"ferretdb: go mod download failed:\n{out.stdout}{out.stderr}")
        module_dir = Path(json.loads(out.stdout)["Dir"])
        # `go install ...@version` builds a binary that panics at start: FerretDB
        # embeds build/version/version.txt, which only its own release tooling
        # writes (the module zip lacks it). So build from a writable copy of the
        # module source with that file added.
        src = self.state / "src" / f"FerretDB-{VERSION}"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(module_dir, src)
        for d in [src, *(p for p in src.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        for f in (p for p in src.rglob("*") if p.is_file()):
            f.chmod(0o644)
        (src / "build" / "version" / "version.txt").write_text(VERSION + "\n")
        (src / "build" / "version" / "package.txt").write_text("gaitflow-stack\n")
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        print("ferretdb: go build ./cmd/ferretdb (the first build compiles ~600 packages: "
              "minutes on 2 cores; cached afterwards)", flush=True)
        # -v lists each package as it is compiled: that is the progress report.
        proc = subprocess.Popen(
            [go, "build", "-v", "-trimpath", "-buildvcs=false", "-o", str(self.binary),
             "./cmd/ferretdb"],
            env=env, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for n, raw in enumerate(proc.stdout, 1):
            line = raw.rstrip()
            tail = (tail + [line])[-30:]
            if n % 50 == 0:
                print(f"ferretdb:   [{time.monotonic() - t0:4.0f}s] {n} packages ({line})",
                      flush=True)
        if proc.wait() != 0:
            raise RuntimeError("ferretdb: go build failed:\n" + "\n".join(tail))
        check = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True,
                               check=False)
        if check.returncode != 0:
            raise RuntimeError(f"ferretdb: the built binary does not run:\n{check.stderr}")
        self.version_stamp.write_text(VERSION + "\n")
        print(f"ferretdb: built {self.binary} in {time.monotonic() - t0:.0f}s", flush=True)

    def address(self) -> str:
        return f"mongodb://127.0.0.1:{self.opts['port']}/"

    def start(self) -> None:
        data = self.state / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.spawn([
            str(self.binary),
            "--handler=sqlite",
            f"--sqlite-url=file:{data}/",
            f"--listen-addr=127.0.0.1:{self.opts['port']}",
            "--listen-unix=",
            "--debug-addr=-",
            f"--state-dir={self.state}",
            "--telemetry=disable",
            "--log-level=INFO",
            "--mode=normal",
        ], env={"FERRETDB_TELEMETRY": "disable", "DO_NOT_TRACK": "1"})

    def ready(self) -> bool:
        return probe_ready(int(self.opts["port"]),
                           lambda: run_async(self._roundtrip, timeout=5.0))

    async def _roundtrip(self) -> bool:
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient = AsyncMongoClient(
            self.address(), serverSelectionTimeoutMS=2000, connectTimeoutMS=2000,
            directConnection=True)
        try:
            coll = client["stack_health"]["ping"]
            await coll.replace_one({"_id": "ready"}, {"_id": "ready", "t": time.time()},
                                   upsert=True)
            doc = await coll.find_one({"_id": "ready"})
            return doc is not None
        finally:
            await client.close()
