"""RouterRunner: a runner that wraps one runner per route and sends each job to the first route that fits.

Each route's runner is a whole chain (its providers with failover, its shadow or canary), built by
:func:`gpubridge.connect`; a stuck or failing instance fails over within its route only. Jobs are
followed through the route that took them: the handle carries the route's name, and the router remembers
the job ids it handed out; an id it has not seen (another process submitted it) is asked of each route in
turn until one knows it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, JobNotFound
from ..models import HealthReport, HealthState, JobEvent, JobHandle, JobRequest, JobResult, JobStatus
from ..runner import JobRef, WorkflowRunner, job_id_of
from .rules import DEFAULT_ROUTE, Route, RouteChoice, match_route

__all__ = ["RouterRunner"]

_REMEMBERED = 100_000


class RouterRunner(WorkflowRunner):
    """Route jobs by :func:`~gpubridge.routing.rules.match_route`; ``types`` maps instance names to their
    provider types (shown by :meth:`health`)."""

    def __init__(
        self,
        routes: Sequence[tuple[Route, WorkflowRunner]],
        default: WorkflowRunner,
        *,
        types: Mapping[str, str] | None = None,
    ):
        self.routes = [route for route, _ in routes]
        self.runners: dict[str, WorkflowRunner] = {route.name: runner for route, runner in routes}
        self.runners[DEFAULT_ROUTE] = default
        self.types = dict(types or {})
        self.name = "router"
        self._jobs: OrderedDict[str, str] = OrderedDict()  # job id -> route name

    # -- routing

    def choose(self, request: JobRequest) -> RouteChoice:
        return match_route(self.routes, request)

    async def submit(self, request: JobRequest) -> JobHandle:
        choice = self.choose(request)
        handle = await self.runners[choice.name].submit(request)
        self._jobs[handle.job_id] = choice.name
        while len(self._jobs) > _REMEMBERED:
            self._jobs.popitem(last=False)
        return handle.model_copy(update={"extra": {**handle.extra, "route": choice.name}})

    async def _route_of(self, job: JobRef) -> tuple[str, str]:
        job_id = job_id_of(job)
        if isinstance(job, JobHandle) and job.extra.get("route") in self.runners:
            return job.extra["route"], job_id
        known = self._jobs.get(job_id)
        if known is not None:
            return known, job_id
        for name, runner in self.runners.items():  # submitted elsewhere: the route that knows it
            try:
                await runner.status(job_id)
            except (JobNotFound, ConfigError):
                continue
            self._jobs[job_id] = name
            return name, job_id
        raise JobNotFound(f"Unknown job {job_id!r}: no route knows it", job_id=job_id)

    async def status(self, job: JobRef) -> JobStatus:
        name, job_id = await self._route_of(job)
        return await self.runners[name].status(job_id)

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        name, job_id = await self._route_of(job)
        return await self.runners[name].wait(job_id, timeout=timeout)

    async def cancel(self, job: JobRef) -> JobStatus:
        name, job_id = await self._route_of(job)
        return await self.runners[name].cancel(job_id)

    async def events(self, job: JobRef) -> AsyncIterator[JobEvent]:  # type: ignore[override]
        name, job_id = await self._route_of(job)
        async for event in self.runners[name].events(job_id):
            yield event

    async def capabilities(self) -> Mapping[str, Any] | None:
        return await self.runners[DEFAULT_ROUTE].capabilities()

    # -- health

    async def health(self) -> HealthReport:
        """Every route's health, and one row per provider instance (with its type and routes)."""
        names = list(self.runners)
        reports = await asyncio.gather(*(self.runners[n].health() for n in names), return_exceptions=True)
        routes: list[dict[str, Any]] = []
        instances: dict[str, dict[str, Any]] = {}
        for name, report in zip(names, reports, strict=True):
            if isinstance(report, BaseException):
                report = HealthReport(provider=self.runners[name].name, state=HealthState.UNHEALTHY,
                                      message=f"{type(report).__name__}: {report}")
            routes.append({"route": name, "provider": report.provider, "state": report.state.value,
                           "message": report.message})
            components = report.details.get("components")
            rows = components if isinstance(components, list) and components else [
                {"provider": report.provider, "state": report.state.value, "message": report.message}]
            for row in rows:
                provider = str(row.get("provider"))
                entry = instances.setdefault(provider, {**row, "type": self.types.get(provider, provider),
                                                        "routes": []})
                entry["routes"].append(name)
        states = [r["state"] for r in routes]
        if all(s == HealthState.HEALTHY.value for s in states):
            state, message = HealthState.HEALTHY, None
        elif all(s == HealthState.UNHEALTHY.value for s in states):
            state, message = HealthState.UNHEALTHY, "every route is down"
        else:
            state = HealthState.DEGRADED
            message = "; ".join(f"route {r['route']}: {r['state']}" for r in routes if r["state"] != "healthy")
        return HealthReport(provider=self.name, state=state, message=message,
                            details={"components": list(instances.values()), "routes": routes})

    async def aclose(self) -> None:
        await asyncio.gather(*(r.aclose() for r in self.runners.values()), return_exceptions=True)
