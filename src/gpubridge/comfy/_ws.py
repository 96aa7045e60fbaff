"""A lean websocket client for ComfyUI's ``/ws``, on an asyncio protocol.

ComfyUI talks on its socket and the client only listens: about 14 frames per job (status broadcasts,
``execution_start``, ``executing``, ``progress_state``, ``executed``...). The ``websockets`` library parses each
frame through a generator, queues it in an assembler and wakes a reader task for it; this protocol parses frames
in ``data_received`` and hands each one to the client's callbacks at once, so a job's frames cost no task
switches at all. It speaks what a listening client needs of RFC 6455: the opening handshake (its
``Sec-WebSocket-Accept`` checked), unmasked server frames of any length up to ``max_size``, fragmented messages,
pings answered with pongs, the closing handshake, and keepalive pings of its own (a socket whose pong does not
come back within ``ping_timeout`` is aborted, as ``websockets`` does). No extensions are offered, so nothing
arrives compressed. ``wss://`` runs over asyncio's TLS with the default context.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["InvalidHandshake", "InvalidStatus", "LeanWebSocket", "connect"]

log = logging.getLogger("gpubridge.comfy")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 64 * 1024

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class InvalidHandshake(Exception):
    """The server did not complete a websocket opening handshake."""


class InvalidStatus(InvalidHandshake):
    """The server answered the upgrade with an HTTP status other than 101 (``status_code``)."""

    def __init__(self, status_code: int):
        super().__init__(f"server rejected the websocket connection: HTTP {status_code}")
        self.status_code = status_code


def _mask(payload: bytes) -> bytes:
    """A client frame's masking key followed by the masked payload (control frames: at most 125 bytes)."""
    key = os.urandom(4)
    if not payload:
        return key
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return key + (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class LeanWebSocket(asyncio.Protocol):
    """One client connection. Frames received before :meth:`deliver` wait in order; afterwards each text
    frame goes to ``on_text(str)`` and each binary frame to ``on_binary(bytes)`` as soon as it is parsed."""

    def __init__(self, key: bytes, *, max_size: int, ping_interval: float | None, ping_timeout: float | None):
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.transport: asyncio.Transport | None = None
        self._head: bytearray | None = bytearray()  # the handshake's answer, until it is complete
        self._opened: asyncio.Future[None] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._buf = bytearray()
        self._need = 0
        self._frag_op = 0
        self._frag: list[bytes] = []
        self._pending: list[tuple[int, bytes]] = []
        self._first: asyncio.Future[None] | None = None
        self._on_text: Callable[[str], None] | None = None
        self._on_binary: Callable[[bytes], None] | None = None
        self._close_sent = False
        self._ping_sent_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self.last_message_at = loop.time()
        """Loop time of the last read that brought a message (the client's silence detection)."""

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if not self._opened.done():
            self._opened.set_exception(ConnectionError("the server closed the connection during the handshake"))
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD:
                    self._fail_open(InvalidHandshake("the handshake's answer is too long"))
                return
            head, data = bytes(self._head[:end]), bytes(self._head[end + 4:])
            self._head = None
            self._handshake(head)
            if self.transport is None or self.transport.is_closing() or not data:
                return
        if self._buf:  # the rest of a frame: gather it without re-copying what came before
            self._buf += data
            if len(self._buf) < self._need:
                return
            buf = bytes(self._buf)
            self._buf = bytearray()
        else:
            buf = data
        n = len(buf)
        pos = 0
        need = 0
        on_text = self._on_text
        delivered = False
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            at = pos + 2
            if length == 126:
                if n - at < 2:
                    break
                length = int.from_bytes(buf[at:at + 2], "big")
                at += 2
            elif length == 127:
                if n - at < 8:
                    break
                length = int.from_bytes(buf[at:at + 8], "big")
                at += 8
            if b1 & 0x80:
                return self._fail(1002, "a server frame was masked")
            if length > self.max_size:
                return self._fail(1009, f"a frame of {length} bytes is over max_size")
            end = at + length
            if end > n:
                need = end - pos
                break
            pos = end
            if b0 == 0x81 and on_text is not None and not self._frag_op:  # a whole text message: the usual case
                delivered = True
                try:
                    on_text(buf[at:end].decode("utf-8"))
                except UnicodeDecodeError:
                    return self._fail(1007, "a text frame that is not UTF-8")
                except Exception:  # a frame the client could not handle must not end the connection
                    log.exception("ComfyUI websocket frame handler error")
                continue
            delivered = delivered or b0 & 0x0F in (TEXT, BINARY, 0)
            self._frame(b0 & 0x0F, b0 & 0x80, buf[at:end])
            if self.transport is None or self.transport.is_closing():
                return
        if delivered:
            self.last_message_at = self._loop.time()
        if pos < n:
            self._buf = bytearray(buf[pos:])
            self._need = need  # bytes the next frame needs in all (0: its header is not complete yet)

    # -- frames

    def _frame(self, opcode: int, fin: int, payload: bytes) -> None:
        if opcode == TEXT or opcode == BINARY:
            if self._frag_op:
                return self._fail(1002, "a new message inside a fragmented one")
            if fin:
                return self._message(opcode, payload)
            self._frag_op, self._frag = opcode, [payload]
            if len(payload) > self.max_size:
                self._fail(1009, "a message over max_size")
        elif opcode == 0:
            if not self._frag_op:
                return self._fail(1002, "a continuation frame outside a message")
            self._frag.append(payload)
            if sum(map(len, self._frag)) > self.max_size:
                return self._fail(1009, "a message over max_size")
            if fin:
                op, parts = self._frag_op, self._frag
                self._frag_op, self._frag = 0, []
                self._message(op, b"".join(parts))
        elif opcode == PING:
            self._send(PONG, payload)
        elif opcode == PONG:
            self._ping_sent_at = None
        elif opcode == CLOSE:
            if not self._close_sent:
                self._send(CLOSE, payload[:2])  # echo the code, as RFC 6455 asks
                self._close_sent = True
            assert self.transport is not None
            self.transport.close()
        else:
            self._fail(1002, f"unknown opcode {opcode}")

    def _message(self, opcode: int, payload: bytes) -> None:
        on_text = self._on_text
        if on_text is None:  # not delivering yet: keep it in order
            self._pending.append((opcode, payload))
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            return
        try:
            if opcode == TEXT:
                on_text(payload.decode("utf-8"))
            else:
                self._on_binary(payload)  # type: ignore[misc]
        except UnicodeDecodeError:
            self._fail(1007, "a text frame that is not UTF-8")
        except Exception:  # a frame the client could not handle must not end the connection
            log.exception("ComfyUI websocket frame handler error")

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + _mask(payload))

    def _fail(self, code: int, reason: str) -> None:
        log.warning("closing the ComfyUI websocket: %s", reason)
        if not self._close_sent:
            self._send(CLOSE, code.to_bytes(2, "big"))
            self._close_sent = True
        if self.transport is not None:
            self.transport.close()

    # -- handshake and keepalive

    def _handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (ValueError, IndexError):
            return self._fail_open(InvalidHandshake(f"malformed handshake answer: {lines[0][:80]!r}"))
        if status != 101:
            return self._fail_open(InvalidStatus(status))
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"upgrade", b"").lower() != b"websocket" or headers.get(b"sec-websocket-accept") != self._accept:
            return self._fail_open(InvalidHandshake("the server's handshake answer is not a websocket upgrade"))
        if headers.get(b"sec-websocket-extensions"):
            return self._fail_open(InvalidHandshake("the server negotiated an extension that was not offered"))
        self._opened.set_result(None)
        self.last_message_at = self._loop.time()
        if self.ping_interval:
            self._keepalive = self._loop.call_later(self.ping_interval, self._ping)

    def _fail_open(self, exc: Exception) -> None:
        self._head = None
        if not self._opened.done():
            self._opened.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _ping(self) -> None:
        """Every ``ping_interval``: a ping, unless the last one is still unanswered."""
        self._keepalive = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._ping_sent_at is None:
            sent = self._ping_sent_at = time.monotonic()
            self._send(PING, os.urandom(4))
            if self.ping_timeout:
                self._loop.call_later(self.ping_timeout, self._check_pong, sent)
        self._keepalive = self._loop.call_later(self.ping_interval or 20.0, self._ping)

    def _check_pong(self, sent: float) -> None:
        if self._ping_sent_at == sent and self.transport is not None and not self.transport.is_closing():
            log.warning("ComfyUI websocket: no pong within %gs; dropping the connection", self.ping_timeout)
            self.transport.abort()

    # -- the client's side

    async def first(self) -> str | bytes:
        """The first message (kept out of what :meth:`deliver` hands on later)."""
        while not self._pending:
            if self._closed.done():
                raise ConnectionError("the websocket closed before its first message")
            self._first = self._loop.create_future()
            await self._first
        opcode, payload = self._pending.pop(0)
        return payload.decode("utf-8") if opcode == TEXT else payload

    def deliver(self, on_text: Callable[[str], None], on_binary: Callable[[bytes], None]) -> None:
        """From now on hand every message to these callbacks, first those that waited."""
        self._on_text, self._on_binary = on_text, on_binary
        pending, self._pending = self._pending, []
        for opcode, payload in pending:
            self._message(opcode, payload)

    async def wait_closed(self) -> None:
        """Until the connection is gone (a cancelled waiter leaves it open)."""
        await asyncio.shield(self._closed)

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def close(self, timeout: float = 2.0) -> None:
        """The closing handshake: send a close frame, then wait (bounded) for the server to end the connection."""
        if self.transport is None or self._closed.done():
            return
        if not self._close_sent:
            self._send(CLOSE, (1000).to_bytes(2, "big"))
            self._close_sent = True
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except TimeoutError:
            self.transport.abort()
            await asyncio.shield(self._closed)  # connection_lost follows an abort at once


