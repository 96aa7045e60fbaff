"""A lean HTTP/1.1 keep-alive transport for ComfyUI's hot path, on asyncio streams.

httpx + httpcore + h11 + anyio cost about 0.6 ms of CPU per request to a local ComfyUI (bench ``overhead``),
more than the standard-library floor spends on a whole job. This transport does what a request to ComfyUI
needs and nothing else: one connection per request in flight (the client's request gate bounds them), idle
connections kept alive and dropped once the server closed them, ``Content-Length`` and chunked bodies, and
httpx's own exception types (``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError``...), so the client's
error mapping is unchanged. It is an ``httpx.AsyncBaseTransport``: the client keeps httpx's request and
response objects and its API; only the bytes on the wire skip httpx's pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

__all__ = ["H1Transport", "Response"]

_MAX_HEAD = 64 * 1024
EAGER_BYTES = 1 << 20
"""Bodies of a declared length up to this are read with their response's head, under one timer."""


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing() or self.reader._buffer)  # noqa: SLF001

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Body(httpx.AsyncByteStream):
    """A response body read from the connection as it is iterated; the connection goes back to the pool
    once the body was read to its end, and is closed otherwise."""

    def __init__(self, transport: H1Transport, conn: _Conn, length: int | None, chunked: bool, keep: bool,
                 timeout: float | None):
        self._t, self._conn = transport, conn
        self._length, self._chunked, self._keep = length, chunked, keep
        self._timeout = timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        try:
            if self._chunked:
                while True:
                    line = await self._t._read(reader.readline(), self._timeout)
                    try:
                        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    except ValueError:
                        raise httpx.RemoteProtocolError("malformed chunk size in the body") from None
                    if size == 0:
                        while (await self._t._read(reader.readline(), self._timeout)) not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    yield await self._t._read(reader.readexactly(size), self._timeout)
                    await self._t._read(reader.readexactly(2), self._timeout)
            elif self._length is not None:
                left = self._length
                while left > 0:
                    if reader._buffer:  # already here: no wait, so no timer
                        chunk = await reader.read(min(left, 1 << 20))
                    else:
                        chunk = await self._t._read(reader.read(min(left, 1 << 20)), self._timeout)
                    if not chunk:
                        raise httpx.RemoteProtocolError("the server closed the connection mid-body")
                    left -= len(chunk)
                    yield chunk
            else:  # delimited by the connection's end
                self._keep = False
                while chunk := await self._t._read(reader.read(1 << 20), self._timeout):
                    yield chunk
            self._done = True
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("the server closed the connection mid-body") from None

    async def aclose(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if self._done and self._keep:
            self._t._release(conn)
        else:
            conn.close()


class Response:
    """A response on the hot path: what ComfyClient reads of one (status, headers, body, JSON), without
    building httpx's request and response models. Header names are lower case."""

    __slots__ = ("_body", "_chunked", "_content", "_keep", "_length", "headers", "raw_headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], raw_headers: list[tuple[bytes, bytes]]):
        self.status_code = status_code
        self.headers = headers
        self.raw_headers = raw_headers
        self._content: bytes | None = None
        self._body: _Body | None = None
        self._length: int | None = None
        self._chunked = False
        self._keep = True

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise httpx.ResponseNotRead()
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    async def aread(self) -> bytes:
        if self._content is None:
            self._content = b"".join([chunk async for chunk in self.aiter_bytes()])
        return self._content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self._body is None:
            if self._content:
                yield self._content
            return
        body, self._body = self._body, None
        try:
            async for chunk in body:
                yield chunk
        finally:
            await body.aclose()

    async def aclose(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            await body.aclose()


def _parse_head(head: bytes, method: str) -> Response:
    lines = head[:-4].split(b"\r\n")
    status_line = lines[0]
    try:
        status = int(status_line.split(b" ", 2)[1])
        raw: list[tuple[bytes, bytes]] = []
        headers: dict[str, str] = {}
        length: int | None = None
        chunked = False
        keep = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            raw.append((name, value))
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
            if key == "content-length":
                length = int(value)
            elif key == "transfer-encoding" and "chunked" in text.lower():
                chunked = True
            elif key == "connection" and text.lower() == "close":
                keep = False
    except (ValueError, IndexError):
        raise httpx.RemoteProtocolError(f"malformed response head: {status_line[:80]!r}") from None
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        length, chunked = 0, False
    resp = Response(status, headers, raw)
    resp._length, resp._chunked, resp._keep = length, chunked, keep
    return resp


class H1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one host and port (``http://`` only; anything else belongs to httpx's own transport)."""

    def __init__(self, *, connect_timeout: float | None = 5.0, max_idle: int = 16):
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: collections.deque[_Conn] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    async def _read(awaitable: object, timeout: float | None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await awaitable  # type: ignore[misc]
        except TimeoutError:
            raise httpx.ReadTimeout("timed out reading the response") from None
        except (ConnectionError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from None

    async def _connect(self, host: str, port: int) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEAD)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return _Conn(reader, writer)

    def _release(self, conn: _Conn) -> None:
        if len(self._idle) < self.max_idle and conn.usable():
            self._idle.append(conn)
        else:
            conn.close()

    async def _acquire(self, host: str, port: int) -> tuple[_Conn, bool]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to the loop that opened them
            self._drop_idle()
            self._loop = loop
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn, True
            conn.close()
        return await self._connect(host, port), False

    def _drop_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        timeouts = request.extensions.get("timeout") or {}
        body = await request.aread()
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "host"]
        resp = await self.exchange(url.host, url.port or 80, url.netloc.decode("ascii"), request.method,
                                   url.raw_path.decode("ascii"), headers, body, timeouts.get("read"), stream=True)
        body = resp._body if resp._content is None else httpx.ByteStream(resp._content)
        out = httpx.Response(resp.status_code, headers=resp.raw_headers, stream=body)
        out.request = request
        return out

    async def exchange(self, host: str, port: int, netloc: str, method: str, target: str,
                       headers: list[tuple[str, str]], body: bytes, read_timeout: float | None,
                       stream: bool = False, eager: int = EAGER_BYTES) -> Response:
        """One request on a pooled connection. A body of a declared length up to ``eager`` bytes is read with
        the head, under its one timer; a longer one (or one of unknown length) is read here with a timer per
        read, or, with ``stream``, as the caller iterates ``aiter_bytes``."""
        head = [f"{method} {target} HTTP/1.1", f"Host: {netloc}"]
        for key, value in headers:
            if key.lower() not in ("host", "content-length", "transfer-encoding", "connection"):
                head.append(f"{key}: {value}")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        wire = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (1, 2):
            conn, reused = await self._acquire(host, port)
            reader = conn.reader
            answered = False  # whether any byte of an answer came (else a GET on a reused connection is retried)
            try:
                conn.writer.write(wire)
                # One timer, one read for the whole head (a timer or a read per line costs more than the parsing).
                async with asyncio.timeout(read_timeout):
                    try:
                        head = await reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as exc:
                        answered = bool(exc.partial)
                        raise httpx.RemoteProtocolError(
                            "the server closed the connection " + ("mid-head" if answered else "without a response")
                        ) from None
                    except asyncio.LimitOverrunError:
                        answered = True
                        raise httpx.RemoteProtocolError(f"a response head over {_MAX_HEAD} bytes") from None
                    answered = True
                    resp = _parse_head(head, method)
                    length = resp._length
                    if length is not None and (length <= eager or len(reader._buffer) >= length):
                        # A short body (a ComfyUI answer, a small image), or one already in the reader's buffer:
                        # read now, streamed or not, without a body stream and its timer per read.
                        resp._content = await reader.readexactly(length) if length else b""
                break
            except TimeoutError:
                conn.close()
                raise httpx.ReadTimeout("timed out reading the response") from None
            except asyncio.IncompleteReadError:
                conn.close()
                raise httpx.RemoteProtocolError("the server closed the connection mid-body") from None
            except (httpx.RemoteProtocolError, ConnectionError, OSError) as exc:
                conn.close()
                # An idle connection the server had just closed: nothing was processed, ask on a fresh one.
                if reused and attempt == 1 and method == "GET" and not answered:
                    continue
                if isinstance(exc, httpx.RemoteProtocolError):
                    raise
                raise httpx.ReadError(str(exc) or type(exc).__name__) from None
            except BaseException:
                conn.close()
                raise
        if resp._content is None:
            # The body is still coming: read as it arrives, each read under read_timeout (as httpx does), so a
            # large body is bounded per read, not as a whole.
            resp._body = _Body(self, conn, resp._length, resp._chunked, resp._keep, read_timeout)
            if not stream:
                await resp.aread()
        elif resp._keep:
            self._release(conn)
        else:
            conn.close()
        return resp

    async def aclose(self) -> None:
        self._drop_idle()
