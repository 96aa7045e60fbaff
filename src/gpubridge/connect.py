"""Build a runner from configuration: the one place where providers, failover and shadow are composed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Settings
from .plugins import get_registry
from .runner import WorkflowRunner

__all__ = ["connect"]


def connect(
    provider: str | None = None,
    *,
    settings: Settings | None = None,
    config_file: str | Path | None = None,
    **options: Any,
) -> WorkflowRunner:
    """A runner for ``provider`` (default: ``GPUBRIDGE_PROVIDER``, else the config file, else ``local``).

    ``options`` go to the provider's factory and override its settings (e.g. ``url=...``). Use
    ``connect().sync()`` from synchronous code.
    """
    settings = settings or Settings.load(config_file)
    name = provider or settings.provider
    return get_registry().create_runner(name, settings, **options)
