"""A ``gpubridge serve`` process for tests, and small helpers to drive it over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .conftest import WORKFLOWS

TOKEN = "gateway-test-token-41c9"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """One ``gpubridge serve`` process; ``start()`` again after a kill reuses the port and data dir."""

    def __init__(self, comfy_url: str, data_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["serve", "--port", str(self.port), "--data-dir", str(data_dir), "--lease", "2", *args]
        self.env = {
            **os.environ, "GPUBRIDGE_PROVIDER": "local", "GPUBRIDGE_COMFY_URL": comfy_url,
            "GPUBRIDGE_API_TOKEN": TOKEN, "GPUBRIDGE_FALLBACKS": "", **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"gateway-{self.port}.log"

    def start(self) -> Gateway:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gpubridge.cli", *self.args], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:  # polling a condition with a deadline: the server says when it listens by answering
            assert self.proc.poll() is None, f"gateway exited {self.proc.returncode}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"gateway did not answer:\n{self.log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v1/health", headers=AUTH, timeout=5).status_code < 500:
                    return self
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def workflow() -> dict[str, Any]:
    return json.loads((WORKFLOWS / "model_free_invert.json").read_text())


def until(gw: Gateway, job_id: str, *states: str, wait: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    env = httpx.get(f"{gw.url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()
    while env["status"]["state"] not in states:
        assert time.monotonic() < deadline, env
        env = httpx.get(f"{gw.url}/v1/jobs/{job_id}", params={"wait": 5, "after": env["version"]},
                        headers=AUTH, timeout=15).json()
    return env


