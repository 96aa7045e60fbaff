"""``GET /metrics``: the gateway in Prometheus' text format (prometheus-client, a registry of its own).

- ``gpubridge_jobs_total{provider,outcome}``: jobs that ended, by the provider that ran them (after any
  failover) and their state; ``gpubridge_job_{queue,execution,total}_seconds{provider}``: their latencies.
- ``gpubridge_jobs_active``: jobs this process follows now.
- ``gpubridge_failover_events_total{event}``: the failover runner's counters (failovers, stuck, ...).
- ``gpubridge_circuit_state{provider,state}``: 1 for each provider's current circuit state.
- ``gpubridge_shadow_events_total{event}``: shadow traffic (sampled, recorded pairs, candidate failures...).
- ``gpubridge_webhook_deliveries_total{outcome}``: delivered, failed_attempt, gave_up.

Runner-side numbers are read from the runners at scrape time, so nothing on the job path waits for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .schema import JobRecord

__all__ = ["GatewayMetrics", "CONTENT_TYPE_LATEST"]

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


def _runners(root: Any) -> Iterator[Any]:
    """Every runner in a composed runner tree (wrappers, failover lists, shadow and split arms)."""
    stack, seen = [root], set()
    while stack:
        runner = stack.pop()
        if runner is None or id(runner) in seen:
            continue
        seen.add(id(runner))
        yield runner
        for attr in ("inner", "candidate", "control"):
            stack.append(getattr(runner, attr, None))
        children = getattr(runner, "runners", None)
        if isinstance(children, dict):
            stack.extend(children.values())
        elif isinstance(children, (list, tuple)):
            stack.extend(children)
        for route in getattr(runner, "routes", None) or ():
            stack.append(route[0] if isinstance(route, tuple) else route)


class _RunnerCollector:
    def __init__(self, runner: Any, active: Callable[[], int]):
        self.runner = runner
        self.active = active

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        active = GaugeMetricFamily("gpubridge_jobs_active", "Jobs this gateway process follows now")
        active.add_metric([], self.active())
        yield active
        failover = CounterMetricFamily("gpubridge_failover_events", "Failover runner counters", labels=["event"])
        circuit = GaugeMetricFamily("gpubridge_circuit_state", "1 for each provider's current circuit state",
                                    labels=["provider", "state"])
        shadow = CounterMetricFamily("gpubridge_shadow_events", "Shadow traffic counters", labels=["event"])
        totals: dict[str, float] = {}
        shadow_totals: dict[str, float] = {}
        for runner in _runners(self.runner):
            counters = getattr(runner, "counters", None)
            breakers = getattr(runner, "breakers", None)
            if isinstance(counters, dict) and isinstance(breakers, dict):
                for event, n in counters.items():
                    totals[event] = totals.get(event, 0) + n
                for name, breaker in breakers.items():
                    current = str(breaker.state)
                    for state in ("closed", "open", "half_open"):
                        circuit.add_metric([name, state], 1.0 if current == state else 0.0)
            metrics = getattr(runner, "metrics", None)
            if metrics is not None and hasattr(metrics, "as_dict"):
                for event, n in metrics.as_dict().items():
                    shadow_totals[event] = shadow_totals.get(event, 0) + n
        for event, n in sorted(totals.items()):
            failover.add_metric([event], n)
        for event, n in sorted(shadow_totals.items()):
            shadow.add_metric([event], n)
        yield failover
        yield circuit
        yield shadow


class GatewayMetrics:
    """The gateway's metrics. ``runner``: the runner tree to read failover, circuit and shadow state from;
    ``active``: how many jobs this process follows."""

    def __init__(self, runner: Any = None, *, active: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry(auto_describe=False)
        self.jobs = Counter("gpubridge_jobs", "Jobs that ended, by the provider that ran them and outcome",
                            ["provider", "outcome"], registry=self.registry)
        self.queue_s = Histogram("gpubridge_job_queue_seconds", "Seconds from submission to start",
                                 ["provider"], buckets=_BUCKETS, registry=self.registry)
        self.execution_s = Histogram("gpubridge_job_execution_seconds", "Seconds from start to end",
                                     ["provider"], buckets=_BUCKETS, registry=self.registry)
        self.total_s = Histogram("gpubridge_job_total_seconds", "Seconds from submission to end",
                                 ["provider"], buckets=_BUCKETS, registry=self.registry)
        self.webhooks = Counter("gpubridge_webhook_deliveries", "Webhook delivery attempts by outcome",
                                ["outcome"], registry=self.registry)
        self.registry.register(_RunnerCollector(runner, active))  # type: ignore[arg-type]

    def job_finished(self, record: JobRecord, provider: str | None) -> None:
        label = provider or "unknown"
        self.jobs.labels(label, record.state.value).inc()
        if record.started_at is not None:
            self.queue_s.labels(label).observe(max(0.0, record.started_at - record.submitted_at))
            if record.finished_at is not None:
                self.execution_s.labels(label).observe(max(0.0, record.finished_at - record.started_at))
        if record.finished_at is not None:
            self.total_s.labels(label).observe(max(0.0, record.finished_at - record.submitted_at))

    def webhook_attempt(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
