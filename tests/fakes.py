"""A scripted in-memory runner, for testing code that composes runners (no I/O, no sleeps).

Each job is driven by the test: ``runner.start(job)``, ``runner.progress(job, ...)``, ``runner.succeed(job)``,
``runner.fail(job, exc)``; or automatically by ``auto`` ("succeed" finishes every job on submit).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from gpubridge.errors import GpuBridgeError, JobCancelled, JobNotFound, JobTimeout
from gpubridge.models import (
    Artifact,
    ArtifactKind,
    EventType,
    HealthReport,
    HealthState,
    JobEvent,
    JobHandle,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
)
from gpubridge.runner import EventStream, JobRef, WorkflowRunner, job_id_of


class _Job:
    def __init__(self, job_id: str, request: JobRequest):
        self.id = job_id
        self.request = request
        self.state = JobState.QUEUED
        self.stream = EventStream()
        self.done = asyncio.get_running_loop().create_future()
        self.error: GpuBridgeError | None = None


class ScriptedRunner(WorkflowRunner):
    def __init__(self, name: str = "fake", *, auto: str | None = None):
        self.name = name
        self.auto = auto
        self.jobs: dict[str, _Job] = {}
        self.cancelled: list[str] = []
        self.closed = False
        self._ids = itertools.count(1)
        self.submitted = asyncio.Event()
        self.submit_errors: list[GpuBridgeError] = []
        self.health_state = HealthState.HEALTHY
        self._new: asyncio.Queue[str] = asyncio.Queue()

    async def next_job(self) -> str:
        """The id of the next job submitted (waits for it)."""
        return await self._new.get()

    def _emit(self, job: _Job, type: EventType, **kw) -> None:
        job.stream.publish(JobEvent(type=type, job_id=job.id, provider=self.name, **kw))

    async def submit(self, request: JobRequest) -> JobHandle:
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        job = _Job(f"{self.name}-{next(self._ids)}", request)
        self.jobs[job.id] = job
        self._emit(job, EventType.QUEUED)
        self.submitted.set()
        self._new.put_nowait(job.id)
        if self.auto == "succeed":
            self.start(job.id)
            self.succeed(job.id)
        return JobHandle(job_id=job.id, provider=self.name, request_id=request.request_id)

    def start(self, job_id: str) -> None:
        job = self.jobs[job_id]
        job.state = JobState.RUNNING
        self._emit(job, EventType.STARTED)

    def progress(self, job_id: str, value: float, max: float) -> None:
        self._emit(self.jobs[job_id], EventType.PROGRESS, node_id="3", value=value, max=max)

    def _end(self, job: _Job, state: JobState, event: EventType, error: GpuBridgeError | None = None) -> None:
        if job.done.done():
            return
        job.state, job.error = state, error
        self._emit(job, event, message=str(error) if error else None)
        job.done.set_result(None)

    def succeed(self, job_id: str) -> None:
        self._end(self.jobs[job_id], JobState.SUCCEEDED, EventType.SUCCEEDED)

    def fail(self, job_id: str, error: GpuBridgeError) -> None:
        self._end(self.jobs[job_id], JobState.FAILED, EventType.FAILED, error)

    async def status(self, job: JobRef) -> JobStatus:
        j = self._get(job)
        return JobStatus(job_id=j.id, provider=self.name, state=j.state)

    def _get(self, job: JobRef) -> _Job:
        try:
            return self.jobs[job_id_of(job)]
        except KeyError:
            raise JobNotFound(f"no job {job_id_of(job)}", job_id=job_id_of(job)) from None

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        j = self._get(job)
        try:
            await asyncio.wait_for(asyncio.shield(j.done), timeout)
        except TimeoutError:
            raise JobTimeout("still running", job_id=j.id, cancelled=False, state=j.state.value) from None
        if j.error is not None:
            raise j.error
        if j.state is JobState.CANCELLED:
            raise JobCancelled("cancelled", job_id=j.id)
        art = Artifact(node_id="9", kind=ArtifactKind.IMAGE, filename=f"{j.id}.png", data=b"png")
        return JobResult(job_id=j.id, provider=self.name, request_id=j.request.request_id, artifacts=[art])

    async def cancel(self, job: JobRef) -> JobStatus:
        j = self._get(job)
        self.cancelled.append(j.id)
        self._end(j, JobState.CANCELLED, EventType.CANCELLED)
        return await self.status(j.id)

    def events(self, job: JobRef) -> AsyncIterator[JobEvent]:
        return self._get(job).stream.subscribe()

    async def health(self) -> HealthReport:
        return HealthReport(provider=self.name, state=self.health_state)

    async def aclose(self) -> None:
        self.closed = True
