"""Fixtures for the gateway: the ComfyUI double, the local provider, a SQLite job store in tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpubridge.models import JobRequest, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.server.sqlite_store import SQLiteStore
from gpubridge.testing import ComfyDouble

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "examples" / "workflows"


class FakeClock:
    """Wall time that moves only when the test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def invert(**values: Any) -> Workflow:
    wf = Workflow.load(WORKFLOWS / "model_free_invert.json")
    return wf.with_values(values) if values else wf


def request(**options: Any) -> JobRequest:
    return JobRequest(workflow=invert(), **options)


@pytest.fixture
async def comfy(tmp_path: Path):
    async with ComfyDouble(root=tmp_path / "comfy", cache=False) as double:
        yield double


@pytest.fixture
async def local(comfy: ComfyDouble):
    runner = LocalRunner(comfy.url, reconnect_timeout=2.0, cancel_wait=10.0)
    yield runner
    await runner.aclose()


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "gw" / "jobs.sqlite3", poll_interval=0.05)
    yield s
    await s.aclose()
