"""Build a runner from configuration: the one place where providers, failover and shadow are composed.

::

    stage off      provider (+ fallbacks, wrapped in FailoverRunner)
    stage shadow   ShadowRunner(control=provider chain, candidate=shadow)
    stage canary   SplitRunner(provider chain, shadow; canary_weight)
    stage cutover  shadow (+ fallbacks)

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

__all__ = ["connect"]


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
    return build_stage_runner(settings, chain)
