"""Fixtures for the Modal backend: the job API, served by uvicorn on 127.0.0.1, over the ComfyUI double."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from gpubridge.server import create_app
from modal_app.backends import InProcessBackend
from modal_app.config import DEFAULT_PRICES

from gpubridge.testing import ComfyDouble

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
INPUTS = ROOT / "examples" / "inputs"
TOKEN = "test-token-7f3a9c"


class _Server(uvicorn.Server):
    """uvicorn that says when it listens, and leaves signal handlers alone (it runs in a thread)."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    def install_signal_handlers(self) -> None:  # not the main thread
        pass


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    try:
        if not server.ready.wait(15):
            raise RuntimeError("uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def make_backend(comfy_url: str, **options: Any) -> InProcessBackend:
    worker = {"gpu": "L40S", "prices": DEFAULT_PRICES, **options.pop("worker", {})}
    return InProcessBackend.for_url(comfy_url, worker_options=worker, **options)


@contextlib.contextmanager
def serve_api(
    comfy_url: str, *, tokens: Any = TOKEN, api: dict[str, Any] | None = None, **backend_options: Any
) -> Iterator[tuple[str, InProcessBackend]]:
    """The job API (in-process backend) for the ComfyUI at ``comfy_url``; yields (url, backend)."""
    backend = make_backend(comfy_url, **backend_options)
    app = create_app(backend, tokens=tokens, **(api or {}))
    with serve(app) as url:
        yield url, backend


@pytest.fixture
async def comfy(tmp_path: Path) -> AsyncIterator[ComfyDouble]:
    async with ComfyDouble(root=tmp_path / "comfy") as double:
        yield double


@pytest.fixture
def threaded_comfy(tmp_path: Path) -> Iterator[Any]:
    with ComfyDouble(root=tmp_path / "comfy").run_in_thread() as double:
        yield double
