"""Browser tests of the dashboard pages in headless Chromium (Debian's ``chromium``).

Each test starts a real runtime with its admin server on a free port and the
dashboard extensions, drives Chromium over the DevTools protocol (``cdp_browser``),
checks the rendered DOM (after the pages' scripts ran), types and clicks like a
user, and saves a full-page screenshot checked for content (not blank: pixel
spread and colours, overall and inside the graph or plot). Screenshots go to
``$GAITFLOW_SCREENSHOTS`` (default ``artifacts/e2e/``).

The diagnoses and recording pages run against the real Elasticsearch (a unique
test index) and the real HDFS lake (a unique test root), both deleted afterwards.
Needs ``python -m stack install`` (chromium) and ``python -m stack up
elasticsearch hdfs``; fails with a clear message otherwise.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from elasticsearch import AsyncElasticsearch
from yarl import URL

from handlers.es_sink import DEFAULT_MAPPINGS
from handlers.webhdfs import WebHdfs
from pipeline import Runtime
from stack import services
from stack.config import load as load_stack_config
from stack.tools import chromium_path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cdp_browser import Browser

pytestmark = pytest.mark.e2e
ROOT = HERE.parent.parent
SHOTS = Path(os.environ.get("GAITFLOW_SCREENSHOTS") or ROOT / "artifacts" / "e2e")
TOKEN = "e2e-dashboard-token"
RUN = uuid.uuid4().hex[:10]


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.fail("chromium is not installed: run `python -m stack install` (it installs "
                    "Debian's chromium) or set CHROMIUM=/path/to/chromium", pytrace=False)
    return path


def _service(name: str) -> Any:
    svc = services.get(name)(load_stack_config())
    for port in svc.ports():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=3).close()
        except OSError as exc:
            pytest.fail(f"{name} is not listening on 127.0.0.1:{port} ({exc}); start it with "
                        f"`python -m stack up {name}`", pytrace=False)
    return svc


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with Browser(chromium, width=1280, height=900) as b:
        yield b


def pipeline_doc(tmp_path: Path, *, extensions: list[str], token: str | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    runtime: dict[str, Any] = {"admin_port": 0, "admin_extensions": extensions,
                               "drain_timeout": 5.0, "log_level": "warning"}
    if token:
        runtime["admin_token"] = token
    return {
        "runtime": runtime,
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "sensors": {"type": "memory_source", "forever": True, "interval": 0.02,
                        "batch_size": 50, "outputs": ["relay"]},
            "relay": {"type": "passthrough", "outputs": ["store"]},
            "store": {"type": "memory_sink", "capacity": 8},
            "dlq": {"type": "file_dead_letter", "path": str(tmp_path / "dead.jsonl")},
            **(extra or {}),
        },
    }


# -- screenshot checks ---------------------------------------------------------------------
def image_spread(png: bytes, box: dict[str, float] | None = None) -> tuple[float, int]:
    """``(grey-level standard deviation, distinct colours)`` of the image or a box of it."""
    from PIL import Image, ImageStat

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if box is not None:
        img = img.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                        int(box["y"] + box["height"])))
    stddev = ImageStat.Stat(img.convert("L")).stddev[0]
    return stddev, len(img.getcolors(maxcolors=1 << 22) or ())


async def shoot(page: Browser, name: str, regions: dict[str, str]) -> Path:
    """Save a full-page screenshot; assert it, and each region (a CSS selector), has content."""
    path = SHOTS / f"{name}.png"
    png = await page.screenshot(path)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, f"{path}: {len(png)} bytes"
    spread, colours = image_spread(png)
    assert spread > 15 and colours > 200, f"{path} looks blank: spread {spread}, {colours} colours"
    for label, selector in regions.items():
        spread, colours = image_spread(png, await page.page_box(selector))
        assert spread > 8 and colours > 20, (f"{path}: the {label} ({selector}) looks empty: "
                                            f"spread {spread}, {colours} colours")
    print(f"screenshot: {path}")
    return path


# -- the pipeline page ---------------------------------------------------------------------------
PROGRESS_PLUGIN = textwrap.dedent('''
    """A processor reporting job-like progress, as spark_job does."""
    from pipeline import Processor

    class Progress(Processor):
        async def start(self):
            self.done = self.metrics.gauge("e2e_tasks_done", "tasks done")
            self.total = self.metrics.gauge("e2e_tasks_total", "tasks known")
            self.total.set(40)
            self.batches = 0

        async def process(self, batch):
            self.batches += 1
            self.done.set(min(40, self.batches // 2))
            return batch.data

        def status(self):
            return {"stage": "windows", "batches": self.batches}
''')


async def test_pipeline_page_live_graph_rates_and_login(browser: Browser, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"e2e_progress_{RUN}.py").write_text(PROGRESS_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = pipeline_doc(tmp_path, extensions=["pipeline.dashboard:setup"], token=TOKEN, extra={
        # rows without the "value" column: Threshold rejects them -> dead letters
        "bad": {"type": "memory_source", "rows": [{"seq": i} for i in range(3)],
                "batch_size": 1, "forever": True, "interval": 0.2, "start": 100,
                "outputs": ["clean"]},
        "clean": {"type": "pipeline.examples.threshold:Threshold", "outputs": ["store"]},
        "job": {"type": f"e2e_progress_{RUN}:Progress", "outputs": ["store"]},
    })
    doc["handlers"]["relay"]["outputs"] = ["job"]
    async with Runtime.from_dict(doc) as rt:
        url = rt.admin_url
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/dashboard/") as resp:
                assert resp.status == 200  # the shell is public...
                assert "Content-Security-Policy" in resp.headers
            async with http.get(f"{url}/dashboard/api/state") as resp:
                assert resp.status == 401  # ...its data is not
        await browser.goto(f"{url}/")
        assert (await browser.eval("location.pathname")) == "/dashboard/"
        await browser.wait_for("!document.getElementById('login').hidden")
        assert await browser.count("g.node") == 0
        await browser.type("#login input", TOKEN)
        await browser.click("#login button")
        await browser.wait_for("document.body.dataset.loaded === 'true'")
        # rates need two polls; wait for the source's rate to show
        await browser.wait_for(r"/^(?!0\/s)[0-9.]+( [kMGT])?\/s$/.test(document.querySelector("
                               "'#handlers tr[data-handler=sensors] td[data-col=rate-out]').textContent)",
                               timeout=20)
        await browser.wait_for("document.querySelector('#extras .progress') !== null", timeout=20)
        await browser.wait_for("/^[1-9]/.test(document.querySelector("
                               "'#handlers tr[data-handler=clean] td[data-col=dead-letters]').textContent)")
        await browser.click("#handlers tr[data-handler=relay]")
        await browser.wait_for("!document.getElementById('details-panel').hidden")
        await asyncio.sleep(1.6)  # one more poll: every number settled
        shot = await shoot(browser, "pipeline", {"graph": "#graph svg", "table": "#handlers"})

        names = list(rt.handlers)
        svg_names = await browser.eval(
            "[...document.querySelectorAll('#graph svg g.node')].map(g => g.dataset.handler)")
        assert sorted(svg_names) == sorted(names)
        assert await browser.count("#graph svg path.edge:not(.dl)") == 5  # data channels
        assert await browser.count("#graph svg path.edge.dl") >= 5        # dead-letter routes
        graph_text = await browser.text("#graph svg")
        for name in names:
            assert name in graph_text
        # channel depth / capacity of every consumer, in the graph and the table
        depths = re.findall(r"(\d+)/(\d+)", graph_text)
        assert ("8" in {c for _, c in depths}) and ("16" in {c for _, c in depths}), depths
        table = await browser.text("#handlers tbody")
        assert re.search(r"\d+ / 8", table) and re.search(r"\d+ / 16", table), table
        row = await browser.eval("Object.fromEntries([...document.querySelectorAll("
                                 "'#handlers tr[data-handler=clean] td')].map(t => "
                                 "[t.dataset.col, t.textContent]))")
        assert row["dead-letters"] == "3", row  # the 3 rejected rows, one batch each
        assert row["errors"] == "0 · 0" and row["state"] == "running", row
        cards = await browser.eval("Object.fromEntries([...document.querySelectorAll('#cards "
                                   ".card')].map(c => [c.querySelector('.card-label').textContent, "
                                   "c.querySelector('.card-value').textContent]))")
        assert cards["dead letters"] == "3" and cards["state"] == "ready", cards
        extras = await browser.text("#extras")
        assert "e2e tasks" in extras and "/ 40" in extras and "windows" in extras, extras
        assert '"type": "passthrough"' in await browser.text("#details")
        assert await browser.eval("document.getElementById('conn').textContent") == "live · ready"
        assert browser.console_errors == [], browser.console_errors
        assert TOKEN not in await browser.eval("location.href")
        assert shot.exists()


# -- data for the gait pages ------------------------------------------------------------------
DIAGNOSES = [  # recording, probability, model version
    ("GaCo01_01", 0.12, "rocket-1.1"), ("GaCo02_01", 0.41, "rocket-1.1"),
    ("GaPt03_01", 0.91, "rocket-1.1"), ("GaPt04_02", 0.38, "rocket-1.1"),
    ("JuCo02_01", 0.66, "rocket-1.1"), ("JuPt05_01", 0.83, "rocket-1.0"),
    ("JuPt06_01", 0.97, "rocket-1.0"), ("SiCo03_01", 0.21, "rocket-1.0"),
    ("SiPt07_01", 0.77, "rocket-1.0"), ("SiCo04_01", 0.05, "rocket-1.0"),
]


#: the decision threshold each model version sends with its diagnoses (labels above
#: are the same at 0.45 and at 0.5, so the list's figures do not depend on it)
THRESHOLDS = {"rocket-1.1": 0.45}


def window_probabilities(recording: str, p: float, n: int = 23) -> list[float]:
    rng = np.random.default_rng(sum(map(ord, recording)))
    return np.clip(p + rng.normal(0, 0.12, n), 0.0, 1.0).round(4).tolist()


@pytest.fixture
async def es_index() -> AsyncIterator[tuple[str, str]]:
    """A unique index holding DIAGNOSES (as es_sink writes them); deleted afterwards."""
    url = _service("elasticsearch").address()
    index = f"test-dashboard-{RUN}-{uuid.uuid4().hex[:6]}"
    es = AsyncElasticsearch(url, request_timeout=30)
    try:
        await es.indices.create(index=index, mappings=DEFAULT_MAPPINGS,
                                settings={"number_of_replicas": 0, "number_of_shards": 1})
        t0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
        for i, (rec, p, version) in enumerate(DIAGNOSES):
            probs = window_probabilities(rec, p)
            thr = THRESHOLDS.get(version)
            doc = {"recording": rec, "probability": p,
                   "label": "parkinson" if p >= (thr or 0.5) else "control",
                   "model_version": version, "n_windows": len(probs), "window_probabilities": probs,
                   "diagnosed_at": (t0 + timedelta(minutes=i)).isoformat()}
            if thr is not None:  # rocket-1.0's diagnoses predate the threshold field
                doc["threshold"] = thr
            await es.index(index=index, id=rec, document=doc)
        await es.indices.refresh(index=index)
        yield url, index
    finally:
        await es.indices.delete(index=index, ignore_unavailable=True)
        await es.close()


def synthetic_walk(recording: str, n: int) -> pa.Table:
    """n samples at 100 Hz of a plausible walk: alternating stance phases, heel to toe."""
    t = np.arange(n) / 100.0
    cycle = 1.1
    cols: dict[str, Any] = {"recording": pa.array([recording] * n), "seq": np.arange(n),
                            "time": t}
    for side, shift in (("L", 0.0), ("R", 0.5)):
        phase = ((t / cycle) + shift) % 1.0
        stance = phase < 0.62
        u = np.where(stance, phase / 0.62, 0.0)
        for i in range(1, 9):  # sensors 1..8 from heel to toe: load moves forward
            centre = 0.15 + 0.7 * (i - 1) / 7
            cols[f"{side}{i}"] = np.where(stance, (90 + 12 * i) * np.exp(-((u - centre) / 0.17) ** 2),
                                          0.0)
    for side in "LR":
        cols[side] = sum(cols[f"{side}{i}"] for i in range(1, 9))
    cols["device"] = pa.array([f"insole-{recording}"] * n)
    order = ["recording", "seq", "time", *[f"L{i}" for i in range(1, 9)],
             *[f"R{i}" for i in range(1, 9)], "L", "R", "device"]
    return pa.table({k: cols[k] for k in order})


@pytest.fixture
async def lake() -> AsyncIterator[tuple[str, str]]:
    """A unique lake root holding GaPt03_01 as two segments; deleted afterwards."""
    url = _service("hdfs").webhdfs()
    base = f"/tmp/test-dashboard/{RUN}-{uuid.uuid4().hex[:6]}"
    root = f"{base}/raw"
    table = synthetic_walk("GaPt03_01", 12_000)
    async with WebHdfs(url) as fs:
        try:
            for first, last in ((0, 9_999), (10_000, 11_999)):
                buf = io.BytesIO()
                pq.write_table(table.slice(first, last - first + 1), buf, compression="zstd")
                await fs.create(f"{root}/date=2026-12-04/recording=GaPt03_01/"
                                f"part-{first:010d}-{last:010d}.parquet", buf.getvalue())
            # a half-written temporary file must be ignored
            await fs.create(f"{root}/date=2026-12-04/recording=GaPt03_01/"
                            "_tmp.part-0000012000-0000012999.parquet", b"garbage")
            yield url, root
        finally:
            await fs.delete(base, recursive=True)


@pytest.fixture
def gait_env(es_index: tuple[str, str], lake: tuple[str, str],
             monkeypatch: pytest.MonkeyPatch) -> None:
    es_url, index = es_index
    webhdfs, root = lake
    for key, value in (("ES_HOSTS", es_url), ("ES_INDEX", index), ("WEBHDFS_URL", webhdfs),
                       ("LAKE_ROOT", root)):
        monkeypatch.setenv(f"GAITFLOW_DASHBOARD_{key}", value)


async def rows(page: Browser) -> list[str]:
    return await page.eval("[...document.querySelectorAll('#diagnoses tbody tr')]"
                           ".map(tr => tr.dataset.recording)")


async def wait_rows(page: Browser, expected: list[str]) -> None:
    """Wait until the table shows exactly these recordings (any order)."""
    await page.wait_for("document.body.dataset.loaded === 'true' && JSON.stringify([...document"
                        ".querySelectorAll('#diagnoses tbody tr')].map(tr => tr.dataset.recording)"
                        f".sort()) === JSON.stringify({json.dumps(sorted(expected))})", timeout=15)


# -- the diagnoses page -----------------------------------------------------------------------
@pytest.mark.usefixtures("gait_env")
async def test_diagnoses_page_search_and_filters(browser: Browser, tmp_path: Path) -> None:
    doc = pipeline_doc(tmp_path, extensions=["handlers.gait_dashboard:setup"], token=TOKEN)
    async with Runtime.from_dict(doc) as rt:
        # "#token=" signs in (kept in sessionStorage for the tab, dropped from the address)
        await browser.goto(f"{rt.admin_url}/diagnoses#token={TOKEN}")
        everyone = [r for r, _, _ in DIAGNOSES]
        await wait_rows(browser, everyone)
        text = await browser.text("#diagnoses tbody")
        for rec, p, version in DIAGNOSES:
            assert rec in text and f"{p:.3f}" in text and version in text
        # confusion matrix: Pt predicted parkinson (TP) 4, Pt as control (FN) 1,
        # Co as parkinson (FP) 1, Co as control (TN) 4
        cm = [await browser.text(f"#cm-{k}") for k in ("tp", "fn", "fp", "tn")]
        assert cm == ["4", "1", "1", "4"], cm
        assert "80 %" in await browser.text("#scores")  # accuracy 8/10
        versions = await browser.eval("[...document.querySelectorAll("
                                      "'select[name=model_version] option')].map(o => o.value)")
        assert versions == ["", "rocket-1.0", "rocket-1.1"], versions
        await shoot(browser, "diagnoses", {"table": "#diagnoses", "matrix": "#confusion"})

        # full-text / prefix search narrows the rows, as a user types it
        await browser.type("input[name=q]", "gapt")
        await wait_rows(browser, ["GaPt03_01", "GaPt04_02"])
        assert "q=gapt" in await browser.eval("location.search")
        # a filter on top: predicted parkinson
        await browser.select("select[name=label]", "parkinson")
        await wait_rows(browser, ["GaPt03_01"])
        assert await browser.text("#cm-tp") == "1"
        # clear the search; probability range and study
        await browser.type("input[name=q]", "")
        await browser.select("select[name=label]", "")
        await browser.type("input[name=min_p]", "0.8")
        await wait_rows(browser, ["GaPt03_01", "JuPt05_01", "JuPt06_01"])
        await browser.select("select[name=study]", "Ju")
        await wait_rows(browser, ["JuPt05_01", "JuPt06_01"])
        await shoot(browser, "diagnoses-filtered", {"table": "#diagnoses"})

        # the filter state is in the URL: a shared link opens the same view
        await browser.goto(f"{rt.admin_url}/diagnoses?truth=control&model_version=rocket-1.0")
        await wait_rows(browser, ["SiCo03_01", "SiCo04_01"])
        # links lead to the recording pages
        href = await browser.eval("document.querySelector('#diagnoses tbody a').getAttribute('href')")
        assert href in ("/recordings/SiCo03_01", "/recordings/SiCo04_01")
        assert browser.console_errors == [], browser.console_errors

        assert TOKEN not in await browser.eval("location.href")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as http, \
                http.get(f"{rt.admin_url}/api/diagnoses?min_p=2") as resp:
            assert resp.status == 400
            assert "min_p" in (await resp.json())["error"]


# -- the recording page -------------------------------------------------------------------------
@pytest.mark.usefixtures("gait_env")
async def test_recording_page_plots_signals_and_window_probabilities(
        browser: Browser, tmp_path: Path) -> None:
    doc = pipeline_doc(tmp_path, extensions=["handlers.gait_dashboard:setup"])
    async with Runtime.from_dict(doc) as rt:
        await browser.goto(f"{rt.admin_url}/recordings/GaPt03_01")
        await browser.wait_for("document.body.dataset.loaded === 'true'", timeout=20)
        force = await browser.eval("({...document.getElementById('force').dataset})")
        assert force["series"] == "L,R" and 500 <= int(force["points"]) <= 1000, force
        heat = await browser.eval("({...document.getElementById('heatmap').dataset})")
        assert heat == {"rows": "16", "cols": "300"}, heat
        expected = window_probabilities("GaPt03_01", 0.91)
        bars = await browser.eval("[...document.querySelectorAll('#windows svg rect.wbar')]"
                                  ".map(r => +r.dataset.p)")
        assert bars == pytest.approx(expected, abs=1e-4)
        facts = await browser.text("#facts")
        assert "parkinson" in facts and "0.910" in facts and "rocket-1.1" in facts, facts
        assert "12,000" in facts and "2 lake files" in facts, facts  # the temp file is ignored
        assert await browser.text("#truth") == "true label: parkinson"
        assert await browser.eval("document.getElementById('force-msg').hidden")
        assert browser.console_errors == [], browser.console_errors
        await shoot(browser, "recording", {"force plot": "#force", "heatmap": "#heatmap",
                                           "window probabilities": "#windows svg"})

        # zoom: a preset, then a drag across the plot (re-read from the lake, finer points)
        await browser.click("button[data-zoom='10']")
        await browser.wait_for("document.getElementById('zoom-range').textContent"
                               ".startsWith('showing 0.0–10.0 s of 120.0 s')")
        await browser.wait_for("document.body.dataset.loaded === 'true'")
        assert await browser.eval("+document.getElementById('force').dataset.points") == 1000
        await browser.drag("#force", 0.3, 0.6)
        zoomed = await browser.wait_for("(t => /^showing [1-9]\\.\\d–\\d\\.\\d s of/.test(t) && t)"
                                        "(document.getElementById('zoom-range').textContent)")
        lo, hi = map(float, re.match(r"showing ([\d.]+)–([\d.]+) s", zoomed).groups())
        assert 1.5 < lo < hi < 8.0 and hi - lo > 2.0, zoomed  # about 30 %..60 % of 0-10 s
        await browser.wait_for("document.body.dataset.loaded === 'true'")
        await shoot(browser, "recording-zoomed", {"force plot": "#force", "heatmap": "#heatmap"})
        await browser.click("button[data-zoom='all']")
        await browser.wait_for("document.getElementById('zoom-range').textContent === ''")

        # a recording with a diagnosis but no samples in the lake: explained, not broken
        await browser.goto(f"{rt.admin_url}/recordings/SiCo04_01")
        await browser.wait_for("document.body.dataset.loaded === 'true'")
        assert "no samples of SiCo04_01" in await browser.text("#force-msg")
        assert await browser.count("#windows svg rect.wbar") == 23
        assert browser.console_errors == [], browser.console_errors


@pytest.mark.usefixtures("gait_env")
async def test_probabilities_are_read_against_the_models_threshold(
        browser: Browser, tmp_path: Path) -> None:
    doc = pipeline_doc(tmp_path, extensions=["handlers.gait_dashboard:setup"])
    async with Runtime.from_dict(doc) as rt:
        # rocket-1.1 sends 0.45: its windows are coloured and counted against 0.45
        await browser.goto(f"{rt.admin_url}/recordings/GaCo02_01")
        await browser.wait_for("document.body.dataset.loaded === 'true'", timeout=20)
        assert "decision threshold 0.450" in await browser.text("#facts")
        line = await browser.eval("+document.querySelector('#windows svg line.threshold')"
                                  ".dataset.threshold")
        assert line == pytest.approx(0.45)
        bars = await browser.eval("[...document.querySelectorAll('#windows svg rect.wbar')]"
                                  ".map(r => [+r.dataset.p, r.classList.contains('parkinson')])")
        probs = window_probabilities("GaCo02_01", 0.41)
        assert [b[0] for b in bars] == pytest.approx(probs, abs=1e-4)
        assert any(0.45 <= q < 0.5 for q in probs)  # the case a 0.5 threshold gets wrong
        assert [b[1] for b in bars] == [q >= 0.45 for q in probs]
        above = sum(q >= 0.45 for q in probs)
        assert f"{above} at or above the threshold 0.450" in await browser.text("#windows-hint")
        # rocket-1.0's diagnoses carry no threshold: 0.5, said as such
        await browser.goto(f"{rt.admin_url}/recordings/SiPt07_01")
        await browser.wait_for("document.body.dataset.loaded === 'true'", timeout=20)
        assert "decision threshold 0.500" in await browser.text("#facts")
        # the list marks each row's threshold on its probability bar
        await browser.goto(f"{rt.admin_url}/diagnoses")
        await browser.wait_for("document.body.dataset.loaded === 'true' && "
                               "document.querySelectorAll('#diagnoses tbody tr').length > 0",
                               timeout=15)  # fmt: skip
        marks = await browser.eval(
            "Object.fromEntries([...document.querySelectorAll('#diagnoses tbody tr')].map("
            "tr => [tr.dataset.recording, tr.querySelector('.pmark').style.left]))")
        assert marks["GaCo02_01"] == "45%" and marks["SiPt07_01"] == "50%", marks
        assert browser.console_errors == [], browser.console_errors


async def test_recording_ids_are_validated(tmp_path: Path) -> None:
    doc = pipeline_doc(tmp_path, extensions=["handlers.gait_dashboard:setup"])
    async with Runtime.from_dict(doc) as rt, aiohttp.ClientSession() as http:
        for bad in ("..", "a..b", "x" * 65, "GaPt03_01%2F..%2F..", "%2e%2e", "a%00b", "a b"):
            for path in (f"/recordings/{bad}", f"/api/recordings/{bad}/signals",
                         f"/api/recordings/{bad}/diagnosis"):
                url = URL(f"{rt.admin_url}{path}".replace(" ", "%20"), encoded=True)
                async with http.get(url, allow_redirects=False) as resp:
                    assert resp.status == 404, (path, resp.status)
        async with http.get(f"{rt.admin_url}/recordings/GaPt03_01") as resp:
            assert resp.status == 200
            body = await resp.text()
            assert 'data-recording="GaPt03_01"' in body
