"""Loading the gaitpdb dataset: recordings, demographics, labels, download.

A local copy lives in the directory named by the ``GAITPDB_DIR`` environment
variable (or passed explicitly). Recordings are PhysioNet's ``.txt`` files (CRLF
line endings, tab separated, 19 columns at 100 Hz), optionally gzip-compressed
(``.txt.gz``). File names encode study, group, subject and walk::

    GaCo01_02.txt.gz  ->  study "Ga", group "Co" (control), subject "GaCo01", walk 2

``Co`` is a control (label 0) and ``Pt`` a Parkinson's patient (label 1). Walk 10
in the ``Ga`` study is a dual-task walk (serial-7 subtraction while walking).

Only the standard library, numpy and pandas are imported here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "CHANNELS",
    "COLUMNS",
    "ENV_VAR",
    "GROUPS",
    "PHYSIONET_URL",
    "STUDIES",
    "ChecksumError",
    "DataError",
    "DownloadError",
    "RecordingInfo",
    "data_dir",
    "download",
    "list_recordings",
    "load_demographics",
    "load_recording",
    "parse_checksums",
    "parse_recording_name",
    "read_recording_bytes",
    "verify_checksums",
]

ENV_VAR = "GAITPDB_DIR"
PHYSIONET_URL = "https://physionet.org/files/gaitpdb/1.0.0/"
#: The 19 columns of a recording, in file order.
COLUMNS: tuple[str, ...] = (
    "time",
    *(f"L{i}" for i in range(1, 9)),
    *(f"R{i}" for i in range(1, 9)),
    "L",
    "R",
)
#: The 18 force channels (everything but time).
CHANNELS: tuple[str, ...] = COLUMNS[1:]
STUDIES = ("Ga", "Ju", "Si")
GROUPS = {"Co": 0, "Pt": 1}

_NAME_RE = re.compile(r"^(?P<study>Ga|Ju|Si)(?P<group>Co|Pt)(?P<num>\d{2})_(?P<walk>\d{2})$")


class DataError(ValueError):
    """A file of the dataset is missing or malformed."""


class ChecksumError(DataError):
    """A file's SHA-256 does not match the published checksum."""


class DownloadError(OSError):
    """The download could not be completed (offline, HTTP error, ...)."""


@dataclass(frozen=True, slots=True)
class RecordingInfo:
    """What a recording's file name says about it."""

    id: str  # "GaCo01_02"
    subject: str  # "GaCo01"
    study: str  # "Ga" | "Ju" | "Si"
    group: str  # "Co" | "Pt"
    label: int  # 0 control, 1 parkinson
    walk: int  # 1..7, 10 (dual task)
    path: Path | None = None

    @property
    def dual_task(self) -> bool:
        return self.walk == 10


def parse_recording_name(name: str, path: Path | None = None) -> RecordingInfo:
    """Parse ``GaCo01_02``, ``GaCo01_02.txt`` or ``GaCo01_02.txt.gz``."""
    stem = Path(name).name
    for suffix in (".gz", ".txt"):
        stem = stem.removesuffix(suffix)
    m = _NAME_RE.match(stem)
    if m is None:
        raise DataError(f"not a gaitpdb recording name: {name!r} (expected e.g. GaCo01_02.txt)")
    return RecordingInfo(
        id=stem,
        subject=f"{m['study']}{m['group']}{m['num']}",
        study=m["study"],
        group=m["group"],
        label=GROUPS[m["group"]],
        walk=int(m["walk"]),
        path=path,
    )


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The dataset directory: ``path`` if given, else ``$GAITPDB_DIR``."""
    if path is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            raise DataError(
                f"no dataset directory: pass one explicitly or set {ENV_VAR} "
                "to a local copy of gaitpdb (see ml.data.download)"
            )
        path = env
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"dataset directory {str(p)!r} does not exist")
    return p


def list_recordings(directory: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """One row per recording file in ``directory`` (sorted by id).

    Columns: id, subject, study, group, label, walk, dual_task, path. When both
    ``X.txt`` and ``X.txt.gz`` exist, the uncompressed file wins.
    """
    d = data_dir(directory)
    found: dict[str, RecordingInfo] = {}
    for p in sorted(d.iterdir()):
        if not (p.name.endswith(".txt") or p.name.endswith(".txt.gz")):
            continue
        try:
            info = parse_recording_name(p.name, p)
        except DataError:
            continue  # demographics.txt, format.txt, ...
        if info.id not in found or p.name.endswith(".txt"):
            found[info.id] = info
    if not found:
        raise DataError(f"no gaitpdb recordings (*.txt, *.txt.gz) in {str(d)!r}")
    rows = [
        {
            "id": r.id,
            "subject": r.subject,
            "study": r.study,
            "group": r.group,
            "label": r.label,
            "walk": r.walk,
            "dual_task": r.dual_task,
            "path": str(r.path),
        }
        for r in sorted(found.values(), key=lambda r: r.id)
    ]
    return pd.DataFrame(rows)


def read_recording_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's text bytes, transparently gunzipping ``.gz`` files."""
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
        raw = gzip.decompress(raw)
    return raw


