"""handlers.webhdfs against a fake NameNode/DataNode (aiohttp test server)."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from handlers.webhdfs import AlreadyExists, NotFound, WebHdfs, WebHdfsError
from pipeline import RetryPolicy

FAST = RetryPolicy(max_attempts=4, backoff=0.0, jitter=0.0)


def remote(status: int, exception: str, message: str) -> web.Response:
    body = {"RemoteException": {"exception": exception, "javaClassName": f"x.{exception}",
                                "message": message + "\n\tat org.apache.Foo(Foo.java:1)"}}
    return web.json_response(body, status=status)


class FakeWebHdfs:
    """A NameNode that redirects data operations to a 'DataNode' on the same server."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str, int]] = []   # (method, op, role, body bytes)
        self.script: list[web.Response] = []     # next answers, before the normal ones
        self.users: set[str] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        op = request.query.get("op", "")
        role = "dn" if "datanode" in request.query else "nn"
        body = await request.read()
        self.requests.append((request.method, op, role, len(body)))
        self.users.add(request.query.get("user.name", ""))
        if self.script:
            return self.script.pop(0)
        path = request.match_info["path"]
        path = "/" + path
        if op in ("CREATE", "APPEND", "OPEN") and role == "nn":
            assert not body, "the NameNode must not receive the data"
            location = str(request.url.update_query({"datanode": "true"}))
            return web.Response(status=307, headers={"Location": location})
        if op == "CREATE":
            if path in self.files and request.query.get("overwrite") == "false":
                return remote(403, "FileAlreadyExistsException", f"{path} already exists")
            self.files[path] = body
            return web.Response(status=201)
        if op == "APPEND":
            self.files[path] += body
            return web.Response(status=200)
        if op == "OPEN":
            if path not in self.files:
                return remote(404, "FileNotFoundException", f"File {path} not found.")
            data = self.files[path]
            off = int(request.query.get("offset", 0))
            return web.Response(body=data[off:])
        if op == "GETFILESTATUS":
            if path not in self.files:
                return remote(404, "FileNotFoundException", f"File does not exist: {path}")
            return web.json_response({"FileStatus": {"pathSuffix": "", "type": "FILE",
                                                     "length": len(self.files[path]),
                                                     "modificationTime": 1000}})
        if op == "LISTSTATUS":
            entries = [{"pathSuffix": p.rsplit("/", 1)[1], "type": "FILE", "length": len(d),
                        "modificationTime": 2000} for p, d in sorted(self.files.items())
                       if p.rsplit("/", 1)[0] == path]
            return web.json_response({"FileStatuses": {"FileStatus": entries}})
        if op == "RENAME":
            dst = request.query["destination"]
            ok = path in self.files and dst not in self.files
            if ok:
                self.files[dst] = self.files.pop(path)
            return web.json_response({"boolean": ok})
        if op == "DELETE":
            return web.json_response({"boolean": self.files.pop(path, None) is not None})
        if op == "MKDIRS":
            return web.json_response({"boolean": True})
        return remote(400, "IllegalArgumentException", f"Invalid value for webhdfs op {op}")


@pytest.fixture
async def server() -> AsyncIterator[tuple[FakeWebHdfs, str]]:
    fake = FakeWebHdfs()
    app = web.Application()
    app.router.add_route("*", "/webhdfs/v1/{path:.*}", fake.handle)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield fake, str(srv.make_url("")).rstrip("/")
    finally:
        await srv.close()


async def test_create_follows_the_redirect_and_sends_data_to_the_datanode(
        server: tuple[FakeWebHdfs, str]) -> None:
    fake, url = server
    async with WebHdfs(url, user="etl", retry=FAST) as fs:
        await fs.create("/lake/date=2026-01-01/recording=A/part.parquet", b"hello")
        assert await fs.open("/lake/date=2026-01-01/recording=A/part.parquet") == b"hello"
        await fs.append("/lake/date=2026-01-01/recording=A/part.parquet", b" world")
        assert await fs.open("/lake/date=2026-01-01/recording=A/part.parquet",
                             offset=6) == b"world"
    assert fake.requests[:2] == [("PUT", "CREATE", "nn", 0), ("PUT", "CREATE", "dn", 5)]
    assert fake.users == {"etl"}


