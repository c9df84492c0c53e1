"""mongo_sink's write logic against a fake client that answers like MongoDB or like FerretDB.

The fake implements what the sink uses of ``AsyncMongoClient`` (``buildInfo``,
``ping``, ``index_information``, ``create_indexes``, the ``update`` command) with
the reply shapes both servers give, including FerretDB 1.24's quirks (stops at the
first failing update, reports index 0, omits ``n``/``nModified``).
"""
from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import pyarrow as pa
import pytest
from bson.errors import InvalidDocument
from pymongo.errors import AutoReconnect
from runtime_fakes import dead_reasons, run_into_sink

from handlers._common import prepare_documents
from handlers.mongo_sink import IndexSpec, MongoSink, MongoSinkSettings
from pipeline import Runtime, SettingsError


class FakeStore:
    """The server side: documents, a unique secondary field, scripted failures."""

    def __init__(self) -> None:
        self.flavour = "mongodb"                 # or "ferretdb"
        self.docs: dict[Any, dict[str, Any]] = {}
        self.unique: str | None = None
        self.down = 0                            # next N commands raise AutoReconnect
        self.transient: dict[Any, int] = {}      # _id -> times it fails with code 112
        self.unencodable: set[Any] = set()       # _id the client cannot encode
        self.concern_errors = 0                  # next N replies carry a writeConcernError
        self.commands: list[tuple[str, int]] = []   # (command, documents)
        self.indexes: dict[str, dict[str, Any]] = {"_id_": {"key": [("_id", 1)]}}

    def _check(self, name: str, docs: list[dict[str, Any]]) -> None:
        if self.down:
            self.down -= 1
            raise AutoReconnect("connection closed")
        if any(d["_id"] in self.unencodable for d in docs):
            raise InvalidDocument("cannot encode object: <object>")
        self.commands.append((name, len(docs)))

    def _error(self, doc: dict[str, Any], key: Any) -> dict[str, Any] | None:
        if self.transient.get(key):
            self.transient[key] -= 1
            return {"code": 112, "errmsg": "WriteConflict"}
        if self.unique and any(d.get(self.unique) == doc.get(self.unique) and k != key
                               for k, d in self.docs.items()):
            return {"code": 11000, "errmsg": f"E11000 duplicate key: {self.unique}"}
        return None

    def insert(self, documents: list[dict[str, Any]]) -> dict[str, Any]:
        self._check("insert", documents)
        errors, n = [], 0
        for i, doc in enumerate(documents):
            error = ({"code": 11000, "errmsg": "E11000 duplicate key: _id"}
                     if doc["_id"] in self.docs else self._error(doc, doc["_id"]))
            if error is None:
                self.docs[doc["_id"]] = doc
                n += 1
            else:
                errors.append({"index": i, **error})
        return {"n": n, "ok": 1.0, **({"writeErrors": errors} if errors else {})}

    def update(self, updates: list[dict[str, Any]]) -> dict[str, Any]:
        self._check("update", [u["u"] for u in updates])
        errors, n = [], 0
        for i, u in enumerate(updates):
            doc, key = u["u"], u["q"]["_id"]
            error = self._error(doc, key)
            if error is None:
                self.docs[key] = doc
                n += 1
                continue
            if self.flavour == "ferretdb":  # stops here, says index 0, no n/nModified
                return {"ok": 1.0, "writeErrors": [{"index": 0, **error}]}
            errors.append({"index": i, **error})
        reply: dict[str, Any] = {"n": n, "nModified": 0, "ok": 1.0}
        if errors:
            reply["writeErrors"] = errors
        if self.concern_errors:
            self.concern_errors -= 1
            reply["writeConcernError"] = {"code": 64, "errmsg": "waiting for replication"}
        return reply


STORE = FakeStore()


class FakeCollection:
    async def index_information(self) -> dict[str, Any]:
        return dict(STORE.indexes)

    async def create_indexes(self, models: list[Any]) -> list[str]:
        names = []
        for m in models:
            doc = m.document
            STORE.indexes[doc["name"]] = {"key": list(doc["key"].items()),
                                          **({"unique": True} if doc.get("unique") else {})}
            names.append(doc["name"])
        return names