def load_recording(path: str | os.PathLike[str]) -> np.ndarray:
    """A recording as a float64 array of shape (n, 19), columns :data:`COLUMNS`.

    Accepts ``.txt`` and ``.txt.gz``, CRLF or LF line endings, tabs or spaces.
    """
    raw = read_recording_bytes(path)
    try:
        frame = pd.read_csv(
            io.BytesIO(raw), sep=r"\s+", header=None, dtype=np.float64, engine="c"
        )
        arr = frame.to_numpy(dtype=np.float64)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot parse recording: {exc}") from exc
    if arr.shape[0] == 0 or arr.shape[1] != len(COLUMNS):
        raise DataError(f"{path}: expected {len(COLUMNS)} columns, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: recording contains NaN or infinite values")
    return arr


def load_demographics(
    path: str | os.PathLike[str] | None = None, *, recordings: pd.DataFrame | None = None
) -> pd.DataFrame:
    """``demographics.txt`` as a DataFrame indexed by normalised subject id.

    Tolerates PhysioNet's quirks: ``NaN`` strings, trailing empty columns, CRLF,
    and ids that do not follow the file naming (``Juc010`` for ``JuCo10``). The
    ``subject`` index is normalised to the file-name form (``JuCo10``); the
    original id is kept in ``ID``. Column ``has_recordings`` says whether any
    recording exists for the subject (when ``recordings`` is given, else from the
    files beside ``demographics.txt``).
    """
    if path is None:
        path = data_dir() / "demographics.txt"
    p = Path(path)
    if p.is_dir():
        p = p / "demographics.txt"
    text = read_recording_bytes(p).decode("utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{p}: empty demographics file")
    # Rows carry a varying number of trailing tabs (empty columns): cut every row
    # to the named header columns, pad short rows with missing values.
    header = [h.strip() for h in lines[0].split("\t")]
    while header and not header[-1]:
        header.pop()
    rows = []
    for lineno, ln in enumerate(lines[1:], 2):
        cells = [c.strip() for c in ln.split("\t")]
        extra = cells[len(header) :]
        if any(extra):
            raise DataError(f"{p}:{lineno}: {len(cells)} fields, header has {len(header)}")
        cells = cells[: len(header)] + [""] * max(0, len(header) - len(cells))
        rows.append(cells)
    df = pd.DataFrame(rows, columns=header).replace({"": np.nan, "NaN": np.nan, "nan": np.nan})
    for col in df.columns:
        if col != "ID" and col != "Study":
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.dropna(how="all")
    df["ID"] = df["ID"].astype(str).str.strip()
    df["subject"] = df["ID"].map(_normalise_subject)
    df = df.dropna(subset=["subject"]).drop_duplicates("subject").set_index("subject")
    df["group_name"] = df.index.str[2:4]
    df["label"] = df["group_name"].map(GROUPS).astype("int64")
    df["study"] = df.index.str[:2]
    if recordings is None:
        try:
            recordings = list_recordings(p.parent)
        except DataError:
            recordings = pd.DataFrame({"subject": []})
    df["has_recordings"] = df.index.isin(set(recordings["subject"]))
    return df.sort_index()


def _normalise_subject(raw: str) -> str | None:
    """``GaPt03`` -> ``GaPt03``; ``Juc010`` / ``JuCo010`` -> ``JuCo10``; else None."""
    m = re.match(r"^(Ga|Ju|Si)(co|pt|c|p)0*(\d+)$", raw.strip(), flags=re.IGNORECASE)
    if m is None:
        return None
    study = m[1][0].upper() + m[1][1].lower()
    group = "Co" if m[2].lower().startswith("c") else "Pt"
    return f"{study}{group}{int(m[3]):02d}"


# ----------------------------------------------------------------------------- checksums


