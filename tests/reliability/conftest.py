"""Fixtures for the reliability tests: faults, bad input, security, on the real stack.

These tests need the local stack (``python -m stack up``), ``GAITPDB_DIR`` and the
model server (``ml.serve``). They fail, never skip, when something is missing.
Every run uses its own names (``audit.RunNames``) and removes what it created.
"""
from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
# reliability_support; the end-to-end audit helpers; the integration tests' TcpProxy
for _p in (HERE, HERE.parent / "e2e", HERE.parent / "integration"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import reliability_support as rs
from audit import RunNames, cleanup

from stack import services
from stack.config import StackConfig, load
from stack.service import Service


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: fault, bad-input, security tests on the local stack "
                   "(tests/reliability)")
    config.addinivalue_line(
        "markers", "outage: stops a shared stack service for RELIABILITY_OUTAGE_SECONDS "
                   "(deselect with -m 'not outage' while others use the stack)")


@pytest.fixture(scope="session")
def stack_cfg() -> StackConfig:
    return load()


@pytest.fixture(scope="session")
def stack_service(stack_cfg: StackConfig) -> Callable[[str], Service]:
    """``stack_service("kafka")``: the Service, or the test FAILS naming the port."""

    def get(name: str) -> Service:
        svc = services.get(name)(stack_cfg)
        for port in svc.ports():
            if name == "hdfs" and port not in (svc.opts["namenode_http"],
                                               svc.opts["namenode_rpc"]):
                continue
            try:
                socket.create_connection(("127.0.0.1", port), timeout=3).close()
            except OSError as exc:
                pytest.fail(f"{name} is not listening on 127.0.0.1:{port} ({exc}); "
                            f"start it with `python -m stack up {name}`", pytrace=False)
        return svc

    return get


@pytest.fixture(scope="session")
def whole_stack(stack_service: Callable[[str], Service]) -> dict[str, Service]:
    """Every service the default pipeline uses (fails when one is down)."""
    return {n: stack_service(n) for n in ("mosquitto", "kafka", "hdfs", "cassandra",
                                           "elasticsearch", "ferretdb")}


@pytest.fixture(scope="session")
def recordings() -> dict[str, np.ndarray]:
    """The first ``RELIABILITY_SECONDS`` (20) s of four recordings (two studies, both groups)."""
    return rs.load_recordings(rs.RECORDINGS, rs.SECONDS)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rs.train_small_model(tmp_path_factory.mktemp("gaitpdb-subset"),
                                tmp_path_factory.mktemp("model"))


@pytest.fixture
async def model_server(model_dir: Path, tmp_path: Path) -> AsyncIterator[rs.ModelServer]:
    server = rs.ModelServer(model_dir, tmp_path / "serve.log")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def run_names() -> AsyncIterator[RunNames]:
    """Unique names for one pipeline run; everything they name is removed afterwards."""
    names = RunNames(uuid.uuid4().hex[:10])
    try:
        yield names
    finally:
        rs.kill_strays(names.run)
        await rs.forget_mqtt_session(f"gaitflow-{names.run}")
        await cleanup(names)


@pytest.fixture
def pipelines(tmp_path: Path) -> Iterator[list[rs.PipelineProcess]]:
    """Pipelines started by the test; any still running at the end are killed."""
    made: list[rs.PipelineProcess] = []
    yield made
    for p in made:
        p.kill()