async def test_metadata_operations(server: tuple[FakeWebHdfs, str]) -> None:
    _, url = server
    async with WebHdfs(url + "/webhdfs/v1", retry=FAST) as fs:
        await fs.create("/d/a", b"1")
        await fs.create("/d/b", b"22")
        assert [(s.name, s.length, s.path) for s in await fs.list_status("/d")] == \
            [("a", 1, "/d/a"), ("b", 2, "/d/b")]
        st = await fs.get_file_status("/d/b")
        assert (st.type, st.length, st.modification_time, st.is_dir) == ("FILE", 2, 1.0, False)
        assert await fs.exists("/d/a") and not await fs.exists("/d/zz")
        assert await fs.rename("/d/a", "/d/c")
        assert not await fs.rename("/d/b", "/d/c")    # HDFS never overwrites
        assert await fs.delete("/d/c") and not await fs.delete("/d/c")
        assert await fs.mkdirs("/x/y")


async def test_transient_errors_are_retried_and_reported(server: tuple[FakeWebHdfs, str]) -> None:
    fake, url = server
    states: list[tuple[bool, str]] = []
    retries: list[str] = []
    fake.script = [web.Response(status=503, text="busy"),
                   remote(403, "SafeModeException", "Name node is in safe mode."),
                   remote(403, "RetriableException", "NameNode still not started"),
                   web.Response(status=502, text="bad gateway")]
    async with WebHdfs(url, timeout=5, retry=RetryPolicy(max_attempts=5, backoff=0, jitter=0),
                       on_state=lambda ok, d: states.append((ok, d)),
                       on_retry=lambda op, n, exc, pause: retries.append(op)) as fs:
        await fs.mkdirs("/a")
    assert retries == ["MKDIRS"] * 4
    assert [ok for ok, _ in states] == [False, True]
    assert "HTTP 503" in states[0][1]


async def test_permanent_errors_fail_at_once_with_the_remote_exception(
        server: tuple[FakeWebHdfs, str]) -> None:
    fake, url = server
    async with WebHdfs(url, timeout=5, retry=FAST) as fs:
        with pytest.raises(NotFound, match=r"OPEN /nope: HTTP 404 FileNotFoundException: "
                                           r"File /nope not found\.$"):
            await fs.open("/nope")
        await fs.create("/f", b"x")
        with pytest.raises(AlreadyExists):
            await fs.create("/f", b"y", overwrite=False)
        fake.script = [remote(403, "AccessControlException", "Permission denied: user=x")]
        with pytest.raises(WebHdfsError, match="AccessControlException") as exc:
            await fs.mkdirs("/secret")
        assert not exc.value.transient
        n = len(fake.requests)
        fake.script = [remote(500, "FileNotFoundException", "gone")]
        with pytest.raises(NotFound):
            await fs.delete("/gone")
        assert len(fake.requests) == n + 1        # not retried despite the 500


async def test_retries_give_up_after_max_attempts(server: tuple[FakeWebHdfs, str]) -> None:
    fake, url = server
    fake.script = [web.Response(status=500, text="boom") for _ in range(10)]
    async with WebHdfs(url, timeout=5, retry=RetryPolicy(max_attempts=3, backoff=0, jitter=0)) as fs:
        with pytest.raises(WebHdfsError, match="HTTP 500") as exc:
            await fs.get_file_status("/x")
    assert exc.value.transient and len(fake.requests) == 3


async def test_append_is_not_retried_once_data_reached_the_datanode(
        server: tuple[FakeWebHdfs, str]) -> None:
    fake, url = server
    async with WebHdfs(url, timeout=5, retry=FAST) as fs:
        await fs.create("/f", b"x")
        n = len(fake.requests)
        redirect = web.Response(status=307, headers={
            "Location": f"{url}/webhdfs/v1/f?op=APPEND&datanode=true"})
        fake.script = [redirect, web.Response(status=503, text="datanode busy")]
        with pytest.raises(WebHdfsError, match="not retried") as exc:
            await fs.append("/f", b"y")
        assert not exc.value.transient and len(fake.requests) == n + 2
        # a failure at the NameNode, before any data was sent, is retried
        fake.script = [web.Response(status=503, text="namenode busy")]
        await fs.append("/f", b"z")
        assert fake.files["/f"] == b"xz"


async def test_connection_refused_is_transient() -> None:
    async with WebHdfs("http://127.0.0.1:9", retry=RetryPolicy(max_attempts=2, backoff=0,
                                                               jitter=0)) as fs:
        with pytest.raises(WebHdfsError, match="no response") as exc:
            await fs.mkdirs("/a")
    assert exc.value.transient


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="http"):
        WebHdfs("hdfs://nn:8020")


async def test_relative_paths_are_refused(server: tuple[FakeWebHdfs, str]) -> None:
    _, url = server
    async with WebHdfs(url) as fs:
        with pytest.raises(ValueError, match="absolute"):
            await fs.mkdirs("relative/path")
