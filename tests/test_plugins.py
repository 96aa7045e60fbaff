from __future__ import annotations

import types

import pytest

from gpubridge.errors import ConfigError, ProviderNotFound
from gpubridge.plugins import PluginRegistry, ProviderSpec, hookimpl

from .fakes import ScriptedRunner


def make_plugin(name: str, provider: str):
    mod = types.ModuleType(name)

    @hookimpl
    def register_providers(register):
        register(ProviderSpec(name=provider, factory=lambda settings, **kw: ScriptedRunner(provider),
                              description=f"{provider} for tests"))

    mod.register_providers = register_providers
    return mod


def test_builtin_local_is_a_default_plugin():
    reg = PluginRegistry(entry_points=False)
    spec = reg.get_provider("local")
    assert spec.source == "builtin" and spec.plugin == "gpubridge.providers.local"
    assert reg.failures == []


def test_broken_plugins_are_reported_not_fatal():
    reg = PluginRegistry(builtins=("gpubridge.providers.local", "gpubridge_no_such_module"), entry_points=False)

    bad = types.ModuleType("raising")

    @hookimpl
    def register_providers(register):
        raise RuntimeError("boom in plugin")

    bad.register_providers = register_providers
    reg.register(bad, name="raising")
    reg.register(make_plugin("good", "good"), name="good")

    assert set(reg.providers()) == {"local", "good"}
    failed = {f.plugin: f.error for f in reg.failures}
    assert "ModuleNotFoundError" in failed["gpubridge_no_such_module"]
    assert "boom in plugin" in failed["raising"]
    with pytest.raises(ProviderNotFound, match="available: good, local.*failed to load: gpubridge_no_such_module"):
        reg.get_provider("nope")


def test_register_validates_spec_type():
    reg = PluginRegistry(builtins=(), entry_points=False)
    mod = types.ModuleType("wrong")

    @hookimpl
    def register_providers(register):
        register({"name": "x"})

    mod.register_providers = register_providers
    reg.register(mod, name="wrong")
    assert reg.providers() == {}
    assert "ProviderSpec" in reg.failures[0].error


async def test_create_runner_uses_the_factory(in_tmp):
    reg = PluginRegistry(builtins=(), entry_points=False)
    reg.register(make_plugin("p", "scripted"), name="p")
    runner = reg.create_runner("scripted")
    assert isinstance(runner, ScriptedRunner) and runner.name == "scripted"


def test_config_error_is_the_base_of_provider_not_found():
    assert issubclass(ProviderNotFound, ConfigError)
