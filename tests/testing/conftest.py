"""Fixtures for the ComfyUI double's tests: the recordings, a running double, HTTP and websocket clients."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpubridge.testing import ComfyDouble

CONTRACT = Path(__file__).resolve().parent.parent / "fixtures" / "comfyui-contract"
RECV_TIMEOUT = 10.0  # a safety net against hangs, never a synchronisation


@functools.cache
def _load(name: str) -> str:
    return (CONTRACT / name).read_text()


def recording(name: str) -> Any:
    """A fresh copy of one recording file of the real ComfyUI server."""
    return json.loads(_load(name))


@pytest.fixture
async def comfy(tmp_path: Path) -> AsyncIterator[ComfyDouble]:
    async with ComfyDouble(root=tmp_path / "comfy") as double:
        yield double


@pytest.fixture
async def http(comfy: ComfyDouble) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=comfy.url) as session:
        yield session


class WsClient:
    """A websocket client that records every frame: ("text", dict) or ("binary", bytes)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.frames: list[tuple[str, Any]] = []

    async def recv(self) -> tuple[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), RECV_TIMEOUT)
        if msg.type == aiohttp.WSMsgType.TEXT:
            frame = ("text", json.loads(msg.data))
        elif msg.type == aiohttp.WSMsgType.BINARY:
            frame = ("binary", msg.data)
        else:
            frame = ("closed", msg.type)
        self.frames.append(frame)
        return frame

    async def until(self, predicate: Callable[[tuple[str, Any]], bool]) -> list[tuple[str, Any]]:
        start = len(self.frames)
        while True:
            frame = await self.recv()
            if predicate(frame):
                return self.frames[start:]
            if frame[0] == "closed":
                raise ConnectionError(f"socket closed while waiting: {frame[1]}")

    async def until_type(self, kind: str) -> dict[str, Any]:
        frames = await self.until(lambda f: f[0] == "text" and f[1]["type"] == kind)
        return frames[-1][1]

    async def until_done(self, prompt_id: str) -> list[tuple[str, Any]]:
        """Frames up to and including ``executing`` with node null for ``prompt_id``."""
        return await self.until(
            lambda f: (
                f[0] == "text"
                and f[1]["type"] == "executing"
                and f[1]["data"].get("node") is None
                and f[1]["data"].get("prompt_id") == prompt_id
            )
        )

    def texts(self) -> list[dict[str, Any]]:
        return [f[1] for f in self.frames if f[0] == "text"]


@pytest.fixture
def connect(comfy: ComfyDouble, http: aiohttp.ClientSession):
    """``ws = await connect("client-id")``: an open websocket whose first (status) frame is consumed."""
    opened: list[aiohttp.ClientWebSocketResponse] = []

    async def _connect(
        client_id: str | None = None, *, feature_flags: dict | None = None, path: str = "/ws"
    ) -> WsClient:
        url = path if client_id is None else f"{path}?clientId={client_id}"
        ws = await http.ws_connect(url)
        opened.append(ws)
        client = WsClient(ws)
        if feature_flags is not None:
            await ws.send_json({"type": "feature_flags", "data": feature_flags})
        await client.until_type("status")
        return client

    yield _connect


def message_types(frames: list[tuple[str, Any]]) -> list[str]:
    return [f[1]["type"] if f[0] == "text" else f"binary:{int.from_bytes(f[1][:4], 'big')}" for f in frames]


def recorded_types(messages: list[dict[str, Any]]) -> list[str]:
    out = []
    for m in messages:
        if m.get("direction", "server->client") != "server->client":
            continue
        if m.get("kind") == "binary":
            out.append(f"binary:{m['event_type']}")
        else:
            out.append(m["json"]["type"])
    return out


_JSON_TYPES = (bool, int, float, str, type(None))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


# dict-valued keys whose own keys are ids (node ids, prompt ids, input names), not a fixed schema
DYNAMIC_KEYS = {
    "outputs",
    "meta",
    "nodes",
    "node_errors",
    "current_inputs",
    "input",
    "required",
    "optional",
    "history",
    "body",
}


def assert_shape(
    actual: Any, expected: Any, path: str = "$", *, dynamic: bool = False, numbers: bool = False
) -> None:
    """``actual`` has the recorded structure: same keys and JSON value types, recursively.

    Dicts under a key in DYNAMIC_KEYS (or with ``dynamic``) may have other keys; their values are
    compared with the recorded values' shape. Lists are compared element-wise against the recorded
    first element (or position by position when they are tuples of fixed length, like queue items).
    ``numbers``: int and float count as one type.
    """
    ka, ke = _kind(actual), _kind(expected)
    if numbers and {ka, ke} <= {"int", "float"}:
        return
    assert ka == ke, f"{path}: {ka} ({actual!r:.80}) where the recording has {ke} ({expected!r:.80})"
    if ke == "dict":
        if dynamic:
            if expected:
                sample = next(iter(expected.values()))
                for key, value in actual.items():
                    assert_shape(value, expected.get(key, sample), f"{path}.{key}", numbers=numbers)
            return
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != recorded {sorted(expected)}"
        for key in expected:
            assert_shape(
                actual[key], expected[key], f"{path}.{key}", dynamic=key in DYNAMIC_KEYS, numbers=numbers
            )
    elif ke == "list":
        if not expected or not actual:
            return
        heterogeneous = len({_kind(x) for x in expected}) > 1
        if heterogeneous:
            assert len(actual) == len(expected), f"{path}: {len(actual)} items, recorded {len(expected)}"
        if heterogeneous or len(actual) == len(expected):
            for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
                assert_shape(a, e, f"{path}[{i}]", numbers=numbers)
        else:
            for i, a in enumerate(actual):
                assert_shape(a, expected[0], f"{path}[{i}]", numbers=numbers)


def png_info(data: bytes) -> dict[str, Any]:
    """The fields the recordings describe PNGs with: size, bit depth, colour type, text chunk keywords."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, info, texts = 8, {}, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if tag == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            info.update(format="png", png_width=w, png_height=h, png_bit_depth=depth, png_color_type=color)
        elif tag in (b"tEXt", b"comf"):
            key, _, value = body.partition(b"\x00")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        elif tag == b"zTXt":
            key, _, rest = body.partition(b"\x00")
            texts[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        pos += 12 + length
    info["png_text_keywords"] = list(texts)
    info["texts"] = texts
    return info


def recorded_png(desc: dict[str, Any]) -> dict[str, Any]:
    """The comparable part of a recorded PNG description."""
    out = {k: desc[k] for k in ("format", "png_width", "png_height", "png_bit_depth", "png_color_type")}
    out["png_text_keywords"] = [c["keyword"] for c in desc.get("png_text_chunks", [])]
    return out


def small_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (width, height), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def bare_model_files() -> dict[str, list[str]]:
    """No model files at all, as on the recording machine."""
    from gpubridge.testing import DEFAULT_MODEL_FILES

    return {folder: [] for folder in DEFAULT_MODEL_FILES}


@pytest.fixture
async def bare_comfy(tmp_path: Path) -> AsyncIterator[ComfyDouble]:
    """A double configured like the recording machine: no model files."""
    async with ComfyDouble(root=tmp_path / "bare", model_files=bare_model_files()) as double:
        yield double
