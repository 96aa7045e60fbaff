"""The real comfy-api-proxy (Comfy Org's v2 server, from PyPI) as a process, in front of the ComfyUI double."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpubridge.testing import ComfyDouble

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "comfy_v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def proxy_for(comfy_url: str, *extra: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comfy_api_proxy.cli", "run", "--comfyui", comfy_url,
                             "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # wait for it to listen (a process start, not a sleep-as-sync on the code under test)
            if proc.poll() is not None:
                raise RuntimeError(f"comfy-api-proxy exited: {proc.stderr.read().decode()[-500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/v2/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.fixture
def comfy(tmp_path: Path) -> Iterator[Any]:
    with ComfyDouble(root=tmp_path / "comfy", cache=False).run_in_thread() as double:
        yield double


@pytest.fixture
def proxy(comfy: Any) -> Iterator[str]:
    with proxy_for(comfy.url) as url:
        yield url


def faults(comfy: Any, **knobs: Any) -> None:
    httpx.post(f"{comfy.url}/gpubridge/faults", json=knobs).raise_for_status()