class FakeDatabase:
    def __getitem__(self, name: str) -> FakeCollection:
        return FakeCollection()

    async def command(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if name == "update":
            return STORE.update(kwargs["updates"])
        if name == "insert":
            return STORE.insert(kwargs["documents"])
        if name == "buildInfo":
            info = {"version": "7.0.42", "ok": 1.0}
            if STORE.flavour == "ferretdb":
                info["ferretdbVersion"] = "v1.24.2"
            return info
        return {"ok": 1.0}


class FakeClient:
    admin = FakeDatabase()

    def __getitem__(self, name: str) -> FakeDatabase:
        return FakeDatabase()

    async def close(self) -> None:
        pass


class FakeMongoSink(MongoSink):
    Settings: ClassVar[type] = MongoSinkSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.changes: list[bool] = []

    def _make_client(self) -> Any:
        return FakeClient()

    def set_connected(self, connected: bool, detail: str = "") -> None:
        self.changes.append(connected)
        super().set_connected(connected, detail)


@pytest.fixture(autouse=True)
def store() -> FakeStore:
    global STORE
    STORE = FakeStore()
    return STORE


def rows(n: int, first: int = 0, **extra: Any) -> list[dict[str, Any]]:
    at = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    return [{"recording": f"R{i:02d}", "probability": 0.5, "label": "control",
             "patient": f"P{i}", "diagnosed_at": at, **extra} for i in range(first, first + n)]


async def run(make_runtime: Any, data: list[dict[str, Any]], **sink: Any) -> Runtime:
    return await run_into_sink(make_runtime, "mongo", data,
                               {"type": "test_mongo_sink_unit:FakeMongoSink", **sink})


@pytest.mark.parametrize(("flavour", "mode", "commands"), [
    ("mongodb", "auto", [("update", 5)]),                    # MongoDB's reply is trusted
    ("ferretdb", "auto", [("insert", 5), ("update", 1)]),    # insert, upsert the clash
    ("ferretdb", "upsert", [("update", 5)] + [("update", 1)] * 5),  # re-run one by one
])
async def test_duplicate_on_unique_index_is_dead_lettered_alone(
        make_runtime: Any, store: FakeStore, flavour: str, mode: str,
        commands: list[tuple[str, int]]) -> None:
    store.flavour, store.unique = flavour, "patient"
    data = rows(5)
    data[1]["patient"] = "P0"
    rt = await run(make_runtime, data, write_mode=mode)
    assert sorted(store.docs) == ["R00", "R02", "R03", "R04"]
    assert dead_reasons(rt) == {"R01": "MongoDB refused the document (code 11000): "
                               "E11000 duplicate key: patient"}
    assert store.commands == commands
    assert rt.handlers["src"].committed  # type: ignore[attr-defined]


async def test_insert_first_upserts_existing_keys_in_short_commands(
        make_runtime: Any, store: FakeStore) -> None:
    store.flavour = "ferretdb"
    await run(make_runtime, rows(20, label="control"))
    await run(make_runtime, rows(20, label="parkinson"))
    assert store.commands == [("insert", 20), ("insert", 20), ("update", 8), ("update", 8),
                              ("update", 4)]
    assert {d["label"] for d in store.docs.values()} == {"parkinson"}


async def test_documents_carry_id_and_the_last_row_per_key_wins(make_runtime: Any,
                                                                 store: FakeStore) -> None:
    data = rows(3) + [{**rows(1)[0], "label": "parkinson"}]
    await run(make_runtime, data)
    assert store.docs["R00"]["_id"] == "R00"
    assert store.docs["R00"]["label"] == "parkinson"
    assert store.docs["R00"]["diagnosed_at"] == dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    assert store.commands == [("update", 3)]


async def test_transient_write_errors_are_retried(make_runtime: Any, store: FakeStore) -> None:
    store.transient = {"R01": 2}
    rt = await run(make_runtime, rows(3))
    assert sorted(store.docs) == ["R00", "R01", "R02"]
    assert dead_reasons(rt) == {}
    assert store.commands == [("update", 3), ("update", 1), ("update", 1)]


@pytest.mark.parametrize("flavour", ["mongodb", "ferretdb"])
async def test_transient_errors_past_every_retry_go_to_dead_letter(make_runtime: Any,
                                                                    store: FakeStore,
                                                                    flavour: str) -> None:
    store.flavour, store.transient = flavour, {"R01": 100}
    rt = await run(make_runtime, rows(3))
    assert sorted(store.docs) == ["R00", "R02"]
    assert list(dead_reasons(rt)) == ["R01"]
    assert "failed after 2 attempts" in dead_reasons(rt)["R01"] and "WriteConflict" in dead_reasons(rt)["R01"]


async def test_write_concern_error_is_retried(make_runtime: Any, store: FakeStore) -> None:
    store.concern_errors = 1
    rt = await run(make_runtime, rows(2))
    assert dead_reasons(rt) == {} and store.commands == [("update", 2), ("update", 2)]


async def test_connection_loss_is_retried_and_reported(make_runtime: Any,
                                                        store: FakeStore) -> None:
    store.down = 2        # the next two update commands find no server
    rt = await run(make_runtime, rows(2))
    assert sorted(store.docs) == ["R00", "R01"]
    sink = rt.handlers["mongo"]
    assert sink.changes == [True, False, False, True]  # type: ignore[attr-defined]
    assert sink.health() == (True, "")


@pytest.mark.parametrize("flavour", ["mongodb", "ferretdb"])
async def test_unencodable_document_is_found_and_dead_lettered(make_runtime: Any,
                                                                store: FakeStore,
                                                                flavour: str) -> None:
    store.flavour, store.unencodable = flavour, {"R01"}
    rt = await run(make_runtime, rows(3))
    assert sorted(store.docs) == ["R00", "R02"]
    assert "InvalidDocument" in dead_reasons(rt)["R01"]


async def test_bulk_size_chunks_the_commands(make_runtime: Any, store: FakeStore) -> None:
    await run(make_runtime, rows(7), bulk_size=3)
    assert store.commands == [("update", 3), ("update", 3), ("update", 1)]


async def test_indexes_created_and_conflicts_refused(make_runtime: Any, store: FakeStore) -> None:
    await run(make_runtime, rows(1), indexes=[{"keys": ["label", "-diagnosed_at"]},
                                              {"keys": ["patient"], "unique": True,
                                               "name": "patient_u"}])
    assert store.indexes["label_1_diagnosed_at_-1"]["key"] == [("label", 1), ("diagnosed_at", -1)]
    assert store.indexes["patient_u"].get("unique") is True
    rt = make_runtime({
        "src": {"type": "memory_source", "rows": rows(1), "outputs": ["mongo"]},
        "mongo": {"type": "test_mongo_sink_unit:FakeMongoSink",
                  "indexes": [{"keys": ["patient"], "name": "patient_u"}]},
    })
    with pytest.raises(Exception, match=r"index 'patient_u' .* unique=True, but the settings "
                                        r"ask for \[\('patient', 1\)\] unique=False"):
        await rt.run()


async def test_batch_without_the_key_column_is_rejected(make_runtime: Any,
                                                         store: FakeStore) -> None:
    rt = await run(make_runtime, [{"other": 1}])
    assert "no key column 'recording'" in next(iter(dead_reasons(rt).values()))
    assert store.docs == {}


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="database"):
        MongoSinkSettings(database="a.b")
    with pytest.raises(ValueError, match="index names"):
        MongoSinkSettings(indexes=[IndexSpec(keys=["a"]), IndexSpec(keys=["b"], name="a_1")])
    with pytest.raises(ValueError, match="password needs username"):
        from pipeline import Secret
        MongoSinkSettings(password=Secret("x"))
    with pytest.raises(SettingsError, match=r"indexes\[0\]\.keys"):
        Runtime.from_dict({"handlers": {"m": {"type": "mongo_sink", "on_failure": "stop",
                                              "indexes": [{"keys": "label"}]}}})


