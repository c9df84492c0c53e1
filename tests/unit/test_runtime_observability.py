"""Structured logs (one line per event, secrets redacted) and Prometheus rendering."""
from __future__ import annotations

import io
import json

import pytest

from pipeline import Secret
from pipeline.log import configure_logging, get_logger, redact, register_secret, scrub
from pipeline.metrics import MetricsRegistry


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    configure_logging("debug", stream=out)
    return out


def test_one_line_logfmt_with_redaction(stream: io.StringIO) -> None:
    log = get_logger(handler="mqtt")
    log.info("handler.started", url="mqtt://user:pw-123@broker:1883", password="hunter22",
             token=None, note="two\nlines", elapsed_ms=1.23456789)
    (line,) = stream.getvalue().splitlines()
    assert " info event=handler.started handler=mqtt " in line
    assert 'url="mqtt://***:***@broker:1883"' in line and "pw-123" not in line
    assert 'password="***"' in line and "hunter22" not in line
    assert "token=null" in line, "an empty secret is shown as empty, not as ***"
    assert 'note="two\\nlines"' in line
    assert "elapsed_ms=1.234568" in line


def test_json_format_and_exceptions(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    log = get_logger()
    log.debug("hidden")
    try:
        raise ValueError("bad thing")
    except ValueError as exc:
        log.error("handler.failed", exc_info=exc, handler="x", secret=Secret("zzz"))
    (line,) = stream.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["event"] == "handler.failed" and doc["level"] == "error"
    assert doc["error"] == "ValueError: bad thing" and doc["secret"] == "***"


def test_registered_secret_values_are_scrubbed_everywhere(stream: io.StringIO) -> None:
    register_secret(Secret("s3kr1t-value"))
    register_secret("ab")  # too short to scrub safely
    get_logger().warning("driver.error", detail="auth failed: user=x pass=s3kr1t-value")
    assert "s3kr1t-value" not in stream.getvalue() and "pass=***" in stream.getvalue()
    assert scrub("ab s3kr1t-value") == "ab ***"
    assert redact("api_key", "k") == "***" and redact("count", 3) == 3


def test_prometheus_text() -> None:
    registry = MetricsRegistry()
    registry.family("batches_in", "Batches received", "counter", ["handler"]).labels('a"b').inc(2)
    hist = registry.family("handle_seconds", "Latency", "histogram", ["handler"],
                           buckets=(0.1, 1.0)).labels("s")
    for value in (0.05, 0.5, 5.0):
        hist.observe(value)
    registry.family("depth", "Depth", "gauge", ["handler"]).set_function(lambda: [(["s"], 3)])
    text = registry.render()
    assert text.endswith("\n")
    assert '# TYPE gaitflow_batches_in_total counter\ngaitflow_batches_in_total{handler="a\\"b"} 2' \
        in text
    assert 'gaitflow_handle_seconds_bucket{handler="s",le="0.1"} 1' in text
    assert 'gaitflow_handle_seconds_bucket{handler="s",le="1"} 2' in text
    assert 'gaitflow_handle_seconds_bucket{handler="s",le="+Inf"} 3' in text
    assert 'gaitflow_handle_seconds_count{handler="s"} 3' in text
    assert 'gaitflow_handle_seconds_sum{handler="s"} 5.55' in text
    assert 'gaitflow_depth{handler="s"} 3' in text
    with pytest.raises(ValueError, match="already registered as counter"):
        registry.family("batches_in", "x", "counter", ["other"])
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.family("bad-name", "x", "gauge")
