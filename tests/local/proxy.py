"""A loopback TCP proxy that can break websocket connections the way networks do.

Every connection to the proxy is forwarded to ``127.0.0.1:target``. A connection whose request starts with
``GET /ws`` is a websocket pair; the test can then:

- ``reset_client_side(pair)``: reset (RST) the client's side and keep the server's side open, as a NAT or
  proxy timeout does: the client notices at once, ComfyUI only when ``close_server_side(pair)`` is called;
- ``blackhole(pair)``: keep both sides open but stop forwarding the server's bytes (an open, deaf socket);
- ``refuse_ws``: reset every new websocket connection at once (HTTP still passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


@dataclass(eq=False)
class Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    websocket: bool
    detached: bool = False  # the client side was reset: never propagate a close to the server side
    blackholed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.pairs: list[Pair] = []
        self.refuse_ws = False
        self.refused = 0
        self.changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def ws_pairs(self) -> list[Pair]:
        return [p for p in self.pairs if p.websocket]

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pair in self.pairs:
            pair.client.transport.abort()
            pair.server.transport.abort()
            for task in pair.tasks:
                task.cancel()
        for pair in self.pairs:
            for task in pair.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        """Return once ``predicate()`` holds; re-checked whenever a connection opens or is refused."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def _changed(self) -> None:
        self.changed.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.read(65536)
        websocket = head.startswith(b"GET /ws")
        if websocket and self.refuse_ws:
            self.refused += 1
            _rst(writer)
            self._changed()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        up_writer.write(head)
        pair = Pair(client=writer, server=up_writer, websocket=websocket)
        pair.tasks = [
            asyncio.create_task(self._pump(pair, reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(pair, up_reader, writer, upstream=False)),
        ]
        self.pairs.append(pair)
        self._changed()

    async def _pump(
        self, pair: Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if pair.detached and not upstream:
                    continue  # the client side is gone: whatever the server sends is lost
                if pair.blackholed and not upstream:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        if pair.detached and upstream:
            return  # the client was reset: the server side stays open until close_server_side()
        with contextlib.suppress(Exception):
            writer.close()

    def reset_client_side(self, pair: Pair) -> None:
        pair.detached = True
        _rst(pair.client)

    def close_server_side(self, pair: Pair) -> None:
        pair.server.transport.abort()

    def blackhole(self, pair: Pair) -> None:
        pair.blackholed = True

    def reset(self, pair: Pair) -> None:
        """Reset both sides at once."""
        pair.detached = True
        _rst(pair.client)
        pair.server.transport.abort()
