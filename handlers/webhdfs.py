"""A small asyncio WebHDFS client (aiohttp): what the lake sink, the Spark-job handler
and the tests need, nothing more.

    async with WebHdfs("http://127.0.0.1:9870", user="etl") as fs:
        await fs.create("/lake/x.parquet", data)            # NameNode 307 -> DataNode
        await fs.rename("/lake/x.parquet", "/lake/y.parquet")
        for st in await fs.list_status("/lake"):
            print(st.name, st.length)

Operations: ``create`` (overwrite or not), ``append``, ``open`` (read, optionally a
range), ``rename``, ``delete``, ``mkdirs``, ``list_status``, ``get_file_status``
and ``exists``. Writes and reads follow the NameNode's ``307 Temporary Redirect`` to
the DataNode by hand (the body goes only to the DataNode).

Errors
    Every failure raises :class:`WebHdfsError` naming the operation, the path, the
    HTTP status and the server's ``RemoteException`` (class and message).
    :class:`NotFound` (``FileNotFoundException``) and :class:`AlreadyExists`
    (``FileAlreadyExistsException``) are subclasses so callers can branch on them.

Retries
    Connection errors, timeouts, HTTP 5xx and ``RemoteException`` kinds that the
    NameNode uses for "try again" (safe mode while it restarts, ``RetriableException``,
    ``StandbyException``...) are retried with exponential backoff and jitter
    (``retry``, a :class:`pipeline.RetryPolicy`; the default covers a NameNode restart
    of ~30 s). Each retry starts over at the NameNode (a fresh redirect). Anything
    else (not found, permission, bad argument...) fails at once. ``append`` is not
    idempotent: it is retried only when the failure happened before any data was sent
    to the DataNode.

Connection state
    ``on_state(connected, detail)`` (optional) is called when a request fails with a
    transient error (``False``) and when one succeeds again (``True``); handlers
    forward it to ``set_connected`` so ``/readyz`` reflects an HDFS outage.
"""
from __future__ import annotations

import dataclasses
import getpass
import json
from collections.abc import Callable
from typing import Any, Self
from urllib.parse import quote

import aiohttp
from yarl import URL

from pipeline import RetryPolicy

__all__ = ["AlreadyExists", "FileStatus", "NotFound", "WebHdfs", "WebHdfsError"]

#: RemoteException classes that mean "the service is (re)starting, try again"
TRANSIENT_EXCEPTIONS = frozenset({
    "SafeModeException", "RetriableException", "StandbyException",
    "ObserverRetryOnActiveException", "ConnectException", "ConnectTimeoutException",
    "NoRouteToHostException", "SocketTimeoutException", "ServerNotRunningYetException",
    "NotReplicatedYetException", "EOFException",
})
#: RemoteException classes that never succeed on retry, even behind an HTTP 5xx
PERMANENT_EXCEPTIONS = frozenset({
    "FileNotFoundException", "FileAlreadyExistsException", "AccessControlException",
    "ParentNotDirectoryException", "PathIsNotEmptyDirectoryException",
    "IllegalArgumentException", "UnsupportedOperationException", "InvalidPathException",
    "QuotaExceededException", "NSQuotaExceededException", "DSQuotaExceededException",
    "SecurityException", "AlreadyBeingCreatedException", "HadoopIllegalArgumentException",
    "UnresolvedPathException", "PathIsNotDirectoryException",
})

DEFAULT_RETRY = RetryPolicy(max_attempts=10, backoff=0.5, max_backoff=8.0, multiplier=2.0,
                            jitter=0.3)


class WebHdfsError(Exception):
    """A WebHDFS operation failed: ``op``, ``path``, ``status``, ``exception``, ``message``."""

    def __init__(self, op: str, path: str, message: str, *, status: int | None = None,
                 exception: str | None = None, transient: bool = False) -> None:
        self.op, self.path, self.status = op, path, status
        self.exception, self.message, self.transient = exception, message, transient
        where = f"HTTP {status}" if status is not None else "no response"
        kind = f" {exception}" if exception else ""
        super().__init__(f"WebHDFS {op} {path}: {where}{kind}: {message}")


class NotFound(WebHdfsError):
    """The path does not exist (``FileNotFoundException``)."""


class AlreadyExists(WebHdfsError):
    """The path exists and the operation does not overwrite (``FileAlreadyExistsException``)."""


@dataclasses.dataclass(frozen=True)
class FileStatus:
    """One entry of ``LISTSTATUS`` / the answer of ``GETFILESTATUS``."""

    path: str                   # absolute path
    name: str                   # last path component
    type: str                   # "FILE" | "DIRECTORY" | "SYMLINK"
    length: int
    modification_time: float    # seconds since the epoch
    replication: int = 0
    owner: str = ""
    group: str = ""
    permission: str = ""

    @property
    def is_dir(self) -> bool:
        return self.type == "DIRECTORY"

    @classmethod
    def from_json(cls, path: str, doc: dict[str, Any]) -> FileStatus:
        suffix = doc.get("pathSuffix") or ""
        full = join(path, suffix) if suffix else path
        return cls(path=full, name=full.rstrip("/").rsplit("/", 1)[-1], type=doc.get("type", ""),
                   length=int(doc.get("length", 0)),
                   modification_time=int(doc.get("modificationTime", 0)) / 1000.0,
                   replication=int(doc.get("replication", 0)), owner=doc.get("owner", ""),
                   group=doc.get("group", ""), permission=str(doc.get("permission", "")))


