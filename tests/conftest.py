"""Shared test setup: no real credentials, no user config, loopback only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "workflows"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test starts without gpubridge/Modal/RunPod settings from the developer's machine."""
    for key in list(os.environ):
        if key.startswith(("GPUBRIDGE_", "RUNPOD_", "MODAL_")):
            monkeypatch.delenv(key, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    empty = home / "modal.toml"
    empty.write_text("")
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(empty))  # never a real Modal token
    yield


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test with the working directory in an empty temp dir (no ./gpubridge.toml)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
