"""Build a runner from configuration: the one place where providers, failover and shadow are composed."""

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

    With fallbacks (``GPUBRIDGE_FALLBACKS`` or ``fallbacks=[...]``) the providers are wrapped in a
    :class:`~gpubridge.resilience.FailoverRunner`. ``options`` go to the primary provider's factory and
    override its settings (e.g. ``url=...``). Use ``connect().sync()`` from synchronous code.
    """
    settings = settings or Settings.load(config_file)
    registry = get_registry()
    name = provider or settings.provider
    chain = [name] + [f for f in (fallbacks if fallbacks is not None else settings.fallbacks) if f != name]
    runners = [registry.create_runner(n, settings, **(options if i == 0 else {})) for i, n in enumerate(chain)]
    if len(runners) == 1 and not settings.resilience:
        return runners[0]

    from .resilience import FailoverRunner, ResilienceConfig

    try:
        config = ResilienceConfig.model_validate({"queue_timeout": settings.queue_timeout, **settings.resilience})
    except ValidationError as exc:
        raise ConfigError(f"Invalid [resilience] settings: {exc}") from None
    return FailoverRunner(runners, config, default_timeout=settings.timeout, hooks=registry.pm.hook)
