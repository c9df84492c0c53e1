"""Readiness recovers without traffic: a handler that lost its server while idle (or
started while it was away) reports connected again once the server is back, so
``/readyz`` does not stay 503 until the next batch happens to come.

The outage is a TCP proxy cut in front of the real server
(``tests/integration/stores_support.TcpProxy``): nothing shared is stopped.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import reliability_support as rs
from audit import RunNames
from stores_support import TcpProxy

from pipeline import Runtime
from stack.service import Service

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@pytest.mark.timeout(180)
async def test_spark_job_reports_connected_again_once_webhdfs_is_back(
        stack_service: Callable[[str], Service], run_names: RunNames) -> None:
    hdfs = stack_service("hdfs")
    async with TcpProxy("127.0.0.1", int(hdfs.opts["namenode_http"])) as proxy:
        await proxy.cut()      # WebHDFS unreachable when the pipeline starts
        rt = Runtime.from_dict({
            "runtime": {"admin_enabled": False, "start_timeout": 60, "drain_timeout": 5},
            "dead_letter": {"target": "dlq"},
            "handlers": {
                "events": {"type": "memory_source", "forever": True, "interval": 3600,
                           "outputs": ["features"]},
                "features": {"type": "spark_job", "features_root": run_names.features_root,
                             "webhdfs_url": f"http://127.0.0.1:{proxy.port}/webhdfs/v1",
                             "max_wait": 86400.0, "on_shutdown": "cancel",
                             "outputs": ["sink"]},
                "sink": {"type": "memory_sink"},
                "dlq": {"type": "memory_sink"}}})
        async with rt:
            features = rt.handlers["features"]
            connected, _ = features.health()
            assert not connected, "WebHDFS is unreachable: the handler should say so"
            await proxy.restore()
            t0 = time.monotonic()
            try:
                await rs.wait_until(lambda: features.health()[0], 30,
                                    "spark_job connected again (no traffic)")
            except AssertionError:
                raise AssertionError(
                    f"WebHDFS has been back for {time.monotonic() - t0:.0f} s and spark_job "
                    f"still reports {features.health()}: /readyz stays 503 until a job "
                    "runs") from None
