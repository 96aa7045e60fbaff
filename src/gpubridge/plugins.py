"""Providers are pluggy plugins.

A plugin is a module (or object) with hook implementations. Built-in providers are registered exactly like
third-party ones, as default plugins; third-party plugins are found through the ``gpubridge`` entry-point
group::

    # pyproject.toml of a plugin package
    [project.entry-points.gpubridge]
    myprovider = "gpubridge_myprovider"

    # gpubridge_myprovider.py
    from gpubridge.plugins import hookimpl, ProviderSpec

    @hookimpl
    def register_providers(register):
        register(ProviderSpec(name="myprovider", factory=MyRunner.from_settings, description="..."))

A plugin that fails to import, or whose hook raises, is reported (``gpubridge providers`` lists it with the
error) and skipped; the other plugins still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pluggy

from .errors import ConfigError, ProviderNotFound

if TYPE_CHECKING:
    from .config import ProviderSettings, Settings
    from .runner import WorkflowRunner

__all__ = [
    "hookimpl",
    "hookspec",
    "ProviderSpec",
    "PluginFailure",
    "PluginRegistry",
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "get_registry",
    "reset_registry",
]

log = logging.getLogger("gpubridge.plugins")

PROJECT = "gpubridge"
ENTRY_POINT_GROUP = "gpubridge"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "gpubridge.providers.local",
    "gpubridge.providers.modal",
    "gpubridge.providers.runpod",
    "gpubridge.providers.comfy_api",
)

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Hookspecs:
    @hookspec
    def register_providers(self, register: Callable[[ProviderSpec], None]) -> None:
        """Register providers by calling ``register(ProviderSpec(...))`` once per provider."""

    @hookspec
    def register_commands(self, cli: Any) -> None:
        """Add commands to the ``gpubridge`` CLI (a typer.Typer)."""

    @hookspec
    def job_outcome(self, outcome: Any) -> None:
        """Called once per job that went through the resilience layer, with a
        :class:`gpubridge.resilience.JobOutcome` (state, provider, error, attempts, total_s). Feed metrics
        (Prometheus, OpenTelemetry) from here; exceptions are logged, never raised."""

    @hookspec
    def breaker_change(self, provider: str, old: str, new: str) -> None:
        """Called when a provider's circuit changes state (closed, open, half_open)."""


@dataclass(frozen=True)
class ProviderSpec:
    """A provider: its name, how to build its runner, and where it came from.

    ``factory(settings, **options)`` returns a :class:`~gpubridge.runner.WorkflowRunner`; ``settings`` is
    the loaded :class:`~gpubridge.config.Settings`, ``options`` explicit overrides (e.g. from the CLI).
    """

    name: str
    factory: Callable[..., WorkflowRunner]
    description: str = ""
    settings: type[ProviderSettings] | None = None
    source: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    source: str
    error: str
    traceback: str = field(default="", repr=False)