async def connect(url: str, *, headers: dict[str, str] | None = None, open_timeout: float | None = 10.0,
                  max_size: int = 1 << 20, ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0,
                  user_agent: str = "gpubridge") -> LeanWebSocket:
    """Open ``url`` (``ws://`` or ``wss://``). Raises :class:`InvalidStatus` when the server answers the upgrade
    with another status, :class:`InvalidHandshake` for any other broken answer, ``OSError`` when nothing
    listens and ``TimeoutError`` past ``open_timeout``."""
    split = urlsplit(url)
    secure = split.scheme == "wss"
    host = split.hostname or "127.0.0.1"
    port = split.port or (443 if secure else 80)
    target = (split.path or "/") + (f"?{split.query}" if split.query else "")
    key = base64.b64encode(os.urandom(16))
    loop = asyncio.get_running_loop()
    lines = [f"GET {target} HTTP/1.1", f"Host: {split.netloc}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13", f"User-Agent: {user_agent}"]
    for name, value in (headers or {}).items():
        if name.lower() not in ("host", "upgrade", "connection", "user-agent") and not name.lower().startswith(
                "sec-websocket-"):
            lines.append(f"{name}: {value}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(open_timeout):
            transport, proto = await loop.create_connection(
                lambda: LeanWebSocket(key, max_size=max_size, ping_interval=ping_interval, ping_timeout=ping_timeout),
                host, port, ssl=ssl.create_default_context() if secure else None,
                server_hostname=host if secure else None,
            )
            transport.write(request)  # type: ignore[attr-defined]
            await proto._opened
    except BaseException:
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]
        raise
    return proto