def parse_checksums(text: str) -> dict[str, str]:
    """Parse ``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>``)."""
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            raise DataError(f"SHA256SUMS line {lineno} is malformed: {line!r}")
        sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(
    directory: str | os.PathLike[str],
    sums: dict[str, str] | None = None,
    *,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Check files in ``directory`` against ``sums`` (default: its ``SHA256SUMS``).

    Returns the verified names. Raises :class:`ChecksumError` naming every file
    that is missing or whose digest differs.
    """
    d = Path(directory)
    if sums is None:
        sums = parse_checksums((d / "SHA256SUMS").read_text())
    todo = list(names) if names is not None else sorted(sums)
    problems: list[str] = []
    for name in todo:
        expected = sums.get(name)
        f = d / name
        if expected is None:
            problems.append(f"{name}: no published checksum")
        elif not f.is_file():
            problems.append(f"{name}: missing")
        else:
            got = _sha256_file(f)
            if got != expected:
                problems.append(f"{name}: sha256 {got} != expected {expected}")
    if problems:
        raise ChecksumError("checksum verification failed:\n  " + "\n  ".join(problems))
    return todo


# ----------------------------------------------------------------------------- download

Fetcher = Callable[[str], bytes]


def _http_get(url: str, timeout: float = 30.0) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "gaitflow/0.1"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _default_progress(done: int, total: int, name: str) -> None:
    """One line redrawn on a terminal; in a log (no terminal), a line every 25 files."""
    if sys.stderr.isatty():
        print(f"\r[{done}/{total}] {name:<24}", end="" if done < total else "\n", file=sys.stderr)
    elif done % 25 == 0 or done == total:
        print(f"[{done}/{total}] {name}", file=sys.stderr)


def download(
    dest: str | os.PathLike[str],
    *,
    base_url: str = PHYSIONET_URL,
    fetch: Fetcher | None = None,
    progress: Callable[[int, int, str], None] | None = _default_progress,
    recordings_only: bool = False,
) -> list[str]:
    """Download gaitpdb into ``dest`` and verify every file against ``SHA256SUMS``.

    Fetches ``SHA256SUMS`` first, then every file it lists (skipping files already
    present with the right digest), writes each file atomically only after its
    digest matched, and returns the names verified. ``fetch(url) -> bytes`` can be
    replaced (tests use a local fake). Raises :class:`DownloadError` when the
    server cannot be reached, :class:`ChecksumError` on a digest mismatch.
    """
    fetch = fetch or _http_get
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"

    def get(name: str) -> bytes:
        url = base + name
        try:
            return fetch(url)
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"GET {url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise DownloadError(
                f"cannot reach {base} ({exc}); this machine may be offline. Download the "
                f"files elsewhere and point {ENV_VAR} at the directory instead."
            ) from exc

    sums = parse_checksums(_get_checksums(get).decode("utf-8"))
    names = sorted(sums)
    if recordings_only:
        names = [n for n in names if _NAME_RE.match(n.split(".")[0]) or n == "demographics.txt"]
    done: list[str] = []
    for i, name in enumerate(names, 1):
        target = out / name
        if not (target.is_file() and _sha256_file(target) == sums[name]):
            data = get(name)
            digest = hashlib.sha256(data).hexdigest()
            if digest != sums[name]:
                raise ChecksumError(
                    f"{name}: downloaded sha256 {digest} != published {sums[name]}"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(data)
            tmp.replace(target)
        done.append(name)
        if progress is not None:
            progress(i, len(names), name)
    (out / "SHA256SUMS").write_text("".join(f"{sums[n]}  {n}\n" for n in names))
    return done


#: PhysioNet publishes ``SHA256SUMS.txt``; a mirror (or this repo's copy) may use ``SHA256SUMS``.
CHECKSUM_FILES = ("SHA256SUMS.txt", "SHA256SUMS")


def _get_checksums(get: Callable[[str], bytes]) -> bytes:
    last: DownloadError | None = None
    for name in CHECKSUM_FILES:
        try:
            return get(name)
        except DownloadError as exc:
            if "HTTP 404" not in str(exc):
                raise
            last = exc
    raise DownloadError(f"no checksum file ({', '.join(CHECKSUM_FILES)}) on the server: {last}")


def iter_recordings(
    directory: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[RecordingInfo, np.ndarray]]:
    """Yield ``(info, array)`` for every recording in the directory."""
    for row in list_recordings(directory).itertuples(index=False):
        info = parse_recording_name(row.id, Path(row.path))
        yield info, load_recording(row.path)


def main(argv: list[str] | None = None) -> int:
    """``python -m ml.data download DEST`` | ``verify DIR``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ml.data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download gaitpdb from PhysioNet and verify it")
    d.add_argument("dest")
    d.add_argument("--url", default=PHYSIONET_URL)
    v = sub.add_parser("verify", help="verify a local copy against its SHA256SUMS")
    v.add_argument("dir", nargs="?")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "download":
            names = download(args.dest, base_url=args.url)
            print(f"downloaded and verified {len(names)} files into {args.dest}")
        else:
            names = verify_checksums(data_dir(args.dir))
            print(f"verified {len(names)} files")
    except (DataError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
