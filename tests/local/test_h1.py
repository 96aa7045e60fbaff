"""The HTTP/1.1 transport of ComfyUI's hot path (gpubridge.comfy._h1) against a scripted server on loopback:
length and chunked bodies, keep-alive reuse, a connection the server closed while idle, ``Connection: close``,
a body cut short, a read timeout; httpx's exception types throughout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from gpubridge.comfy._h1 import H1Transport

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], "asyncio.Future[None] | None"]


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., tuple[str, int, list[int]]]]:
    servers = []

    async def start(answer) -> tuple[str, int, list[int]]:
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            n = 0
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    body = await reader.readexactly(length)
                    n += 1
                    if await answer(writer, head, body, n) is False:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return "127.0.0.1", srv.sockets[0].getsockname()[1], connections

    yield start
    for srv in servers:
        srv.close()


async def _get(t: H1Transport, port: int, target: str = "/x", method: str = "GET", body: bytes = b"",
               timeout: float | None = 5.0) -> httpx.Response:
    resp = await t.exchange("127.0.0.1", port, f"127.0.0.1:{port}", method, target, [], body, timeout)
    await resp.aread()
    return resp


async def test_length_and_chunked_bodies_on_one_kept_alive_connection(server):
    async def answer(writer, head, body, n):
        if head.startswith(b"POST"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    _, port, conns = await server(answer)
    t = H1Transport()
    try:
        posted = await _get(t, port, "/prompt", "POST", b'{"a": 1}')
        assert posted.status_code == 200 and posted.json() == {"a": 1}
        assert posted.headers["content-type"] == "application/json"
        chunked = await _get(t, port)
        assert chunked.content == b"hello world"
        assert (await _get(t, port)).content == b"hello world"
    finally:
        await t.aclose()
    assert len(conns) == 1  # every request reused the one connection


async def test_an_idle_connection_the_server_closed_is_replaced_for_a_get(server):
    async def answer(writer, head, body, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False  # close after each answer, without saying so

    _, port, conns = await server(answer)
    t = H1Transport()
    try:
        assert (await _get(t, port)).content == b"ok"
        # Whether the server's FIN has arrived yet (the idle connection is dropped) or not (the GET meets an
        # empty answer and is asked again on a fresh connection), the second GET succeeds.
        assert (await _get(t, port)).content == b"ok"
    finally:
        await t.aclose()
    assert len(conns) == 2


async def test_connection_close_and_a_cut_body_and_refused_and_timeout(server):
    async def answer(writer, head, body, n):
        if b"/close" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
        elif b"/cut" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            await writer.drain()
            return False
        elif b"/slow" in head:
            await asyncio.sleep(1)  # the server is slow; the client's read timeout is what is tested
        await writer.drain()

    _, port, conns = await server(answer)
    t = H1Transport()
    try:
        assert (await _get(t, port, "/close")).content == b"x"
        assert not t._idle  # not kept: the server said close
        with pytest.raises(httpx.RemoteProtocolError, match="mid-body"):
            await _get(t, port, "/cut")
        with pytest.raises(httpx.ReadTimeout):
            await _get(t, port, "/slow", timeout=0.05)
    finally:
        await t.aclose()
    with pytest.raises(httpx.ConnectError):
        await _get(H1Transport(), 1)


async def test_a_streamed_body_returns_its_connection_only_when_read_to_the_end(server):
    async def answer(writer, head, body, n):
        if b"/partial" in head:  # the head and half the body: the rest never comes
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
            await writer.drain()
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 6\r\n\r\nabcdef")
        await writer.drain()

    _, port, conns = await server(answer)
    t = H1Transport()
    where = ("127.0.0.1", port, f"127.0.0.1:{port}")
    try:
        resp = await t.exchange(*where, "GET", "/view", [], b"", 5.0, stream=True, eager=0)
        assert resp.headers["content-type"] == "image/png" and resp.headers.get("content-length") == "6"
        assert b"".join([c async for c in resp.aiter_bytes()]) == b"abcdef"
        await resp.aclose()
        assert len(t._idle) == 1  # read to its end: kept alive
        resp = await t.exchange(*where, "GET", "/view", [], b"", 5.0, stream=True)  # eager: short, read with the head
        assert resp._content == b"abcdef" and len(t._idle) == 1  # and its connection back at once
        await resp.aclose()
        resp = await t.exchange(*where, "GET", "/partial", [], b"", 5.0, stream=True, eager=0)
        assert resp._content is None  # still streaming
        await resp.aclose()  # abandoned before its body was read: that connection cannot be reused
        assert not t._idle
        assert (await _get(t, port)).content == b"abcdef"
    finally:
        await t.aclose()
    assert len(conns) == 2
