"""Active health probing: each provider's ``health()`` on an interval, fed to its circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..models import HealthReport, HealthState
from ..runner import WorkflowRunner
from .breaker import CircuitBreaker

__all__ = ["HealthMonitor"]

log = logging.getLogger("gpubridge.resilience")


class HealthMonitor:
    """Probes every provider concurrently, keeps the last report, and tells each breaker the verdict.

    ``start()`` runs the probe loop in the background every ``interval_s``; ``probe_all()`` runs one round
    now (``gpubridge health`` does that).
    """

    def __init__(
        self,
        runners: Mapping[str, WorkflowRunner],
        breakers: Mapping[str, CircuitBreaker],
        *,
        interval_s: float | None = 30.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        self.runners = runners
        self.breakers = breakers
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self.last: dict[str, HealthReport] = {}
        self._task: asyncio.Task[None] | None = None

    async def probe(self, name: str) -> HealthReport:
        runner = self.runners[name]
        try:
            report = await asyncio.wait_for(runner.health(), self.timeout_s)
        except Exception as exc:  # a probe must never take the monitor down
            report = HealthReport(
                provider=name, state=HealthState.UNHEALTHY, message=f"health check failed: {type(exc).__name__}: {exc}"
            )
        self.last[name] = report
        # Only ``healthy`` may half-open an open circuit; ``degraded`` (e.g. a growing queue and no worker)
        # says neither, and ``unknown`` says nothing.
        if report.state is HealthState.HEALTHY:
            self.breakers[name].record_probe(True)
        elif report.state is HealthState.UNHEALTHY:
            self.breakers[name].record_probe(False)
        return report

    async def probe_all(self) -> dict[str, HealthReport]:
        names = list(self.runners)
        reports = await asyncio.gather(*(self.probe(n) for n in names))
        return dict(zip(names, reports, strict=True))

    def start(self) -> None:
        if self._task is None and self.interval_s:
            self._task = asyncio.create_task(self._loop(), name="gpubridge-health-monitor")

    async def _loop(self) -> None:
        assert self.interval_s
        while True:
            try:
                await self.probe_all()
            except Exception:  # pragma: no cover - probe() already contains failures
                log.exception("health probe round failed")
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def snapshot(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.runners:
            report = self.last.get(name)
            row = self.breakers[name].snapshot()
            row.update(
                state=report.state.value if report else HealthState.UNKNOWN.value,
                message=report.message if report else None,
                latency_ms=report.latency_ms if report else None,
                checked_at=report.checked_at if report else None,
            )
            rows.append(row)
        return rows