# --------------------------------------------------------------------------- helpers
def test_prepare_documents_refuses_null_keys_and_non_finite_values() -> None:
    table = pa.table({
        "recording": ["a", None, "b", "c", "a"],
        "p": [0.1, 0.2, float("nan"), 0.4, 0.5],
        "w": [[0.1], [0.2], [0.3], [float("inf")], [0.5]],
        "t": pa.array([0, 1, 2, 3, 4], pa.timestamp("ns", tz="UTC")),
        "d": pa.array([0, 1, 2, 3, 4], pa.date32()),
    })
    p = prepare_documents(table, "recording", id_field="_id")
    why = "holds NaN or an infinite value (not storable as a number in JSON, refused by FerretDB)"
    assert p.rejected == [([1], "key column 'recording' is null"), ([2], f"column 'p' {why}"),
                          ([3], f"column 'w' {why}")]
    assert p.positions.tolist() == [4]        # "a" twice: the last row wins
    assert p.superseded == 1
    (doc,) = p.docs
    assert doc["_id"] == "a" and doc["p"] == 0.5
    assert doc["t"] == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert doc["d"] == dt.datetime(1970, 1, 5)
    kept = prepare_documents(table, "recording", reject_non_finite=False)
    assert kept.positions.tolist() == [2, 3, 4]
