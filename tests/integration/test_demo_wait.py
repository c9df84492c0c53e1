"""make demo counts only the diagnoses its own run wrote (real FerretDB).

A second ``make demo`` on a stack that kept the first run's data must not show
the first run's diagnoses as its own: it waits for documents written since it
started, and says how many recordings had an earlier diagnosis.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from stack.demo import earlier_diagnoses, wait_diagnoses

pytestmark = pytest.mark.integration


@pytest.fixture
async def diagnoses_coll(stack_service: Any) -> AsyncIterator[tuple[Any, str, str]]:
    """``(collection, uri, database)`` in a unique database, dropped afterwards."""
    uri = stack_service("ferretdb").address()
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, serverSelectionTimeoutMS=5000)
    database = f"gaitflow_demo_{uuid.uuid4().hex[:10]}"
    try:
        yield client[database]["diagnoses"], uri, database
    finally:
        await client.drop_database(database)
        await client.close()


async def test_only_this_runs_diagnoses_are_counted(diagnoses_coll: tuple[Any, str, str]) -> None:
    coll, uri, database = diagnoses_coll
    now = dt.datetime.now(dt.UTC)
    await coll.insert_many([
        {"_id": "GaPt01_01", "label": "parkinson", "diagnosed_at": now - dt.timedelta(hours=1)},
        {"_id": "GaCo01_01", "label": "control", "diagnosed_at": now - dt.timedelta(hours=1)},
        {"_id": "JuPt02_01", "label": "parkinson", "diagnosed_at": now + dt.timedelta(seconds=1)},
    ])  # fmt: skip
    expected = {"GaPt01_01", "GaCo01_01", "JuPt02_01", "SiCo03_01"}
    assert await earlier_diagnoses(uri, database, "diagnoses", expected) == 3
    found = await wait_diagnoses(uri, database, "diagnoses", expected, timeout=1.5, since=now)
    assert set(found) == {"JuPt02_01"}  # the two earlier documents are not this run's
    # this run rediagnoses one of them (the sink upserts by _id) and the missing one
    await coll.replace_one({"_id": "GaPt01_01"}, {"label": "parkinson", "diagnosed_at":
                           dt.datetime.now(dt.UTC)})  # fmt: skip
    await coll.insert_one({"_id": "SiCo03_01", "label": "control",
                           "diagnosed_at": dt.datetime.now(dt.UTC)})  # fmt: skip
    found = await wait_diagnoses(uri, database, "diagnoses", expected, timeout=1.5, since=now)
    assert set(found) == {"GaPt01_01", "JuPt02_01", "SiCo03_01"}
    assert found["GaPt01_01"]["diagnosed_at"] >= now.replace(microsecond=now.microsecond // 1000 * 1000)
