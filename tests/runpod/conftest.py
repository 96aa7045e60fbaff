"""Fixtures for the RunPod backend: the real worker handler, the ComfyUI double, the endpoint double."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gpubridge.providers.runpod import RunPodRunner
from gpubridge.testing.runpod import RunPodEndpointDouble

ROOT = Path(__file__).resolve().parents[2]
HANDLER_PATH = ROOT / "contrib" / "runpod_worker" / "handler.py"
WORKFLOWS = ROOT / "workflows"
API_KEY = "rp_test_key_5b1d7e0c9a"  # a fake key; tests check it never leaks


def load_worker_module() -> ModuleType:
    """contrib/runpod_worker/handler.py, loaded by path (contrib is not a package)."""
    name = "gpubridge_contrib_runpod_worker_handler"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HANDLER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def comfy_double_class() -> Any:
    try:
        from gpubridge.testing import ComfyDouble  # type: ignore[attr-defined]
    except ImportError:  # until the package exports it
        from gpubridge.testing.comfy import ComfyDouble  # type: ignore[no-redef]
    return ComfyDouble


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def worker_module() -> ModuleType:
    return load_worker_module()


@pytest.fixture
async def comfy(tmp_path: Path) -> AsyncIterator[Any]:
    async with comfy_double_class()(root=tmp_path / "comfy") as double:
        yield double


@pytest.fixture
async def worker(worker_module: ModuleType, comfy: Any) -> AsyncIterator[ModuleType]:
    """The real handler, pointed at the ComfyUI double (fast reconnect give-up, unthrottled progress)."""
    worker_module.configure(comfy_url=comfy.url, reconnect_timeout=0.5, progress_interval=0.0)
    yield worker_module
    await worker_module.aclose()


def make_runner(endpoint: RunPodEndpointDouble, **options: Any) -> RunPodRunner:
    settings: dict[str, Any] = dict(
        api_key=API_KEY, base_url=endpoint.base_url, poll_initial=0.005, poll_max=0.05, retry_initial=0.0,
        health_resample=0,
    )
    settings.update(options)
    return RunPodRunner(endpoint.endpoint_id, **settings)


@pytest.fixture
async def endpoint(worker: ModuleType) -> AsyncIterator[RunPodEndpointDouble]:
    """The endpoint double running the real handler against the ComfyUI double."""
    async with RunPodEndpointDouble(worker.handler, api_key=API_KEY) as double:
        yield double


@pytest.fixture
async def runner(endpoint: RunPodEndpointDouble) -> AsyncIterator[RunPodRunner]:
    r = make_runner(endpoint)
    yield r
    await r.aclose()
