"""Loading recordings and demographics, checksums and the download."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from ml import data as D

ROW = "0.0000\t199.1\t87.34\t91.08\t24.09\t21.12\t87.67\t87.23\t64.57\t163.9\t79.86\t112.42\t50.82\t13.75\t102.74\t144.98\t79.53\t662.2\t748"


def _recording_text(n: int = 5) -> bytes:
    lines = []
    for i in range(n):
        cells = ROW.split("\t")
        cells[0] = f"{i / 100:.4f}"
        lines.append("\t".join(cells))
    return ("\r\n".join(lines) + "\r\n").encode()


def test_parse_recording_name() -> None:
    r = D.parse_recording_name("GaCo01_02.txt.gz")
    assert (r.id, r.subject, r.study, r.group, r.label, r.walk) == (
        "GaCo01_02", "GaCo01", "Ga", "Co", 0, 2,
    )  # fmt: skip
    p = D.parse_recording_name("JuPt23_10.txt")
    assert p.label == 1 and p.walk == 10 and p.dual_task
    for bad in ("demographics.txt", "XxCo01_01.txt", "GaCo1_01.txt", "GaCo01-01.txt"):
        with pytest.raises(D.DataError):
            D.parse_recording_name(bad)


def test_load_txt_and_txt_gz_give_the_same_array(tmp_path: Path) -> None:
    text = _recording_text(7)
    (tmp_path / "GaCo01_01.txt").write_bytes(text)
    (tmp_path / "GaCo01_02.txt.gz").write_bytes(gzip.compress(text))
    a = D.load_recording(tmp_path / "GaCo01_01.txt")
    b = D.load_recording(tmp_path / "GaCo01_02.txt.gz")
    assert a.shape == (7, 19) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert a[3, 0] == pytest.approx(0.03) and a[0, 18] == 748.0


def test_load_recording_rejects_malformed_files(tmp_path: Path) -> None:
    short = tmp_path / "GaCo01_01.txt"
    short.write_text("0.0\t1\t2\r\n")
    with pytest.raises(D.DataError, match="19 columns"):
        D.load_recording(short)
    bad = tmp_path / "GaCo01_02.txt"
    bad.write_text(ROW.replace("199.1", "abc") + "\r\n")
    with pytest.raises(D.DataError):
        D.load_recording(bad)


def test_list_recordings_prefers_txt_and_ignores_other_files(tmp_path: Path) -> None:
    text = _recording_text()
    (tmp_path / "GaCo01_01.txt").write_bytes(text)
    (tmp_path / "GaCo01_01.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "SiPt02_01.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "format.txt").write_text("not a recording")
    (tmp_path / "demographics.txt").write_text("ID\n")
    df = D.list_recordings(tmp_path)
    assert list(df["id"]) == ["GaCo01_01", "SiPt02_01"]
    assert df.loc[0, "path"].endswith("GaCo01_01.txt")
    assert list(df["label"]) == [0, 1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D.DataError, match="no gaitpdb recordings"):
        D.list_recordings(empty)


def test_data_dir_needs_the_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    with pytest.raises(D.DataError, match="GAITPDB_DIR"):
        D.data_dir()
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    assert D.data_dir() == tmp_path
    with pytest.raises(D.DataError, match="does not exist"):
        D.data_dir(tmp_path / "missing")


DEMOGRAPHICS = (
    "ID\tStudy\tGroup\tSubjnum\tGender\tAge\tHeight\tWeight\tHoehnYahr\tUPDRS\t\t\t\r\n"
    "GaPt03\tGa\t1\t3\t2\t82\t1.45\t50\t3.0\t20\t\t\r\n"
    "GaCo01\tGa\t2\t1\t1\t66\tNaN\t83\tNaN\tNaN\t\r\n"
    "Juc010\tJu\t2\t10\t2\t62\t167\t78\tNaN\t0\t\t\t\t\t\t\t\t\r\n"
    "SiPt02\tSi\t1\t2\t1\t70\t1.70\t\t2.5\t31\r\n"
    "\t\t\t\t\r\n"
)


def test_demographics_quirks(tmp_path: Path) -> None:
    (tmp_path / "demographics.txt").write_text(DEMOGRAPHICS, newline="")
    for rid in ("GaPt03_01", "GaCo01_01", "SiPt02_01"):
        (tmp_path / f"{rid}.txt").write_bytes(_recording_text())
    df = D.load_demographics(tmp_path / "demographics.txt")
    assert list(df.index) == ["GaCo01", "GaPt03", "JuCo10", "SiPt02"]
    assert df.loc["JuCo10", "ID"] == "Juc010"  # the original id is kept
    assert not df.loc["JuCo10", "has_recordings"]
    assert df.loc["GaPt03", "has_recordings"]
    assert np.isnan(df.loc["GaCo01", "Height"]) and np.isnan(df.loc["SiPt02", "Weight"])
    assert df.loc["GaPt03", "UPDRS"] == 20
    assert dict(df["label"]) == {"GaCo01": 0, "GaPt03": 1, "JuCo10": 0, "SiPt02": 1}
    assert not any(str(c).startswith("Unnamed") or c == "" for c in df.columns)


def test_demographics_reject_data_beyond_the_header(tmp_path: Path) -> None:
    (tmp_path / "demographics.txt").write_text("ID\tAge\r\nGaPt03\t82\t99\r\n")
    with pytest.raises(D.DataError, match="fields"):
        D.load_demographics(tmp_path / "demographics.txt", recordings=None)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_checksums_parse_and_verify(tmp_path: Path) -> None:
    files = {"GaCo01_01.txt": _recording_text(), "demographics.txt": b"ID\r\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sums_text = "".join(f"{_sha(d)}  {n}\n" for n, d in files.items())
    sums = D.parse_checksums(sums_text + "\n# comment\n")
    assert sums == {n: _sha(d) for n, d in files.items()}
    (tmp_path / "SHA256SUMS").write_text(sums_text)
    assert D.verify_checksums(tmp_path) == sorted(files)
    (tmp_path / "GaCo01_01.txt").write_bytes(b"tampered")
    (tmp_path / "demographics.txt").unlink()
    with pytest.raises(D.ChecksumError) as exc:
        D.verify_checksums(tmp_path)
    assert "GaCo01_01.txt: sha256" in str(exc.value) and "demographics.txt: missing" in str(exc.value)
    with pytest.raises(D.DataError, match="malformed"):
        D.parse_checksums("nothex  file.txt\n")


class FakePhysioNet:
    """Serves a file set like https://physionet.org/files/gaitpdb/1.0.0/."""

    def __init__(self, files: dict[str, bytes], sums_name: str = "SHA256SUMS.txt") -> None:
        self.files = dict(files)
        self.files[sums_name] = "".join(f"{_sha(d)}  {n}\n" for n, d in files.items()).encode()
        self.requests: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.requests.append(url)
        name = url.rsplit("/", 1)[1]
        if name not in self.files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)  # type: ignore[arg-type]
        return self.files[name]


