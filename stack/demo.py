"""`make demo`: the whole pipeline on the local stack, from recordings to diagnoses.

    python -m stack.demo [--settings settings.toml] [--once] [--limit N] [--speed 0]

Steps (the stack is already up: ``make demo`` runs ``python -m stack up`` first):

1. the dataset: ``$GAITPDB_DIR``, or a copy downloaded from PhysioNet and
   verified into ``.stack/data/gaitpdb`` when the variable is unset;
2. the model: reuses ``artifacts/model`` when it exists, trains it otherwise;
3. starts the model server and the pipeline (``run.py``), waits until ready;
4. replays the recordings over MQTT as insole devices;
5. waits until every recording has a diagnosis written by this run in MongoDB
   (on a stack that kept an earlier run's data, the recordings are diagnosed
   again and their documents replaced; the earlier ones are not counted), then
   prints the summary: recordings, diagnoses, the recording-level confusion
   matrix against the true labels, timings and the dashboard's URL;
6. keeps running until Ctrl-C (``--once``: stops after the summary).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import RuntimeSettings

from .config import ROOT
from .progress import ProgressLine

PY = sys.executable


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def dataset(args: argparse.Namespace) -> Path:
    env = os.environ.get("GAITPDB_DIR")
    if env:
        return Path(env)
    dest = ROOT / ".stack" / "data" / "gaitpdb"
    if not (dest / "SHA256SUMS").exists() and not (dest / "SHA256SUMS.txt").exists():
        step(f"GAITPDB_DIR is unset: downloading gaitpdb from PhysioNet into {dest}")
        from ml.data import download
        download(dest)
    return dest


def ensure_model(data: Path, model_dir: Path) -> None:
    from ml.artifact import LATEST_FILE

    if (model_dir / LATEST_FILE).exists():
        version = (model_dir / LATEST_FILE).read_text().strip()
        print(f"reusing the trained model {version} in {model_dir}")
        return
    step(f"training the model on {data} (subject-wise cross-validation)")
    subprocess.run([PY, "-m", "ml.train", "--data", str(data), "--out", str(model_dir)],
                   check=True, cwd=ROOT)


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = log.open("ab")
    return subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


async def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path,
                    timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-20:]
                raise SystemExit(f"error: {' '.join(proc.args)} exited with {proc.returncode}:\n"
                                 + "\n".join(tail))
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise SystemExit(f"error: {url} not ready after {timeout:.0f} s (log: {log})")


async def earlier_diagnoses(mongo_url: str, db: str, coll: str, expected: set[str]) -> int:
    """How many of ``expected`` already have a diagnosis (from an earlier run)."""
    from pymongo import AsyncMongoClient

    client = AsyncMongoClient(mongo_url)
    try:
        return await client[db][coll].count_documents({"_id": {"$in": sorted(expected)}})
    finally:
        await client.close()


async def wait_diagnoses(mongo_url: str, db: str, coll: str, expected: set[str],
                         timeout: float, since: datetime) -> dict[str, dict]:
    """Wait until every recording of ``expected`` has a diagnosis written at or after
    ``since`` (this run's: an earlier run's documents are replaced, not counted)."""
    from pymongo import AsyncMongoClient

    since = since.replace(microsecond=since.microsecond // 1000 * 1000)  # BSON dates: ms
    client = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        t0 = time.monotonic()
        deadline = t0 + timeout
        found: dict[str, dict] = {}
        line = ProgressLine(sys.stdout)
        query = {"_id": {"$in": sorted(expected)}, "diagnosed_at": {"$gte": since}}

        def text() -> str:
            return (f"diagnoses written: {len(found)}/{len(expected)} "
                    f"({time.monotonic() - t0:.0f} s)")

        while time.monotonic() < deadline:
            docs = await client[db][coll].find(query).to_list()
            found = {d["_id"]: d for d in docs}
            if len(found) >= len(expected):
                break
            line.update(text())
            await asyncio.sleep(1.0)
        line.update(text(), final=True)
        return found
    finally:
        await client.close()


def confusion(found: dict[str, dict]) -> str:
    cells = {(t, p): 0 for t in ("control", "parkinson") for p in ("control", "parkinson")}
    for rec, doc in found.items():
        truth = "parkinson" if rec[2:4] == "Pt" else "control"
        cells[(truth, doc["label"])] += 1
    tp, tn = cells[("parkinson", "parkinson")], cells[("control", "control")]
    fn, fp = cells[("parkinson", "control")], cells[("control", "parkinson")]
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    bal = (sens + spec) / 2 if sens is not None and spec is not None else None

    def fmt(v: float | None, why: str) -> str:
        return f"{v:.3f}" if v is not None else f"– ({why})"

    return (f"                    predicted control  predicted parkinson\n"
            f"  true control      {tn:>17}  {fp:>19}\n"
            f"  true parkinson    {fn:>17}  {tp:>19}\n"
            f"  sensitivity {fmt(sens, 'no parkinson recording')}  "
            f"specificity {fmt(spec, 'no control recording')}  "
            f"balanced accuracy {fmt(bal, 'needs both')}")


def honest_figures(model_dir: Path, versions: list[str]) -> str:
    """The matrix above scores recordings the model was trained on: point at its
    subject-wise cross-validation instead."""
    lines = ["  (in-sample: these recordings trained the model)"]
    for version in versions:
        try:
            card = json.loads((model_dir / version / "model.json").read_text())
            overall = next(m for m in card["evaluation"]["metrics"]
                           if m["slice"] == "overall")
        except (OSError, ValueError, KeyError, StopIteration):
            continue
        lines.append(
            f"  subject-wise cross-validation of {version}: AUC {overall['auc']:.3f}, balanced "
            f"accuracy {overall['balanced_accuracy']:.3f} "
            f"(model card: {model_dir / version / 'MODEL_CARD.md'})")
        repeats = card["evaluation"].get("repeats") or []
        if len(repeats) > 1:
            auc = sum(r["auc"] for r in repeats) / len(repeats)
            bacc = sum(r["balanced_accuracy"] for r in repeats) / len(repeats)
            lines.append(f"  over {len(repeats)} fold assignments: AUC {auc:.3f}, balanced "
                         f"accuracy {bacc:.3f} (mean)")
        lines.extend(window_subset(card))
    return "\n".join(lines)


def window_subset(card: dict) -> list[str]:
    """The pipeline sends feature windows: when some of the model's members read the
    raw series instead, the diagnoses above come from the other members only; say
    so, with their figures on the same folds (``evaluation.window_subset``)."""
    members, window = card.get("members") or [], card.get("window_members")
    if window is None or window == members:
        return []
    if not window:
        return ["  this model scores raw rows only: the pipeline's feature windows are refused"]
    row = card["evaluation"].get("window_subset") or {}
    text = (f"  the pipeline sends feature windows, which the model scores with "
            f"{' + '.join(window)} only ({', '.join(m for m in members if m not in window)} "
            f"read the raw series)")
    if not row.get("candidate"):
        return [text]
    figures = (f"  those members on the same folds ({row['candidate']}): AUC {row['auc']:.3f}, "
               f"balanced accuracy {row['balanced_accuracy']:.3f} (mean over fold assignments)")
    return [text, figures]


def handler_setting(doc: dict, type_name: str, key: str, default: object) -> object:
    for section in doc.get("handlers", {}).values():
        if section.get("type") == type_name:
            return section.get(key, default)
    return default


async def main_async(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    settings = Path(args.settings)
    doc = tomllib.loads(settings.read_text())
    admin_port = doc.get("runtime", {}).get("admin_port", 8080)
    logs = ROOT / ".stack" / "demo"

    data = dataset(args)
    from ml.data import list_recordings
    table = list_recordings(data)
    if args.limit:
        table = table.head(args.limit)
    expected = set(table["id"])

    t = time.monotonic()
    model_dir = Path(args.model)
    ensure_model(data, model_dir)
    timings["model"] = time.monotonic() - t

    mongo_url = str(handler_setting(doc, "mongo_sink", "url", "mongodb://127.0.0.1:27017"))
    db = str(handler_setting(doc, "mongo_sink", "database", "gaitflow"))
    coll = str(handler_setting(doc, "mongo_sink", "collection", "diagnoses"))
    earlier = await earlier_diagnoses(mongo_url, db, coll, expected)
    started = datetime.now(UTC)

    step("starting the model server and the pipeline")
    t = time.monotonic()
    server = spawn([PY, "-m", "ml.serve", "--model", str(model_dir), "--host", "127.0.0.1",
                    "--port", str(args.model_port)], logs / "model-server.log")
    procs = [("model server", server)]
    try:
        await wait_http(f"http://127.0.0.1:{args.model_port}/healthz", server,
                        logs / "model-server.log")
        pipeline = spawn([PY, "run.py", "--settings", str(settings)], logs / "pipeline.log")
        procs.append(("pipeline", pipeline))
        await wait_http(f"http://127.0.0.1:{admin_port}/readyz", pipeline, logs / "pipeline.log")
        timings["start"] = time.monotonic() - t
        print(f"model server :{args.model_port}, pipeline admin :{admin_port} (logs in {logs})")

        step(f"replaying {len(expected)} recordings over MQTT")
        t = time.monotonic()
        replay = [PY, "-m", "stack.replay", "--data", str(data), "--speed", str(args.speed),
                  "--recordings", ",".join(sorted(expected))]
        rc = await (await asyncio.create_subprocess_exec(*replay, cwd=ROOT)).wait()
        if rc != 0:
            raise SystemExit(f"error: the replay exited with {rc}")
        timings["replay"] = time.monotonic() - t

        step("waiting for every recording's diagnosis")
        if earlier:
            print(f"{earlier} of these recordings have a diagnosis from an earlier run; "
                  "this run's replaces it (only this run's are counted)")
        t = time.monotonic()
        found = await wait_diagnoses(mongo_url, db, coll, expected, timeout=args.timeout,
                                     since=started)
        timings["diagnose"] = time.monotonic() - t
        timings["total"] = time.monotonic() - t0

        step("summary")
        rows = sum(int(d.get("n_windows", 0)) for d in found.values())
        print(f"recordings replayed     {len(expected)}")
        print(f"diagnoses in MongoDB    {len(found)} written by this run  (windows scored: {rows})")
        missing = sorted(expected - set(found))
        if missing:
            print(f"MISSING diagnoses       {', '.join(missing[:10])}"
                  f"{' ...' if len(missing) > 10 else ''}")
        versions = sorted({str(d.get("model_version")) for d in found.values()})
        print(f"model version(s)        {', '.join(versions)}")
        print("recording-level confusion matrix (true labels from the file names):")
        print(confusion(found))
        print(honest_figures(model_dir, versions))
        print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        print(f"dashboard               http://127.0.0.1:{admin_port}/")
        if missing:
            return 1
        if args.once:
            return 0
        print("\nthe pipeline keeps running; Ctrl-C stops it")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        # the pipeline drains in-flight work for up to drain_timeout, then closes
        # its handlers: give it that and a margin before killing it
        runtime = doc.get("runtime", {})
        grace = float(runtime.get("drain_timeout", RuntimeSettings.drain_timeout)) + 30.0
        for name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    print(f"\nthe {name} did not stop within {grace:.0f} s: killed", flush=True)
                    p.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default=str(ROOT / "settings.toml"))
    ap.add_argument("--model", default=str(ROOT / "artifacts" / "model"))
    ap.add_argument("--model-port", type=int, default=8090)
    ap.add_argument("--limit", type=int, help="replay only the first N recordings")
    ap.add_argument("--speed", type=float, default=0.0, help="replay speed (0 = as fast as possible)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for diagnoses")
    ap.add_argument("--once", action="store_true", help="stop after the summary")
    return asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
