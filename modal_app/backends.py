"""Where the job API's jobs run: one interface, two backends.

- :class:`ModalBackend` spawns the GPU class's ``run`` method and follows the ``modal.FunctionCall``
  (``FunctionCall.from_id``, ``.get(timeout=0)``, ``.cancel()``), with state and progress in a
  ``modal.Dict`` that the GPU worker writes.
- :class:`InProcessBackend` runs jobs as asyncio tasks against a ComfyUI reachable from this process,
  for local serving and tests.

Modal 1.x semantics the Modal backend relies on: ``FunctionCall.get`` on a call still pending raises the
builtin :class:`TimeoutError`; on a call whose result expired (or an id Modal does not know) it raises
``modal.exception.OutputExpiredError``, which is *not* a builtin TimeoutError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from gpubridge.errors import (
    GpuBridgeError,
    JobCancelled,
    JobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
)
from gpubridge.models import HealthReport, HealthState, JobRequest, JobResult, JobState

from gpubridge.server.backend import JobBackend
from gpubridge.server.schema import HEALTH_KEY, JobEnvelope, JobRecord, error_dict, record_key
from gpubridge.server.store import JobStore, MemoryStore

from .worker import ComfyWorker, Outcome

__all__ = ["InProcessBackend", "JobBackend", "ModalBackend"]

log = logging.getLogger("gpubridge.modal_app")


# ------------------------------------------------------------------------------------------ in-process


class _LocalJob:
    __slots__ = ("cancelling", "expires_at", "idempotency", "outcome", "result_bytes", "result_path", "task")

    def __init__(self, task: asyncio.Task[Outcome]):
        self.task = task
        self.outcome: Outcome | None = None
        self.expires_at: float | None = None
        self.cancelling = False
        self.idempotency: str | None = None
        self.result_path: Path | None = None
        self.result_bytes = 0


class InProcessBackend(JobBackend):
    """Jobs as asyncio tasks on this event loop, against the worker's ComfyUI.

    ``retention`` is how long a finished job's result is kept (then ResultExpired), on ``clock``;
    ``max_active`` bounds running + queued jobs (then RateLimited). Finished results are not kept in
    memory: each is written to a file in ``result_dir`` (a temporary folder by default) and read back when
    asked for; past ``max_result_bytes`` on disk the oldest results expire early.
    """

    def __init__(
        self,
        worker: ComfyWorker,
        *,
        retention: float = 3600.0,
        max_active: int | None = None,
        cancel_wait: float = 30.0,
        result_dir: str | Path | None = None,
        max_result_bytes: int = 2 * 1024**3,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.worker = worker
        self.clock = clock
        self.store = worker.store
        self.provider = worker.provider
        self.retention = retention
        self.max_active = max_active
        self.cancel_wait = cancel_wait
        self.max_result_bytes = max_result_bytes
        self.jobs: dict[str, _LocalJob] = {}
        self._expired: dict[str, None] = {}
        self._starting = 0  # slots reserved by submits still on their way to ComfyUI
        self._result_dir = Path(result_dir) if result_dir is not None else None
        self._own_result_dir = result_dir is None
        self._results: dict[str, None] = {}  # jobs with a result on disk, oldest first
        self._result_total = 0

    @classmethod
    def for_url(
        cls,
        comfy_url: str,
        *,
        provider: str = "modal",
        store: JobStore | None = None,
        worker_options: dict[str, Any] | None = None,
        client_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> InProcessBackend:
        """A backend for the ComfyUI at ``comfy_url`` (one shared client; ``client_options`` go to it)."""
        from gpubridge.comfy import ComfyClient

        client = ComfyClient(comfy_url, provider=provider, **(client_options or {}))
        worker = ComfyWorker(client, store or MemoryStore(), provider=provider, **(worker_options or {}))
        return cls(worker, **options)

    def _prune(self) -> None:
        now = self.clock()
        for job_id, job in list(self.jobs.items()):
            if job.expires_at is not None and job.expires_at <= now:
                self._drop(job_id)
        while len(self._expired) > 10_000:  # remember recent expiries only
            del self._expired[next(iter(self._expired))]

    async def _forget(self, job_id: str) -> None:
        if job_id in self.jobs:
            self._drop(job_id)
        await self.store.delete(record_key(job_id))

    def _drop(self, job_id: str) -> None:
        """Forget a finished job: its record, its result file and its idempotency entry go together."""
        job = self.jobs.pop(job_id)
        if isinstance(self.store, MemoryStore):
            self.store.data.pop(record_key(job_id), None)
            if job.idempotency is not None and (self.store.data.get(job.idempotency) or {}).get(
                "job_id"
            ) == job_id:
                self.store.data.pop(job.idempotency, None)
        if job.result_path is not None:
            with contextlib.suppress(OSError):
                job.result_path.unlink()
            self._results.pop(job_id, None)
            self._result_total -= job.result_bytes
        job.outcome = None
        self._expired[job_id] = None

    def _keyed(self, job_id: str, where: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.idempotency = where

    def _active(self) -> int:
        return self._starting + sum(1 for j in self.jobs.values() if not j.task.done())

    async def submit(self, request: JobRequest) -> JobEnvelope:
        self._prune()
        if self.max_active is not None:
            active = self._active()
            if active >= self.max_active:
                raise RateLimited(
                    f"{active} jobs are queued or running (limit {self.max_active}); retry later",
                    provider=self.provider,
                    retry_after=5.0,
                )
        self._starting += 1  # the slot is taken now, before the first await, so concurrent submits see it
        try:
            return await self._submit(request)
        finally:
            self._starting -= 1

    async def _submit(self, request: JobRequest) -> JobEnvelope:
        job_id = f"job-{uuid.uuid4().hex}"
        submitted = time.time()
        timeout = request.timeout or self.worker.default_timeout
        record = JobRecord(
            job_id=job_id,
            submitted_at=submitted,
            deadline=submitted + timeout,
            request_id=request.request_id,
            tags=dict(request.tags),
        )
        await self.store.save(record)
        try:
            cjob, record = await self.worker.start(job_id, request, submitted_at=submitted)
        except JobError as exc:
            # Accepted, then ended before ComfyUI ran it (its deadline passed on the way): the job's state
            # says so, not the submit's status.
            outcome = await self.worker._end(await self.store.record(job_id) or record, exc)
            task = asyncio.create_task(_settled(outcome), name=f"job-{job_id[:12]}")
        except BaseException:
            if isinstance(self.store, MemoryStore):
                await self.store.delete(record_key(job_id))
            raise
        else:
            task = asyncio.create_task(self._run(job_id, cjob, record, request), name=f"job-{job_id[:12]}")
        job = _LocalJob(task)
        self.jobs[job_id] = job
        task.add_done_callback(lambda t, j=job: self._done(j, t))
        return await self._envelope(job_id)

    async def _run(self, job_id: str, cjob: Any, record: JobRecord, request: JobRequest) -> Outcome:
        outcome = await self.worker.finish(cjob, record, request)
        result = outcome.get("result")
        if result is not None:  # keep the result on disk, not in memory, until it is asked for
            path = await asyncio.to_thread(self._write_result, job_id, result)
            job = self.jobs.get(job_id)
            if job is not None:
                job.result_path, job.result_bytes = path, path.stat().st_size
                self._results[job_id] = None
                self._result_total += job.result_bytes
            outcome = {**outcome, "result": None, "result_file": str(path)}
        return outcome

    def _write_result(self, job_id: str, result: dict[str, Any]) -> Path:
        if self._result_dir is None:
            self._result_dir = Path(tempfile.mkdtemp(prefix="gpubridge-results-"))
        self._result_dir.mkdir(parents=True, exist_ok=True)
        path = self._result_dir / f"{job_id}.json"
        path.write_text(json.dumps(result, separators=(",", ":")), encoding="utf-8")
        return path

    def _done(self, job: _LocalJob, task: asyncio.Task[Outcome]) -> None:
        if not task.cancelled() and task.exception() is None:
            job.outcome = task.result()
        job.expires_at = self.clock() + self.retention
        # Over the cap the oldest results go first; the newest stays, whatever its size.
        while self._result_total > self.max_result_bytes and len(self._results) > 1:
            oldest = next(iter(self._results))
            if oldest not in self.jobs:
                self._results.pop(oldest)
                continue
            self._drop(oldest)

    async def _record(self, job_id: str) -> JobRecord:
        self._prune()
        if job_id in self._expired:
            raise ResultExpired(
                f"Job {job_id} finished and its result expired", job_id=job_id, provider=self.provider
            )
        record = await self.store.record(job_id) if job_id in self.jobs else None
        if record is None:
            raise JobNotFound(f"No job {job_id}", job_id=job_id, provider=self.provider)
        return record

    async def _envelope(self, job_id: str) -> JobEnvelope:
        record = await self._record(job_id)
        job = self.jobs[job_id]
        result = None
        if record.state is JobState.SUCCEEDED:
            if not job.task.done():  # the record says done a moment before the task returns
                await asyncio.wait({job.task})
            if job.result_path is not None:
                try:
                    raw = await asyncio.to_thread(job.result_path.read_bytes)
                except OSError:  # dropped while we waited (cap or retention)
                    raise ResultExpired(
                        f"Job {job_id} finished and its result expired", job_id=job_id, provider=self.provider
                    ) from None
                result = JobResult.model_validate_json(raw)
        return JobEnvelope.of(record, self.provider, result)

    async def get(self, job_id: str, *, wait: float = 0.0, after: int | None = None) -> JobEnvelope:
        record = await self._record(job_id)
        end = time.monotonic() + max(0.0, wait)
        while not record.state.is_terminal and (after is None or record.version <= after):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            await self.store.wait_changed(
                record_key(job_id), record.version if after is None else after, remaining
            )
            record = await self._record(job_id)
        return await self._envelope(job_id)

    async def cancel(self, job_id: str) -> JobEnvelope:
        await self._record(job_id)
        job = self.jobs[job_id]
        if not job.task.done():
            # The task is cancelled once: a second DELETE waits for the same cancellation instead of
            # cancelling the worker's clean-up (which interrupts ComfyUI and records the job as cancelled).
            if not job.cancelling:
                job.cancelling = True
                job.task.cancel()
            await asyncio.wait({job.task}, timeout=self.cancel_wait)  # never cancels the task itself
        return await self._envelope(job_id)

    async def health(self, *, deep: bool = False) -> HealthReport:
        return await self.worker.health()

    async def capabilities(self) -> dict[str, Any] | None:
        try:
            return await self.worker.client.object_info()
        except GpuBridgeError:
            return None

    async def aclose(self) -> None:
        tasks = [j.task for j in self.jobs.values() if not j.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.cancel_wait)
        await self.worker.aclose()
        if self._own_result_dir and self._result_dir is not None:
            shutil.rmtree(self._result_dir, ignore_errors=True)


async def _settled(outcome: Outcome) -> Outcome:
    return outcome


# ------------------------------------------------------------------------------------------------ Modal

SpawnFn = Callable[[dict[str, Any], float], Awaitable[Any]]


class ModalBackend(JobBackend):
    """Jobs as Modal function calls of the GPU class.

    ``spawn(request_json, submitted_at)`` returns a ``modal.FunctionCall`` (in the app:
    ``ComfyUI().run.spawn.aio``); ``from_id(job_id)`` rebuilds one (``modal.FunctionCall.from_id``).
    ``store`` holds the records the GPU worker writes. ``remote_health()`` runs a health check on a GPU
    container (``GET /v1/health?deep=1``). ``poll_interval`` paces long-polls: each step is a
    ``FunctionCall.get(timeout=poll_interval)``, which Modal itself holds open.
    """

    def __init__(
        self,
        *,
        spawn: SpawnFn,
        from_id: Callable[[str], Any],
        store: JobStore,
        remote_health: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        provider: str = "modal",
        default_timeout: float = 600.0,
        poll_interval: float = 1.0,
        health_timeout: float = 20.0,
    ):
        import modal.exception

        self._mx = modal.exception
        self._spawn = spawn
        self._from_id = from_id
        self.store = store
        self._remote_health = remote_health
        self.provider = provider
        self.default_timeout = default_timeout
        self.poll_interval = poll_interval
        self.health_timeout = health_timeout

    async def submit(self, request: JobRequest) -> JobEnvelope:
        mx = self._mx
        if request.timeout is None:
            request = request.model_copy(update={"timeout": self.default_timeout})
        submitted = time.time()
        payload = request.model_dump(mode="json")
        try:
            call = await self._spawn(payload, submitted)
        except mx.ResourceExhaustedError as exc:
            raise RateLimited(
                f"Modal refused the job: {exc}", provider=self.provider, retry_after=10.0
            ) from None
        except mx.RequestSizeError as exc:
            raise PayloadTooLarge(f"Modal refused the job's size: {exc}", provider=self.provider) from None
        except (mx.Error, OSError) as exc:
            raise ProviderUnavailable(
                f"Could not spawn the job on Modal: {type(exc).__name__}: {exc}", provider=self.provider
            ) from None
        job_id = call.object_id
        record = JobRecord(
            job_id=job_id,
            submitted_at=submitted,
            deadline=submitted + float(request.timeout or 0),
            request_id=request.request_id,
            tags=dict(request.tags),
        )
        try:
            await self.store.put_new(record_key(job_id), record.dump())  # the worker may have written already
        except Exception as exc:  # noqa: BLE001 - the job runs anyway; its status comes from the call
            log.warning("could not record job %s: %s", job_id, exc)
        return JobEnvelope.of(await self.store.record(job_id) or record, self.provider)

    def _call(self, job_id: str) -> Any:
        if not job_id.startswith("fc-"):
            raise JobNotFound(
                f"No job {job_id} (Modal job ids start with 'fc-')", job_id=job_id, provider=self.provider
            )
        return self._from_id(job_id)

    async def _poll(self, call: Any, job_id: str, timeout: float) -> Outcome | None:
        """The call's outcome, or None while it is pending."""
        mx = self._mx
        try:
            out = await call.get.aio(timeout=timeout)
        except TimeoutError:  # builtin: still pending (queued or running)
            return None
        except mx.OutputExpiredError:
            record = await self.store.record(job_id)
            if record is None:
                raise JobNotFound(
                    f"No job {job_id} (unknown to Modal, or long gone)", job_id=job_id, provider=self.provider
                ) from None
            raise ResultExpired(
                f"Job {job_id} ended and Modal no longer holds its result",
                job_id=job_id,
                provider=self.provider,
            ) from None
        except mx.FunctionTimeoutError as exc:
            err = JobTimeout(
                f"Job {job_id} ran past the GPU function's time limit: {exc}",
                job_id=job_id,
                provider=self.provider,
                state="running",
                cancelled=True,
            )
            return {
                "job_id": job_id,
                "state": JobState.TIMED_OUT.value,
                "result": None,
                "error": error_dict(err),
            }
        except (mx.NotFoundError, mx.InvalidError) as exc:
            raise JobNotFound(f"No job {job_id}: {exc}", job_id=job_id, provider=self.provider) from None
        except (mx.AuthError, mx.ConnectionError, mx.ServiceError, mx.InternalError, OSError) as exc:
            raise ProviderUnavailable(
                f"Modal did not answer for job {job_id}: {type(exc).__name__}: {exc}", provider=self.provider
            ) from None
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the input failed or was cancelled (RemoteError, ...)
            record = await self.store.record(job_id)
            if record is not None and record.state is JobState.CANCELLED:
                return {"job_id": job_id, "state": "cancelled", "result": None, "error": record.error}
            err = JobFailed(
                f"The worker running job {job_id} failed: {type(exc).__name__}: {exc}",
                job_id=job_id,
                provider=self.provider,
                exception_type=type(exc).__name__,
                exception_message=str(exc),
                retryable=True,
            )
            return {
                "job_id": job_id,
                "state": JobState.FAILED.value,
                "result": None,
                "error": error_dict(err),
            }
        if not isinstance(out, dict) or "state" not in out:
            err = JobFailed(
                f"Job {job_id} returned an unexpected value ({type(out).__name__})",
                job_id=job_id,
                provider=self.provider,
            )
            return {
                "job_id": job_id,
                "state": JobState.FAILED.value,
                "result": None,
                "error": error_dict(err),
            }
        return out

    async def _finished(self, job_id: str, record: JobRecord | None, outcome: Outcome) -> JobEnvelope:
        state = JobState(outcome["state"])
        record = record or JobRecord(job_id=job_id)
        if record.state is not state or record.error != outcome.get("error"):
            record = record.bump(
                state=state,
                error=outcome.get("error"),
                progress=None,
                finished_at=record.finished_at or time.time(),
            )
        result = JobResult.model_validate(outcome["result"]) if outcome.get("result") else None
        return JobEnvelope.of(record, self.provider, result)

    async def get(self, job_id: str, *, wait: float = 0.0, after: int | None = None) -> JobEnvelope:
        call = self._call(job_id)
        end = time.monotonic() + max(0.0, wait)
        record = await self.store.record(job_id)
        while True:
            remaining = end - time.monotonic()
            step = max(0.0, min(self.poll_interval, remaining))
            outcome = await self._poll(call, job_id, step)
            record = await self.store.record(job_id) or record
            if outcome is not None:
                return await self._finished(job_id, record, outcome)
            if record is None:  # pending, but its record was never written
                record = JobRecord(job_id=job_id)
            if (
                record.state is JobState.QUEUED
                and record.deadline is not None
                and time.time() > record.deadline
            ):
                return await self._expire_queued(call, record)
            if record.state.is_terminal:  # cancelled at the API; the call is being torn down
                return JobEnvelope.of(record, self.provider)
            if after is not None and record.version > after:
                return JobEnvelope.of(record, self.provider)
            if remaining <= 0:
                return JobEnvelope.of(record, self.provider)

    async def _expire_queued(self, call: Any, record: JobRecord) -> JobEnvelope:
        with contextlib.suppress(Exception):
            await call.cancel.aio()
        err = JobTimeout(
            f"Job {record.job_id} passed its deadline while queued (no GPU container took it) and was "
            "cancelled",
            job_id=record.job_id,
            provider=self.provider,
            state="queued",
            cancelled=True,
        )
        record = record.bump(
            state=JobState.TIMED_OUT, finished_at=time.time(), error=error_dict(err), message=str(err)
        )
        await self.store.save(record)
        return JobEnvelope.of(record, self.provider)

    async def cancel(self, job_id: str) -> JobEnvelope:
        call = self._call(job_id)
        current = await self.get(job_id)
        if current.terminal:
            return current
        mx = self._mx
        try:
            await call.cancel.aio()
        except (mx.NotFoundError, mx.InvalidError) as exc:
            raise JobNotFound(f"No job {job_id}: {exc}", job_id=job_id, provider=self.provider) from None
        except (mx.Error, OSError) as exc:
            raise ProviderUnavailable(
                f"Modal could not cancel job {job_id}: {exc}", provider=self.provider
            ) from None
        # The worker records the cancellation when it sees it; a job still queued never reaches a worker.
        outcome = await self._poll(call, job_id, 0.0)
        record = await self.store.record(job_id) or JobRecord(job_id=job_id)
        if outcome is not None and outcome["state"] != JobState.FAILED.value:
            return await self._finished(job_id, record, outcome)
        if not record.state.is_terminal:
            err = JobCancelled(f"Job {job_id} was cancelled", job_id=job_id, provider=self.provider)
            record = record.bump(
                state=JobState.CANCELLED,
                finished_at=time.time(),
                error=error_dict(err),
                message=str(err),
                progress=None,
            )
            await self.store.save(record)
        return JobEnvelope.of(record, self.provider)

    async def health(self, *, deep: bool = False) -> HealthReport:
        if deep and self._remote_health is not None:
            try:
                raw = await asyncio.wait_for(self._remote_health(), self.health_timeout)
            except TimeoutError:
                return HealthReport(
                    provider=self.provider,
                    state=HealthState.DEGRADED,
                    message=f"No GPU container answered within {self.health_timeout:g}s: none is up yet "
                    "(a cold start: the container reports a frozen ComfyUI itself, within its probe timeout)",
                )
            except GpuBridgeError as exc:
                return HealthReport(provider=self.provider, state=HealthState.UNHEALTHY, message=str(exc))
            except Exception as exc:  # noqa: BLE001
                return HealthReport(
                    provider=self.provider,
                    state=HealthState.UNHEALTHY,
                    message=f"The GPU health check failed: {type(exc).__name__}: {exc}",
                )
            report = HealthReport.model_validate(raw)
            report.details["source"] = "gpu container"
            return report
        try:
            raw = await self.store.get(HEALTH_KEY)
        except Exception as exc:  # noqa: BLE001
            return HealthReport(
                provider=self.provider,
                state=HealthState.UNHEALTHY,
                message=f"Cannot read the job store: {type(exc).__name__}: {exc}",
            )
        if raw is None:
            return HealthReport(
                provider=self.provider,
                state=HealthState.HEALTHY,
                message="No GPU container has reported yet (they start on demand); "
                "?deep=1 starts one and checks it",
                details={"source": "api"},
            )
        report = HealthReport.model_validate(raw)
        report.details["source"] = "last report of a GPU container"
        report.details["age_s"] = round(time.time() - report.checked_at, 1)
        return report
