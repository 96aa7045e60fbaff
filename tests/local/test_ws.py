"""The lean websocket client of ComfyUI's /ws (gpubridge.comfy._ws) against scripted servers on loopback: the
handshake and its refusals, frames of every length class, fragments, pings, the closing handshake, a masked
server frame, frames over max_size, and the keepalive that drops a socket whose pongs stopped."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gpubridge.comfy import _ws

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = False) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    flag = 0x80 if masked else 0
    if n < 126:
        head += bytes([flag | n])
    elif n < 1 << 16:
        head += bytes([flag | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([flag | 127]) + n.to_bytes(8, "big")
    return head + (b"\0\0\0\0" + payload if masked else payload)


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    assert b1 & 0x80, "client frames are masked"
    n = b1 & 0x7F
    key = await reader.readexactly(4)
    data = await reader.readexactly(n)
    return b0 & 0x0F, bytes(c ^ key[i % 4] for i, c in enumerate(data))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def ws_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    servers = []

    async def start(after_open: Handler, *, status: str = "101 Switching Protocols", accept: bytes | None = None,
                    seen: list[bytes] | None = None) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            if seen is not None:
                seen.append(head)
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            good = base64.b64encode(hashlib.sha1(key + GUID).digest())
            writer.write(b"HTTP/1.1 " + status.encode() + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + (accept or good) + b"\r\n\r\n")
            try:
                await after_open(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/ws?clientId=abc"

    yield start
    for srv in servers:
        srv.close()


async def test_frames_of_every_length_and_fragments_arrive_in_order_and_pings_are_answered(ws_server):
    big = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length
    pong: list[tuple[int, bytes]] = []

    async def script(reader, writer):
        writer.write(frame(0x1, b'{"type": "status"}'))  # the first message, before deliver()
        writer.write(frame(0x2, b"x" * 300))  # a 16-bit length
        writer.write(frame(0x9, b"ping!"))
        # a text message in three fragments
        writer.write(frame(0x1, b"hel", fin=False) + frame(0x0, b"lo ", fin=False) + frame(0x0, "wörld".encode()))
        writer.write(frame(0x2, big))
        await writer.drain()
        pong.append(await read_client_frame(reader))
        writer.write(frame(0x8, (1000).to_bytes(2, "big")))
        await writer.drain()
        pong.append(await read_client_frame(reader))  # the close echoed

    url = await ws_server(script)
    ws = await _ws.connect(url, max_size=1 << 20, ping_interval=None)
    assert await ws.first() == '{"type": "status"}'
    texts: list[str] = []
    binaries: list[bytes] = []
    ws.deliver(texts.append, binaries.append)
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert texts == ["hello wörld"]
    assert binaries == [b"x" * 300, big]
    assert pong == [(0xA, b"ping!"), (0x8, (1000).to_bytes(2, "big"))]


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


async def test_frames_cut_anywhere_across_reads_are_put_back_together():
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    proto = _ws.LeanWebSocket(key, max_size=1 << 20, ping_interval=None, ping_timeout=None)
    proto.connection_made(_Transport())
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    wire = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    big = b"y" * 70_000
    wire += frame(0x1, b"first") + frame(0x1, b"a", fin=False) + frame(0x0, b"b") + frame(0x2, big)
    wire += frame(0x2, b"z" * 200)
    got: list[object] = []
    for size in (1, 2, 3, 7, 64, 1000):  # every cut: inside the handshake, a header, a length, a payload
        proto = _ws.LeanWebSocket(key, max_size=1 << 20, ping_interval=None, ping_timeout=None)
        proto.connection_made(_Transport())
        for i in range(0, len(wire), size):
            proto.data_received(wire[i:i + size])
        assert await proto.first() == "first"
        got.clear()
        proto.deliver(got.append, got.append)
        assert got == ["ab", big, b"z" * 200], size


async def test_a_refused_upgrade_a_wrong_accept_and_nothing_listening(ws_server):
    async def idle(reader, writer):
        await reader.read()

    url = await ws_server(idle, status="403 Forbidden")
    with pytest.raises(_ws.InvalidStatus) as info:
        await _ws.connect(url)
    assert info.value.status_code == 403
    url = await ws_server(idle, accept=b"bm90IHRoZSByaWdodCBrZXk=")
    with pytest.raises(_ws.InvalidHandshake):
        await _ws.connect(url)
    with pytest.raises(OSError):
        await _ws.connect("ws://127.0.0.1:1/ws")


async def test_headers_and_user_agent_go_with_the_upgrade(ws_server):
    seen: list[bytes] = []

    async def script(reader, writer):
        writer.write(frame(0x1, b"{}"))
        await reader.read()

    url = await ws_server(script, seen=seen)
    ws = await _ws.connect(url, headers={"Authorization": "Bearer t"}, ping_interval=None)
    await ws.first()
    await ws.close(timeout=0.5)
    head = seen[0].decode()
    assert head.startswith("GET /ws?clientId=abc HTTP/1.1\r\n")
    assert "Authorization: Bearer t\r\n" in head and "User-Agent: gpubridge\r\n" in head


@pytest.mark.parametrize("bad", ["masked", "too_large"])
async def test_a_masked_server_frame_or_one_over_max_size_closes_the_socket(ws_server, bad):
    async def script(reader, writer):
        writer.write(frame(0x1, b"{}"))
        writer.write(frame(0x1, b"x" * 200, masked=bad == "masked"))
        await writer.drain()
        await reader.read()

    url = await ws_server(script)
    ws = await _ws.connect(url, max_size=100, ping_interval=None)
    await ws.first()
    got: list[str] = []
    ws.deliver(got.append, lambda b: None)
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert got == []


async def test_a_socket_whose_pong_never_comes_is_dropped_and_one_that_answers_is_kept(ws_server):
    async def silent(reader, writer):
        writer.write(frame(0x1, b"{}"))
        await reader.read()  # reads the pings, never answers

    url = await ws_server(silent)
    ws = await _ws.connect(url, ping_interval=0.05, ping_timeout=0.05)
    await ws.first()
    ws.deliver(lambda t: None, lambda b: None)
    await asyncio.wait_for(ws.wait_closed(), 5)

    pings = asyncio.Queue()

    async def answering(reader, writer):
        writer.write(frame(0x1, b"{}"))
        while True:
            opcode, payload = await read_client_frame(reader)
            if opcode == 0x9:
                writer.write(frame(0xA, payload))
                await pings.put(payload)

    url = await ws_server(answering)
    ws = await _ws.connect(url, ping_interval=0.02, ping_timeout=0.05)
    await ws.first()
    ws.deliver(lambda t: None, lambda b: None)
    for _ in range(5):  # five pings answered, each after its predecessor's pong: the socket stays open
        await asyncio.wait_for(pings.get(), 5)
    assert not ws.closed
    await ws.close(timeout=0.5)
    assert ws.closed


async def test_a_handler_error_is_logged_and_later_frames_still_arrive(ws_server, caplog):
    async def script(reader, writer):
        writer.write(frame(0x1, b"{}") + frame(0x1, b"boom") + frame(0x1, b"after"))
        await writer.drain()
        await reader.read()

    url = await ws_server(script)
    ws = await _ws.connect(url, ping_interval=None)
    await ws.first()
    got: list[str] = []
    done = asyncio.Event()

    def handle(text: str) -> None:
        if text == "boom":
            raise RuntimeError("handler failed")
        got.append(text)
        done.set()

    ws.deliver(handle, lambda b: None)
    await asyncio.wait_for(done.wait(), 5)
    assert got == ["after"] and not ws.closed
    assert "frame handler error" in caplog.text
    await ws.close(timeout=0.5)
