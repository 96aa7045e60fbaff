"""Build a runner from configuration: the one place where providers, failover and shadow are composed.

::

    stage off      provider (+ fallbacks, wrapped in FailoverRunner)
    stage shadow   ShadowRunner(control=provider chain, candidate=shadow)
    stage canary   SplitRunner(provider chain, shadow; canary_weight)
    stage cutover  shadow (+ fallbacks)

With ``[[routes]]`` (:mod:`gpubridge.routing`) each route gets such a runner of its own, and a
:class:`~gpubridge.routing.RouterRunner` sends each job to the first route that matches it (the top-level
settings are the default route). ``[providers.NAME]`` tables with a ``type`` are named instances of a
provider type (checked here, at start).

The "provider chain" is the provider followed by its fallbacks. In cutover the candidate becomes the
primary and keeps the fallbacks, so ``provider=runpod, shadow=modal, stage=cutover, fallbacks=[runpod]``
sends traffic to Modal and fails over to RunPod.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import Settings
from .errors import ConfigError
from .plugins import get_registry
from .runner import WorkflowRunner

__all__ = ["check_instances", "connect", "known_providers"]


def connect(
    provider: str | None = None,
    *,
    settings: Settings | None = None,
    config_file: str | Path | None = None,
    fallbacks: list[str] | None = None,
    **options: Any,
) -> WorkflowRunner:
    """A runner for ``provider`` (default: ``GPUBRIDGE_PROVIDER``, else the config file, else ``local``).

    With fallbacks (``GPUBRIDGE_FALLBACKS`` or ``fallbacks=[...]``) the chain is wrapped in a
    :class:`~gpubridge.resilience.FailoverRunner`; a configured migration stage (``GPUBRIDGE_SHADOW``,
    ``stage``) wraps it in a shadow or canary runner. ``options`` go to the primary provider's factory and
    override its settings (e.g. ``url=...``). Use ``connect().sync()`` from synchronous code.
    """
    settings = settings or Settings.load(config_file)
    updates: dict[str, Any] = {}
    if provider is not None:
        updates["provider"] = provider
    if fallbacks is not None:
        updates["fallbacks"] = fallbacks
    if updates:
        settings = settings.model_copy(update=updates)
    registry = get_registry()
    check_instances(settings, registry)
    default = _chain_runner(settings, registry, options)
    if not settings.routes:
        return default
    from .routing import RouterRunner, parse_routes

    routes = parse_routes(settings.routes, known=known_providers(settings, registry), path=settings.config_file)
    updates = [(route, _route_settings(route, settings)) for route in routes]  # every check before building
    built = [(route, _chain_runner(settings.model_copy(update=update), registry, {}, group=route.name))
             for route, update in updates]
    types = {name: settings.provider_type(name) for name in known_providers(settings, registry)}
    return RouterRunner(built, default, types=types)


def known_providers(settings: Settings, registry: Any) -> set[str]:
    """The names a route may use: every ``[providers.NAME]`` table and every registered provider type."""
    return set(settings.providers) | set(registry.providers())


def check_instances(settings: Settings, registry: Any) -> None:
    """Refuse, at start, a ``[providers.NAME]`` table whose ``type`` no plugin provides (naming its line)."""
    from .errors import ProviderNotFound
    from .routing import config_lines

    known = registry.providers()
    _, lines = config_lines(settings.config_file)
    for name, table in settings.providers.items():
        kind = table.get("type") if isinstance(table, dict) else None
        if kind is None:
            continue
        where = f"{settings.config_file}:{lines[name]}: " if settings.config_file and name in lines else ""
        if not isinstance(kind, str) or kind not in known:
            raise ProviderNotFound(
                f"{where}[providers.{name}] has type {kind!r}, which no provider plugin registers "
                f"(known types: {', '.join(sorted(known)) or 'none'})"
            )


def _route_settings(route: Any, settings: Settings) -> dict[str, Any]:
    from .config import Stage

    update = route.settings_update()
    where = (f"{settings.config_file}:{route.line}: " if settings.config_file and route.line else "") + \
        f"route {route.name!r}"
    update.setdefault("canary_weight", settings.canary_weight)
    for key in ("shadow_rate", "canary_weight"):
        value = update.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: {key} must be a number from 0 to 1, not {value!r}")
    if update.get("queue_timeout") is not None:
        q = update["queue_timeout"]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or q <= 0:
            raise ConfigError(f"{where}: queue_timeout must be a positive number of seconds, not {q!r}")
    else:
        update["queue_timeout"] = settings.queue_timeout
    if update.get("stage") is not None:
        try:
            update["stage"] = Stage(update["stage"])
        except ValueError:
            raise ConfigError(f"{where}: stage must be one of {', '.join(s.value for s in Stage)}") from None
    return update


def _chain_runner(settings: Settings, registry: Any, options: dict[str, Any], *, group: str | None = None
                  ) -> WorkflowRunner:
    """The runner of one route: its provider chain, in the configured stage."""
    primary = settings.provider
    staged = settings.shadow is not None or settings.stage is not None
    if staged:
        from .shadow.stages import build_stage_runner, resolve_stage

        stage = resolve_stage(settings).value
    else:
        stage = "off"

    def chain(name: str) -> WorkflowRunner:
        names = [name]
        # The control keeps its fallbacks; the candidate only gets them once it carries all traffic, so
        # a shadow's failures are recorded rather than rerouted.
        if name == primary or (stage == "cutover" and name == settings.shadow):
            names += [f for f in settings.fallbacks if f != name]
        runners = [registry.create_runner(n, settings, **(options if n == primary else {})) for n in names]
        if len(runners) == 1 and not settings.resilience:
            return runners[0]
        from .resilience import FailoverRunner, ResilienceConfig

        try:
            config = ResilienceConfig.model_validate({"queue_timeout": settings.queue_timeout, **settings.resilience})
        except ValidationError as exc:
            raise ConfigError(f"Invalid [resilience] settings: {exc}") from None
        return FailoverRunner(runners, config, default_timeout=settings.timeout, hooks=registry.pm.hook)

    if not staged:
        return chain(primary)
    return build_stage_runner(settings, chain, group=group)
