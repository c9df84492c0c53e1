"""es_sink's bulk handling against a fake Elasticsearch (aiohttp on a loopback port).

The fake answers the few endpoints the sink uses, with per-document scripted
statuses (201, 429, 503, 400...) and whole-request refusals.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from runtime_fakes import dead_reasons, run_into_sink

from handlers.es_sink import EsSinkSettings
from pipeline import Runtime

PRODUCT = {"X-Elastic-Product": "Elasticsearch"}


class FakeEs:
    def __init__(self) -> None:
        self.indices: dict[str, dict[str, Any]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.docs: dict[str, dict[str, Any]] = {}
        self.script: dict[str, list[int]] = {}   # _id -> statuses to answer, in turn
        self.request_status: list[int] = []      # whole-request statuses, in turn
        self.invalid_ids: set[str] = set()       # fail request validation when sent with others
        self.bulks: list[list[str]] = []         # ids per bulk request
        self.actions: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.info)
        app.router.add_route("HEAD", "/_index_template/{name}", self.template_exists)
        app.router.add_put("/_index_template/{name}", self.put_template)
        app.router.add_route("HEAD", "/{index}", self.exists)
        app.router.add_put("/{index}", self.create)
        app.router.add_get("/{index}/_mapping", self.mapping)
        app.router.add_post("/{index}/_bulk", self.bulk)
        app.router.add_put("/{index}/_bulk", self.bulk)
        return app

    @staticmethod
    def reply(body: Any, status: int = 200) -> web.Response:
        return web.json_response(body, status=status, headers=PRODUCT)

    async def info(self, request: web.Request) -> web.Response:
        return self.reply({"version": {"number": "9.5.3"}, "tagline": "You Know, for Search"})

    async def exists(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["index"] in self.indices else 404,
                            headers=PRODUCT)

    async def create(self, request: web.Request) -> web.Response:
        self.indices[request.match_info["index"]] = await request.json()
        return self.reply({"acknowledged": True})

    async def mapping(self, request: web.Request) -> web.Response:
        name = request.match_info["index"]
        return self.reply({name: {"mappings": self.indices[name].get("mappings", {})}})

    async def template_exists(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["name"] in self.templates else 404,
                            headers=PRODUCT)

    async def put_template(self, request: web.Request) -> web.Response:
        self.templates[request.match_info["name"]] = {**await request.json(),
                                                      "query": dict(request.query)}
        return self.reply({"acknowledged": True})

    async def bulk(self, request: web.Request) -> web.Response:
        lines = [json.loads(x) for x in (await request.text()).splitlines() if x.strip()]
        pairs = list(zip(lines[0::2], lines[1::2], strict=True))
        ids = [a["index"]["_id"] for a, _ in pairs]
        self.bulks.append(ids)
        self.actions += [a for a, _ in pairs]
        if self.request_status:
            status = self.request_status.pop(0)
            return self.reply({"error": {"type": "security_exception", "reason": "no"},
                               "status": status}, status=status)
        if len(ids) > 1 and self.invalid_ids & set(ids):
            return self.reply({"error": {"type": "action_request_validation_exception",
                                         "reason": "Validation Failed: 1: bad id;"},
                               "status": 400}, status=400)
        items = []
        for (_, doc), _id in zip(pairs, ids, strict=True):
            statuses = self.script.get(_id) or [201]
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            item: dict[str, Any] = {"_index": request.match_info["index"], "_id": _id,
                                    "status": status}
            if status < 300:
                self.docs[_id] = doc
            else:
                item["error"] = {"type": "es_rejected_execution_exception" if status == 429
                                 else "document_parsing_exception",
                                 "reason": f"status {status} for {_id}",
                                 "caused_by": {"type": "x", "reason": "deeper"}}
            items.append({"index": item})
        return self.reply({"errors": any(i["index"]["status"] >= 300 for i in items),
                           "took": 1, "items": items})


@pytest.fixture
async def fake_es() -> AsyncIterator[tuple[FakeEs, str]]:
    fake = FakeEs()
    runner = web.AppRunner(fake.app(), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def rows(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"recording": f"R{i:02d}", "probability": 0.5, "label": "control", **extra}
            for i in range(n)]


async def run(make_runtime: Any, url: str, data: list[dict[str, Any]], **sink: Any) -> Runtime:
    return await run_into_sink(make_runtime, "es", data,
                               {"type": "es_sink", "hosts": [url], "index": "diag", **sink})


async def test_429_and_5xx_items_are_retried_400_dead_lettered(make_runtime: Any,
                                                               fake_es: Any) -> None:
    fake, url = fake_es
    fake.script = {"R01": [429, 201], "R02": [503, 503, 201], "R03": [400]}
    rt = await run(make_runtime, url, rows(5))
    assert sorted(fake.docs) == ["R00", "R01", "R02", "R04"]
    assert fake.bulks == [["R00", "R01", "R02", "R03", "R04"], ["R01", "R02"], ["R02"]]
    assert dead_reasons(rt) == {"R03": "Elasticsearch refused the document (400): "
                               "document_parsing_exception: status 400 for R03 "
                               "(caused by x: deeper)"}
    assert fake.indices["diag"]["mappings"]["properties"]["diagnosed_at"] == {"type": "date"}


async def test_items_failing_past_every_retry_go_to_dead_letter(make_runtime: Any,
                                                                fake_es: Any) -> None:
    fake, url = fake_es
    fake.script = {"R01": [503]}
    rt = await run(make_runtime, url, rows(3))
    assert sorted(fake.docs) == ["R00", "R02"]
    assert list(dead_reasons(rt)) == ["R01"]
    assert "failed after 2 attempts: EsItemError: 503" in dead_reasons(rt)["R01"]
    # in-handler attempts (3) times runtime attempts (2), the first with every row
    assert [len(b) for b in fake.bulks] == [3, 1, 1, 1, 1, 1]


async def test_a_request_invalid_because_of_one_item_is_split(make_runtime: Any,
                                                               fake_es: Any) -> None:
    fake, url = fake_es
    fake.invalid_ids = {"R01"}
    fake.script = {"R01": [400]}
    rt = await run(make_runtime, url, rows(3))
    assert sorted(fake.docs) == ["R00", "R02"]
    assert list(dead_reasons(rt)) == ["R01"]
    assert fake.bulks == [["R00", "R01", "R02"], ["R00"], ["R01"], ["R02"]]


async def test_a_refused_request_fails_the_batch(make_runtime: Any, fake_es: Any) -> None:
    fake, url = fake_es
    fake.request_status = [401, 401]
    rt = await run(make_runtime, url, rows(2))
    assert fake.docs == {}
    reasons = set(dead_reasons(rt).values())
    assert len(reasons) == 1 and "AuthenticationException" in reasons.pop()


async def test_metadata_named_columns_stay_in_the_document(make_runtime: Any,
                                                           fake_es: Any) -> None:
    fake, url = fake_es
    await run(make_runtime, url, rows(1, version=3, routing="x", pipeline="p"))
    assert fake.docs["R00"]["version"] == 3 and fake.docs["R00"]["routing"] == "x"
    assert fake.actions == [{"index": {"_id": "R00"}}]


async def test_long_ids_never_reach_the_server(make_runtime: Any, fake_es: Any) -> None:
    fake, url = fake_es
    data = rows(2)
    data[0]["recording"] = "é" * 300  # 600 bytes in UTF-8
    rt = await run(make_runtime, url, data)
    assert fake.bulks == [["R01"]]
    assert dead_reasons(rt) == {"é" * 300: "_id longer than 512 bytes (Elasticsearch's limit)"}


async def test_template_mode(make_runtime: Any, fake_es: Any) -> None:
    fake, url = fake_es
    await run(make_runtime, url, rows(1), manage="template", template_name="diag-tpl",
              template_patterns=["diag*"], index_settings={"number_of_shards": 1})
    tpl = fake.templates["diag-tpl"]
    assert tpl["index_patterns"] == ["diag*"]
    assert tpl["template"]["settings"] == {"number_of_shards": 1}
    assert tpl["template"]["mappings"]["properties"]["probability"] == {"type": "float"}
    assert tpl["query"] == {"create": "true"}
    assert fake.indices == {}  # the first bulk creates it (from the template, on a real server)


async def test_manage_none_touches_nothing(make_runtime: Any, fake_es: Any) -> None:
    fake, url = fake_es
    await run(make_runtime, url, rows(1), manage="none")
    assert fake.indices == {} and fake.templates == {} and list(fake.docs) == ["R00"]


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        EsSinkSettings(index="Diagnoses")
    with pytest.raises(ValueError, match="api_key or username"):
        from pipeline import Secret
        EsSinkSettings(username="u", api_key=Secret("k"))
