"""connect(): the composition of providers, failover and migration stages from configuration."""

from __future__ import annotations

import pytest

from gpubridge import connect
from gpubridge.config import Settings
from gpubridge.errors import ConfigError, ProviderNotFound
from gpubridge.providers.local import LocalRunner
from gpubridge.resilience import FailoverRunner
from gpubridge.shadow import ShadowRunner, SplitRunner


def settings(**kw) -> Settings:
    return Settings.load(**kw)


def test_default_is_the_local_provider(in_tmp, monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_COMFY_URL", "http://127.0.0.1:9999")
    runner = connect()
    assert isinstance(runner, LocalRunner) and runner.url == "http://127.0.0.1:9999"


def test_explicit_options_override_the_primary(in_tmp):
    assert connect("local", url="http://127.0.0.1:1234").url == "http://127.0.0.1:1234"


def test_fallbacks_wrap_the_chain_in_failover(in_tmp, monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_FALLBACKS", "modal,runpod")
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_ENDPOINT_ID", "ep")
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_API_KEY", "k")
    monkeypatch.setenv("GPUBRIDGE_QUEUE_TIMEOUT", "45")
    runner = connect()
    assert isinstance(runner, FailoverRunner)
    assert list(runner.runners) == ["local", "modal", "runpod"]
    assert runner.config.queue_timeout == 45


def test_shadow_stage_wraps_the_control_chain(in_tmp, monkeypatch, tmp_path):
    monkeypatch.setenv("GPUBRIDGE_SHADOW", "modal")
    monkeypatch.setenv("GPUBRIDGE_SHADOW_RATE", "0.1")
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "http://127.0.0.1:1")
    (in_tmp / "gpubridge.toml").write_text(f'[shadow_options]\ndb = "{tmp_path / "s.sqlite3"}"\n')
    runner = connect(provider="local", fallbacks=["modal"])
    assert isinstance(runner, ShadowRunner)
    assert isinstance(runner.inner, FailoverRunner)
    assert list(runner.inner.runners) == ["local", "modal"]
    assert runner.candidate.name == "modal"  # the shadow is not failed over


def test_canary_and_cutover(in_tmp, monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_SHADOW", "modal")
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("GPUBRIDGE_STAGE", "canary")
    assert isinstance(connect(), SplitRunner)
    monkeypatch.setenv("GPUBRIDGE_STAGE", "cutover")
    monkeypatch.setenv("GPUBRIDGE_FALLBACKS", "local")
    cut = connect()
    assert isinstance(cut, FailoverRunner) and list(cut.runners) == ["modal", "local"]


def test_unknown_provider_and_bad_resilience(in_tmp, monkeypatch):
    with pytest.raises(ProviderNotFound, match="available:.*local"):
        connect("nope")
    (in_tmp / "gpubridge.toml").write_text("[resilience]\nmax_attempts = 0\n")
    with pytest.raises(ConfigError, match="resilience"):
        connect("local")


@pytest.mark.parametrize("toml, env", [
    ("", {"GPUBRIDGE_QUEUE_TIMEOUT": "60"}),   # queue_timeout alone: nothing to reroute to
    ("[resilience]\nmax_attempts = 3\n", {}),  # resilience without fallbacks: one provider behind a breaker
])
async def test_one_provider_keeps_its_health_shape(in_tmp, monkeypatch, toml, env):
    """Issue 25, item 10: settings that wrap a lone provider must not change what `health --json` shows
    (it gained components/order and lost details.url)."""
    from gpubridge.testing import ComfyDouble

    (in_tmp / "gpubridge.toml").write_text(toml)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    async with ComfyDouble() as comfy:
        async with connect("local", url=comfy.url) as plain_runner:
            plain = await plain_runner.health()
        async with connect("local", url=comfy.url, settings=Settings.load()) as runner:
            report = await runner.health()
    assert report.ok and report.provider == plain.provider == "local"
    assert report.details["url"] == comfy.url and report.version == plain.version
    assert "components" not in report.details and "order" not in report.details
    assert set(plain.details) <= set(report.details) <= set(plain.details) | {"circuit"}