class PluginRegistry:
    """Loads plugins (once, lazily) and holds the providers they register."""

    def __init__(self, *, builtins: Iterable[str] = DEFAULT_PLUGINS, entry_points: bool = True):
        self._builtins = tuple(builtins)
        self._entry_points = entry_points
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(Hookspecs)
        self._sources: dict[str, str] = {}
        self._providers: dict[str, ProviderSpec] = {}
        self._failures: list[PluginFailure] = []
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading

    def _record_failure(self, plugin: str, source: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        log.warning("gpubridge plugin %s (%s) failed to load: %s", plugin, source, text)
        self._failures.append(
            PluginFailure(plugin=plugin, source=source, error=text, traceback=traceback.format_exc())
        )

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            for module_name in self._builtins:
                try:
                    module = importlib.import_module(module_name)
                    self._add(module, module_name, "builtin")
                except Exception as exc:  # a broken plugin must not break the rest
                    self._record_failure(module_name, "builtin", exc)
            if self._entry_points:
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                    dist = getattr(ep, "dist", None)
                    source = f"entry point {ep.name} ({dist.name} {dist.version})" if dist else f"entry point {ep.name}"
                    try:
                        self._add(ep.load(), ep.name, source)
                    except Exception as exc:
                        self._record_failure(ep.name, source, exc)

    def _add(self, plugin: Any, name: str, source: str) -> None:
        if self.pm.is_registered(plugin) or self.pm.get_plugin(name) is not None:
            return
        self.pm.register(plugin, name=name)
        self._sources[name] = source
        self._collect(name)

    def register(self, plugin: Any, name: str | None = None, source: str = "registered") -> None:
        """Register a plugin object or module programmatically (tests, applications)."""
        self._load()
        with self._lock:
            name = name or getattr(plugin, "__name__", None) or repr(plugin)
            try:
                self._add(plugin, name, source)
            except Exception as exc:
                self._record_failure(name, source, exc)

    def _collect(self, plugin_name: str) -> None:
        """Call one plugin's register_providers hook, in isolation from the others."""
        source = self._sources.get(plugin_name, "")
        for impl in self.pm.hook.register_providers.get_hookimpls():
            if impl.plugin_name != plugin_name:
                continue

            def register(spec: ProviderSpec, _plugin: str = plugin_name, _source: str = source) -> None:
                if not isinstance(spec, ProviderSpec):
                    raise ConfigError(f"register() takes a ProviderSpec, got {type(spec).__name__}")
                existing = self._providers.get(spec.name)
                if existing is not None:
                    log.warning(
                        "provider %r from %s replaces the one from %s", spec.name, _source, existing.source
                    )
                self._providers[spec.name] = replace(spec, source=_source, plugin=_plugin)

            try:
                impl.function(register)
            except Exception as exc:
                self._record_failure(plugin_name, source, exc)

    # -- queries

    def providers(self) -> dict[str, ProviderSpec]:
        self._load()
        return dict(sorted(self._providers.items()))

    @property
    def failures(self) -> list[PluginFailure]:
        self._load()
        return list(self._failures)

    def get_provider(self, name: str) -> ProviderSpec:
        self._load()
        spec = self._providers.get(name)
        if spec is None:
            known = ", ".join(sorted(self._providers)) or "none"
            broken = [f.plugin for f in self._failures]
            extra = f" Plugins that failed to load: {', '.join(broken)}." if broken else ""
            raise ProviderNotFound(f"No provider named {name!r} (available: {known}).{extra}")
        return spec

    def create_runner(self, name: str, settings: Settings | None = None, **options: Any) -> WorkflowRunner:
        """The runner of provider instance ``name``: a ``[providers.NAME]`` table with a ``type`` is an
        instance of that provider type (its own settings, named ``NAME`` in health, breakers, attempts
        and metrics); without one, ``NAME`` is the type."""
        from .config import BUILDING_INSTANCE, Settings

        settings = settings or Settings.load()
        kind = settings.provider_type(name)
        try:
            spec = self.get_provider(kind)
        except ProviderNotFound as exc:
            if kind != name:
                raise ProviderNotFound(f"Provider {name!r} has type {kind!r}: {exc}") from None
            raise
        if kind == name:
            return spec.factory(settings, **options)
        token = BUILDING_INSTANCE.set(name)
        try:
            runner = spec.factory(settings, **{"name": name, **options})
        finally:
            BUILDING_INSTANCE.reset(token)
        runner.name = name
        return runner

    def call_commands(self, cli: Any) -> None:
        self._load()
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli)
            except Exception as exc:
                self._record_failure(impl.plugin_name, self._sources.get(impl.plugin_name, ""), exc)


_registry: PluginRegistry | None = None
_registry_lock = threading.Lock()


def get_registry() -> PluginRegistry:
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = PluginRegistry()
        return _registry


def reset_registry(registry: PluginRegistry | None = None) -> None:
    """Replace the process-wide registry (tests use this to load a fresh set of plugins)."""
    global _registry
    with _registry_lock:
        _registry = registry
