"""Shadow traffic, canary and the migration report: move traffic from one provider to another, safely.

- :class:`ShadowRunner` mirrors a sample of jobs to a candidate runner in the background and records how
  the pair compares; the caller only ever sees the control.
- :class:`SplitRunner` routes a weighted share of jobs to the candidate (the canary).
- :func:`build_stage_runner` turns the configured stage (off, shadow, canary, cutover) into a runner.
- :mod:`gpubridge.shadow.report` turns the records into figures and a go/no-go verdict
  (``gpubridge shadow report``).

Names are imported lazily, so ``gpubridge.config`` can use :mod:`gpubridge.shadow.settings` without
pulling in Pillow or imagehash.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ShadowRunner",
    "SplitRunner",
    "ShadowMetrics",
    "build_stage_runner",
    "resolve_stage",
    "Comparison",
    "compare",
    "workflow_key",
    "ShadowSink",
    "SQLiteSink",
    "MemorySink",
    "ShadowReport",
    "build_report",
    "Stage",
    "ShadowOptions",
    "ShadowThresholds",
]

_WHERE = {
    "ShadowRunner": "runner",
    "SplitRunner": "runner",
    "ShadowMetrics": "runner",
    "build_stage_runner": "stages",
    "resolve_stage": "stages",
    "Comparison": "compare",
    "compare": "compare",
    "workflow_key": "compare",
    "ShadowSink": "store",
    "SQLiteSink": "store",
    "MemorySink": "store",
    "ShadowReport": "report",
    "build_report": "report",
    "Stage": "settings",
    "ShadowOptions": "settings",
    "ShadowThresholds": "settings",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'gpubridge.shadow' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
