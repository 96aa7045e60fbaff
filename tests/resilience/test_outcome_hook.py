"""The outcome hook: a plugin's job_outcome and breaker_change implementations see every job and every
circuit change of runners built by connect()."""

from __future__ import annotations

import types

import pytest

from gpubridge import connect
from gpubridge.config import Settings
from gpubridge.models import JobRequest, Workflow
from gpubridge.plugins import PluginRegistry, hookimpl, reset_registry
from gpubridge.testing import ComfyDouble

from ..conftest import EXAMPLES


@pytest.fixture
def metrics_plugin():
    seen: dict[str, list] = {"outcomes": [], "breakers": []}
    mod = types.ModuleType("metrics_plugin")

    @hookimpl
    def job_outcome(outcome):
        seen["outcomes"].append(outcome)

    @hookimpl
    def breaker_change(provider, old, new):
        seen["breakers"].append((provider, old, new))

    mod.job_outcome, mod.breaker_change = job_outcome, breaker_change
    registry = PluginRegistry(entry_points=False)
    registry.register(mod, name="metrics")
    reset_registry(registry)
    yield seen
    reset_registry(None)


async def test_plugins_see_outcomes_and_breaker_changes(metrics_plugin, in_tmp, monkeypatch, tmp_path):
    (in_tmp / "gpubridge.toml").write_text(
        'provider = "modal"\nfallbacks = ["local"]\n'
        "[resilience]\nbreaker_consecutive_failures = 1\nprobe_interval_s = 3600\n"
    )
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "http://127.0.0.1:9")  # nothing listens: refused
    monkeypatch.setenv("GPUBRIDGE_MODAL_TOKEN", "x")
    async with ComfyDouble(root=tmp_path / "c") as comfy:
        monkeypatch.setenv("GPUBRIDGE_COMFY_URL", comfy.url)
        async with connect(settings=Settings.load()) as runner:
            result = await runner.run(JobRequest(workflow=Workflow.load(EXAMPLES / "model_free_invert.json")))
    assert result.provider == "local"
    (outcome,) = metrics_plugin["outcomes"]
    assert outcome.state.value == "succeeded" and outcome.provider == "local"
    assert [a.provider for a in outcome.attempts] == ["modal", "local"]
    assert ("modal", "closed", "open") in metrics_plugin["breakers"]