def join(*parts: str) -> str:
    """Join HDFS path parts with single slashes: ``join("/a/", "b")`` → ``/a/b``."""
    out = "/".join(p.strip("/") for p in parts if p.strip("/"))
    return "/" + out


class _SentData(Exception):
    """A non-idempotent request failed after its body reached the DataNode."""

    def __init__(self, error: WebHdfsError) -> None:
        super().__init__(str(error))
        self.error = error


class WebHdfs:
    """An async WebHDFS client bound to one NameNode; use as an async context manager.

    ``url``: the NameNode's HTTP address (``http://host:9870``; a trailing
    ``/webhdfs/v1`` is accepted). ``user``: sent as ``user.name`` (simple auth);
    default: the current OS user. ``timeout``: seconds per HTTP request.
    """

    def __init__(self, url: str, *, user: str | None = None, retry: RetryPolicy | None = None,
                 timeout: float = 30.0, connections: int = 8,
                 on_state: Callable[[bool, str], None] | None = None,
                 on_retry: Callable[[str, int, BaseException, float], None] | None = None) -> None:
        base = url.rstrip("/")
        base = base.removesuffix("/webhdfs/v1")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"WebHDFS url must start with http:// or https://, got {url!r}")
        self.base = base
        self.user = user if user is not None else getpass.getuser()
        self.retry = retry or DEFAULT_RETRY
        self.timeout = timeout
        self.connections = connections
        self.on_state = on_state
        self.on_retry = on_retry
        self._session: aiohttp.ClientSession | None = None
        self._healthy = True

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.open_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open_session(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- operations --------------------------------------------------------------
    async def create(self, path: str, data: bytes, *, overwrite: bool = True,
                     permission: str | None = None, replication: int | None = None,
                     blocksize: int | None = None) -> None:
        """Write ``data`` as the whole file ``path`` (parents are created)."""
        params: dict[str, Any] = {"overwrite": "true" if overwrite else "false"}
        for key, value in (("permission", permission), ("replication", replication),
                           ("blocksize", blocksize)):
            if value is not None:
                params[key] = value
        await self._request("PUT", "CREATE", path, params, data=data, redirect=True,
                            expect=(201,))

    async def append(self, path: str, data: bytes) -> None:
        """Append ``data`` to the existing file ``path`` (see the note on retries)."""
        await self._request("POST", "APPEND", path, {}, data=data, redirect=True,
                            expect=(200,), idempotent=False)

    async def open(self, path: str, *, offset: int | None = None,
                   length: int | None = None) -> bytes:
        """The content of ``path`` (or ``length`` bytes from ``offset``)."""
        params = {k: v for k, v in (("offset", offset), ("length", length)) if v is not None}
        body = await self._request("GET", "OPEN", path, params, redirect=True, expect=(200,),
                                   read="bytes")
        assert isinstance(body, bytes)
        return body

    async def rename(self, src: str, dst: str) -> bool:
        """Rename ``src`` to ``dst``; False when HDFS refused (``dst`` exists, no ``src``...).

        HDFS never overwrites on rename: delete the destination first.
        """
        doc = await self._request("PUT", "RENAME", src, {"destination": dst})
        return bool(doc.get("boolean"))

    async def delete(self, path: str, *, recursive: bool = False) -> bool:
        """Delete ``path``; False when it did not exist."""
        doc = await self._request("DELETE", "DELETE", path,
                                  {"recursive": "true" if recursive else "false"})
        return bool(doc.get("boolean"))

    async def mkdirs(self, path: str, *, permission: str | None = None) -> bool:
        """Create ``path`` and its parents (True also when it already existed)."""
        params = {"permission": permission} if permission else {}
        doc = await self._request("PUT", "MKDIRS", path, params)
        return bool(doc.get("boolean"))

    async def list_status(self, path: str) -> list[FileStatus]:
        """The entries of directory ``path`` (raises :class:`NotFound`)."""
        doc = await self._request("GET", "LISTSTATUS", path, {})
        entries = doc.get("FileStatuses", {}).get("FileStatus", [])
        return [FileStatus.from_json(path, e) for e in entries]

    async def get_file_status(self, path: str) -> FileStatus:
        """The status of ``path`` (raises :class:`NotFound`)."""
        doc = await self._request("GET", "GETFILESTATUS", path, {})
        return FileStatus.from_json(path, doc.get("FileStatus", {}))

    async def exists(self, path: str) -> bool:
        try:
            await self.get_file_status(path)
        except NotFound:
            return False
        return True

    # -- plumbing ------------------------------------------------------------------
    def _url(self, path: str, op: str, params: dict[str, Any]) -> URL:
        if not path.startswith("/"):
            raise ValueError(f"WebHDFS paths are absolute, got {path!r}")
        query = {"op": op, "user.name": self.user, **{k: str(v) for k, v in params.items()}}
        qs = "&".join(f"{quote(k, safe='.')}={quote(v, safe='/')}" for k, v in query.items())
        return URL(f"{self.base}/webhdfs/v1{quote(path, safe='/=-_.~')}?{qs}", encoded=True)

    def _state(self, healthy: bool, detail: str) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            if self.on_state is not None:
                self.on_state(healthy, detail)

    async def _request(self, method: str, op: str, path: str, params: dict[str, Any], *,
                       data: bytes | None = None, redirect: bool = False,
                       expect: tuple[int, ...] = (200,), read: str = "json",
                       idempotent: bool = True) -> Any:
        if self._session is None:
            raise RuntimeError("WebHdfs client is not open: use `async with WebHdfs(...)`")

        async def attempt() -> Any:
            try:
                result = await self._once(method, op, path, params, data, redirect, expect,
                                          read, idempotent)
            except _SentData as exc:
                raise exc.error from None
            except WebHdfsError as exc:
                if exc.transient:
                    self._state(False, str(exc))
                raise
            self._state(True, "")
            return result

        def on_retry(attempt_no: int, exc: BaseException, pause: float) -> None:
            if self.on_retry is not None:
                self.on_retry(op, attempt_no, exc, pause)

        return await self.retry.call(attempt, retry_on=(_Transient,), on_retry=on_retry)

    async def _once(self, method: str, op: str, path: str, params: dict[str, Any],
                    data: bytes | None, redirect: bool, expect: tuple[int, ...], read: str,
                    idempotent: bool) -> Any:
        session = self._session
        assert session is not None
        url = self._url(path, op, params)
        try:
            async with session.request(method, url, allow_redirects=False) as resp:
                if not (redirect and resp.status in (302, 303, 307)):
                    return await _result(op, path, resp, expect, read)
                location = resp.headers.get("Location")
                if not location:
                    raise _error(op, path, resp.status, None, "redirect without a Location")
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _error(op, path, None, None, f"{type(exc).__name__}: {exc}",
                         transient=True) from exc
        # second leg: the DataNode (the body goes there only)
        headers = {"Content-Type": "application/octet-stream"} if data is not None else None
        try:
            async with session.request(method, URL(location, encoded=True), data=data,
                                       headers=headers, allow_redirects=False) as resp:
                return await _result(op, path, resp, expect, read)
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            err = _error(op, path, None, None, f"DataNode: {type(exc).__name__}: {exc}",
                         transient=True)
            if not idempotent:
                raise _SentData(_final(err)) from exc
            raise err from exc
        except WebHdfsError as err:
            if not idempotent and err.transient:
                raise _SentData(_final(err)) from None
            raise


def _final(err: WebHdfsError) -> WebHdfsError:
    """``err`` as a non-retried error (a non-idempotent request may have been applied)."""
    return WebHdfsError(err.op, err.path, err.message + " (not retried: the data may have "
                        "been partly applied)", status=err.status, exception=err.exception)


class _Transient(WebHdfsError):
    """A WebHdfsError worth retrying; the last one is raised once the retries are spent."""


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await resp.text()
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def _result(op: str, path: str, resp: aiohttp.ClientResponse, expect: tuple[int, ...],
                  read: str) -> Any:
    if resp.status in expect:
        if read == "bytes":
            return await resp.read()
        return await _json(resp)
    body = await resp.read()
    exception, message = None, body[:300].decode("utf-8", "replace").strip()
    try:
        remote = json.loads(body).get("RemoteException", {})
        exception = remote.get("exception") or None
        message = remote.get("message") or message
    except (ValueError, AttributeError):
        pass
    message = message.split("\n", 1)[0].strip()  # the first line, not the Java stack
    raise _error(op, path, resp.status, exception, message or resp.reason or "")


def _error(op: str, path: str, status: int | None, exception: str | None, message: str,
           transient: bool | None = None) -> WebHdfsError:
    if transient is None:
        if exception in PERMANENT_EXCEPTIONS:
            transient = False
        elif exception in TRANSIENT_EXCEPTIONS or "safe mode" in message.lower():
            transient = True
        else:
            transient = status is not None and status >= 500
    if exception == "FileNotFoundException" or (status == 404 and exception is None):
        return NotFound(op, path, message, status=status, exception=exception)
    if exception == "FileAlreadyExistsException":
        return AlreadyExists(op, path, message, status=status, exception=exception)
    cls = _Transient if transient else WebHdfsError
    return cls(op, path, message, status=status, exception=exception, transient=transient)