def test_download_verifies_every_file(tmp_path: Path) -> None:
    files = {"GaCo01_01.txt": _recording_text(), "JuPt02_03.txt": _recording_text(3),
             "demographics.txt": b"ID\r\n"}  # fmt: skip
    fake = FakePhysioNet(files)
    progress: list[tuple[int, int, str]] = []
    got = D.download(tmp_path, base_url="https://example.org/gaitpdb/1.0.0", fetch=fake,
                     progress=lambda i, n, name: progress.append((i, n, name)))  # fmt: skip
    assert got == sorted(files)
    assert fake.requests[0] == "https://example.org/gaitpdb/1.0.0/SHA256SUMS.txt"
    assert [p[0] for p in progress] == [1, 2, 3] and {p[1] for p in progress} == {3}
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
    assert D.verify_checksums(tmp_path) == sorted(files)
    assert D.list_recordings(tmp_path)["id"].tolist() == ["GaCo01_01", "JuPt02_03"]
    # a second run skips files that are already there and correct
    fake.requests.clear()
    D.download(tmp_path, base_url="https://example.org/gaitpdb/1.0.0", fetch=fake, progress=None)
    assert fake.requests == ["https://example.org/gaitpdb/1.0.0/SHA256SUMS.txt"]


def test_download_falls_back_to_sha256sums_without_txt(tmp_path: Path) -> None:
    fake = FakePhysioNet({"GaCo01_01.txt": _recording_text()}, sums_name="SHA256SUMS")
    assert D.download(tmp_path, fetch=fake, progress=None) == ["GaCo01_01.txt"]


def test_download_rejects_a_corrupted_file(tmp_path: Path) -> None:
    fake = FakePhysioNet({"GaCo01_01.txt": _recording_text()})
    fake.files["GaCo01_01.txt"] = b"corrupted in transit"
    with pytest.raises(D.ChecksumError, match="GaCo01_01.txt: downloaded sha256"):
        D.download(tmp_path, fetch=fake, progress=None)
    assert not (tmp_path / "GaCo01_01.txt").exists()
    assert not list(tmp_path.glob("*.part"))


def test_download_offline_error_is_clear(tmp_path: Path) -> None:
    def offline(url: str) -> bytes:
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    with pytest.raises(D.DownloadError) as exc:
        D.download(tmp_path, fetch=offline, progress=None)
    msg = str(exc.value)
    assert "cannot reach https://physionet.org/files/gaitpdb/1.0.0/" in msg
    assert "offline" in msg and "GAITPDB_DIR" in msg


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def gaitpdb() -> Path:
    path = os.environ.get(D.ENV_VAR)
    if not path:
        pytest.fail(f"{D.ENV_VAR} is not set: point it at the gaitpdb copy (see ml/data.py)")
    return Path(path)


def test_real_dataset_listing_and_a_recording(gaitpdb: Path) -> None:
    df = D.list_recordings(gaitpdb)
    assert len(df) == 244 and df["subject"].nunique() == 131
    assert set(df["study"]) == {"Ga", "Ju", "Si"}
    x = D.load_recording(df["path"].iloc[0])
    assert x.shape[1] == 19 and x.shape[0] > 1000
    np.testing.assert_allclose(x[:, 17], x[:, 1:9].sum(axis=1), atol=0.05)
    demo = D.load_demographics(gaitpdb)
    assert not demo.loc["JuCo10", "has_recordings"]
    assert set(df["subject"]) <= set(demo.index)


def test_real_dataset_checksums(gaitpdb: Path) -> None:
    sums = D.parse_checksums((gaitpdb / "SHA256SUMS").read_text())
    names = sorted(sums)[:3] + ["demographics.txt"]
    assert D.verify_checksums(gaitpdb, sums, names=names) == names
