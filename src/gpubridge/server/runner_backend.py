"""The gateway's backend: the job API over any :class:`~gpubridge.runner.WorkflowRunner`.

``gpubridge serve`` wraps what :func:`gpubridge.connect` builds (a provider, its fallbacks, shadow or
canary) in a :class:`RunnerBackend`, so every routing decision stays in the runner and the HTTP layer
only keeps records. Everything a restart needs is in the :class:`~gpubridge.server.store.JobStore`:

- ``job:{id}``: the job's :class:`~gpubridge.server.schema.JobRecord` (state, progress, error, times);
- ``run:{id}``: the runner's handle once the runner accepted the job, the handle of the attempt that
  runs it now (after a failover), and a *lease*: which process follows the job, until when;
- ``result:{id}``: the result, once the job succeeded (any replica can serve it).

A job is followed by the process that holds its lease, which renews it while it follows. A process that
starts (or finds a lease expired) adopts the job and follows it by its handle: a gateway killed mid-job and
restarted still answers for the job and delivers its result. Jobs are never resubmitted on adoption, so
nothing runs twice; a job whose handle was never recorded (the process died while the runner was
accepting it) is settled as failed after ``orphan_grace``, saying that it may have reached the backend.

A job's terminal state comes from the runner's own word (its result or its typed error) or from the
job's deadline; a transient error while following (429, 5xx, a dropped connection) is retried, never
settles the job. Finished jobs are kept ``retention`` seconds, then answer 404 (ResultExpired).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from gpubridge.errors import (
    GpuBridgeError,
    JobError,
    JobNotFound,
    JobTimeout,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
)
from gpubridge.models import EventType, HealthReport, JobHandle, JobRequest, JobResult, JobState, Progress
from gpubridge.resilience.policy import Backoff, retry_after_of
from gpubridge.runner import WorkflowRunner
from gpubridge.storage import ArtifactStore

from .backend import JobBackend
from .schema import JobEnvelope, JobRecord, error_dict, record_key
from .store import JobStore

__all__ = ["RunnerBackend"]

log = logging.getLogger("gpubridge.server")

_BACKOFF = Backoff(initial_s=0.2, max_s=10.0)  # between asks while the runner answers with transient errors
_RUN = "run:"
_RESULT = "result:"


def run_key(job_id: str) -> str:
    return f"{_RUN}{job_id}"


def result_key(job_id: str) -> str:
    return f"{_RESULT}{job_id}"


class RunnerBackend(JobBackend):
    """Jobs run by ``runner``, recorded in ``store``.

    ``accept_wait``: how long a submit waits for the runner to accept the job before answering 202 anyway
    (an error within it is the submit's error, e.g. a 422 for an invalid workflow; after it, the job's).
    ``lease``: how long a follower's claim on a job lasts without renewal. ``owner``: this process's
    identity in leases (persist it across restarts to adopt its own jobs at once). ``clock``: wall time.
    """

    def __init__(
        self,
        runner: WorkflowRunner,
        store: JobStore,
        *,
        provider: str | None = None,
        retention: float = 3600.0,
        max_active: int | None = None,
        default_timeout: float = 600.0,
        accept_wait: float = 5.0,
        cancel_wait: float = 30.0,
        lease: float = 15.0,
        orphan_grace: float = 60.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        result_cache: int = 256,
        result_cache_bytes: int = 64 * 1024 * 1024,
        drain: float = 0.0,
        close_store: bool = False,
        on_finish: Callable[[JobRecord, str | None], None] | None = None,
        progress_interval: float = 0.25,
        artifacts: ArtifactStore | None = None,
    ):
        self.runner = runner
        self.artifacts = artifacts  # outputs over its threshold are uploaded: results hold their URLs
        self.store = store
        self.provider = provider or getattr(runner, "name", "gateway")
        self.retention = retention
        self.max_active = max_active
        self.default_timeout = default_timeout
        self.accept_wait = accept_wait
        self.cancel_wait = cancel_wait
        self.lease = lease
        self.orphan_grace = orphan_grace
        self.owner = owner or f"gw-{uuid.uuid4().hex[:12]}"
        self.clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._accepting: dict[str, asyncio.Future[JobHandle]] = {}
        self._handles: dict[str, JobHandle] = {}
        self._cancelled: set[str] = set()
        self._starting = 0
        self._results: collections.OrderedDict[str, JobResult] = collections.OrderedDict()
        self._result_cache = result_cache
        self.result_cache_bytes = result_cache_bytes
        self._sizes: dict[str, int] = {}
        self._cached_bytes = 0
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self.drain_timeout = drain
        self._close_store = close_store
        self.on_finish = on_finish
        self.progress_interval = progress_interval
        # Jobs this process follows: it is their only writer while it holds their lease, so their record and
        # run entry are served from here, and a long-poll on them wakes on the write itself (no store reads).
        self._live: dict[str, JobRecord] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._moved: asyncio.Condition | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Adopt the jobs a previous run left (and keep adopting, renewing and pruning while running)."""
        if self._keeper is None:
            await self._adopt()
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="gateway-keeper")

    async def _keep(self) -> None:
        period = max(0.05, self.lease / 3)
        while not self._closed:
            await asyncio.sleep(period)  # the lease's renewal period
            try:
                await self._renew()
                await self._adopt()
                await self._prune()
            except GpuBridgeError as exc:  # the store is away for a moment: try again next period
                log.warning("gateway keeper: %s", exc)
            except Exception:
                log.exception("gateway keeper failed; retrying")

    async def _renew(self) -> None:
        until = self.clock() + self.lease
        for job_id in list(self._tasks):
            entry = await self.store.get(run_key(job_id))
            if entry is not None and entry.get("owner") == self.owner:
                entry = {**entry, "lease_until": until}
                await self.store.put(run_key(job_id), entry)
                if job_id in self._runs:
                    self._runs[job_id] = entry

    async def _adopt(self) -> None:
        try:
            keys = await self.store.keys(_RUN)
        except NotImplementedError:
            return
        now = self.clock()
        for key in keys:
            job_id = key[len(_RUN):]
            if job_id in self._tasks:
                continue
            entry = await self.store.get(key)
            if entry is None or (entry.get("owner") != self.owner and entry.get("lease_until", 0) > now):
                continue
            record = await self.store.record(job_id)
            if record is None or record.state.is_terminal:
                continue
            entry = {**entry, "owner": self.owner, "lease_until": now + self.lease}
            await self.store.put(key, entry)
            raw = entry.get("attempt") or entry.get("handle")
            if raw is None:
                if now - entry.get("accepted_at", now) >= self.orphan_grace:
                    lost = ProviderUnavailable(
                        "The gateway stopped while the backend was accepting this job; it may have reached "
                        "the backend, but it is not followed. Submit it again if you need its result.",
                        provider=self.provider,
                    )
                    lost.job_may_be_running = True
                    await self._settle(job_id, lost)
                continue
            handle = JobHandle.model_validate(raw)
            log.info("adopting job %s (%s %s)", job_id, handle.provider, handle.job_id)
            self._live[job_id], self._runs[job_id] = record, entry
            self._spawn(job_id, self._follow(job_id, handle, record))

    async def aclose(self) -> None:
        """Let the jobs in flight end (up to ``drain`` seconds), then stop following: the rest stay in the
        store for the next start to adopt. Then close the runner (and the store, if owned)."""
        await self.drain(self.drain_timeout)
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.runner.aclose()
        finally:
            if self._close_store:
                await self.store.aclose()

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the jobs this process follows to end (SIGTERM)."""
        tasks = list(self._tasks.values())
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    def _spawn(self, job_id: str, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"gateway-{job_id[:16]}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))
        return task

    # ---------------------------------------------------------------------------------------------- submit

    def _active(self) -> int:
        return self._starting + len(self._tasks)

    async def submit(self, request: JobRequest) -> JobEnvelope:
        if self.max_active is not None and self._active() >= self.max_active:
            raise RateLimited(
                f"{self._active()} jobs are queued or running (limit {self.max_active}); retry later",
                provider=self.provider,
                retry_after=5.0,
            )
        self._starting += 1  # taken before the first await, so concurrent submits see it
        try:
            return await self._submit(request)
        finally:
            self._starting -= 1

    async def _submit(self, request: JobRequest) -> JobEnvelope:
        if self._keeper is None and not self._closed:
            await self.start()
        job_id = f"job-{uuid.uuid4().hex}"
        now = self.clock()
        timeout = request.timeout or self.default_timeout
        if request.timeout is None:
            request = request.model_copy(update={"timeout": timeout})
        record = JobRecord(
            job_id=job_id, version=1, submitted_at=now, deadline=now + timeout,
            request_id=request.request_id, tags=dict(request.tags),
        )
        entry = {"owner": self.owner, "lease_until": now + self.lease, "accepted_at": now, "handle": None}
        if request.store_prefix:
            entry["store_prefix"] = request.store_prefix  # kept with the run: a gateway that adopts it uses it
        await self.store.apply({record_key(job_id): record.dump(), run_key(job_id): entry})
        self._live[job_id], self._runs[job_id] = record, entry
        accepted: asyncio.Future[JobHandle] = asyncio.get_running_loop().create_future()
        self._accepting[job_id] = accepted
        task = self._spawn(job_id, self._drive(job_id, request, record))
        try:
            await asyncio.wait({accepted, task}, timeout=self.accept_wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._accepting.pop(job_id, None)  # from now on an error of the runner's submit is the job's
        if accepted.done() and not accepted.cancelled() and accepted.exception() is not None:
            exc = accepted.exception()
            assert exc is not None
            await self._drop(job_id)  # refused before anything ran: the submit fails, no job is left
            raise exc
        return await self.get(job_id)

    async def _drive(self, job_id: str, request: JobRequest, record: JobRecord) -> None:
        try:
            handle = await self.runner.submit(request)
        except Exception as exc:
            waiting = self._accepting.pop(job_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_exception(exc)  # the submit is still waiting: it answers with this error
                return
            await self._settle(job_id, exc)
            return
        self._handles[job_id] = handle
        await self._put_run(job_id, handle=handle.model_dump(mode="json"))
        waiting = self._accepting.pop(job_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(handle)
        if job_id in self._cancelled:  # cancelled while the runner was accepting it
            with contextlib.suppress(Exception):
                await self.runner.cancel(handle)
        await self._follow(job_id, handle, record)

    # ----------------------------------------------------------------------------------------------- follow

    async def _follow(self, job_id: str, handle: JobHandle, record: JobRecord) -> None:
        events = asyncio.get_running_loop().create_task(self._watch(job_id, handle))
        try:
            outcome = await self._outcome(job_id, handle, record)
        finally:
            # The event mirror stops before the end is written: it must never write over a terminal state.
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await events
        if isinstance(outcome, JobResult):
            await self._succeed(job_id, outcome)
        else:
            await self._settle(job_id, outcome)

    async def _outcome(self, job_id: str, handle: JobHandle, record: JobRecord) -> JobResult | BaseException:
        """Follow the job until the runner's own word (its result or a typed error) or the deadline."""
        transient = 0
        while True:
            left = None
            if record.deadline is not None:
                left = record.deadline - self.clock() + 30.0  # the runner enforces the deadline itself
                if left <= 0:
                    with contextlib.suppress(Exception):
                        await self.runner.cancel(handle)
                    return JobTimeout(f"Job {job_id} passed its deadline", job_id=job_id, provider=self.provider)
            try:
                return await self.runner.wait(handle, timeout=left)
            except JobNotFound as exc:
                attempt = await self._attempt_handle(job_id)
                if attempt is not None and attempt != handle:
                    handle = attempt  # a failover job known by its current attempt after a restart
                    continue
                return exc
            except JobTimeout as exc:
                if not exc.cancelled:
                    if record.deadline is None or self.clock() < record.deadline:
                        continue  # our own wait bound, not the job's deadline
                    with contextlib.suppress(Exception):
                        await self.runner.cancel(handle)  # past its deadline: make sure it stops
                return exc
            except JobError as exc:
                return exc
            except GpuBridgeError as exc:
                if not exc.retryable:
                    return exc
                log.info("job %s: %s; following on", job_id, exc)
                transient += 1  # a transient error never settles a job: ask again after a backoff
                await asyncio.sleep(_BACKOFF.delay(transient, retry_after=retry_after_of(exc)))
            except Exception as exc:  # a bug in a runner: the job ends failed, saying so, never hangs
                return exc

    async def _run_entry(self, job_id: str) -> dict[str, Any]:
        entry = self._runs.get(job_id)
        return entry if entry is not None else (await self.store.get(run_key(job_id)) or {})

    async def _put_run(self, job_id: str, **changes: Any) -> None:
        entry = {**await self._run_entry(job_id), **changes}
        await self.store.put(run_key(job_id), entry)
        if job_id in self._live:
            self._runs[job_id] = entry

    def _cond(self) -> asyncio.Condition:
        if self._moved is None:
            self._moved = asyncio.Condition()
        return self._moved

    async def _save(self, record: JobRecord, extra: dict[str, dict[str, Any]] | None = None,
                    deletes: tuple[str, ...] = ()) -> None:
        """Write a followed job's record (with ``extra`` entries and ``deletes`` in the same write) and wake
        the long-polls on it in this process."""
        await self.store.apply({record_key(record.job_id): record.dump(), **(extra or {})}, deletes)
        if record.state.is_terminal:
            self._live.pop(record.job_id, None)
            self._runs.pop(record.job_id, None)
        elif record.job_id in self._live:
            self._live[record.job_id] = record
        cond = self._cond()
        async with cond:
            cond.notify_all()

    async def _current(self, job_id: str) -> JobRecord | None:
        record = self._live.get(job_id)
        return record if record is not None else await self.store.record(job_id)

    async def _attempt_handle(self, job_id: str) -> JobHandle | None:
        entry = await self._run_entry(job_id)
        raw = entry.get("attempt")
        return JobHandle.model_validate(raw) if raw else None

    async def _watch(self, job_id: str, handle: JobHandle) -> None:
        """Mirror the runner's events into the record: running at once, then progress at most once per
        ``progress_interval`` (the latest wins), and the attempt that runs it (for adoption)."""
        nodes_done = 0
        pending: dict[str, Any] = {}
        last_write = float("-inf")
        flusher: asyncio.Task[None] | None = None

        async def write(changes: dict[str, Any]) -> bool:
            nonlocal last_write
            current = await self._current(job_id)
            if current is None or current.state.is_terminal:
                return False
            if current.state is JobState.QUEUED:
                changes = {**changes, "state": JobState.RUNNING, "started_at": self.clock()}
            await self._save(current.bump(**changes))
            last_write = time.monotonic()
            return True

        async def flush_later(delay: float) -> None:
            await asyncio.sleep(delay)  # the progress interval
            if pending:
                changes = dict(pending)
                pending.clear()
                await write(changes)

        try:
            async for ev in self.runner.events(handle):
                if ev.terminal:
                    return
                changes: dict[str, Any] = {}
                attempt = ev.data.get("attempt_job_id") if ev.data else None
                if attempt and ev.provider:
                    inner = JobHandle(job_id=f"{ev.provider}:{attempt}", provider=ev.provider)
                    if (await self._run_entry(job_id)).get("attempt", {}).get("job_id") != inner.job_id:
                        await self._put_run(job_id, attempt=inner.model_dump(mode="json"))
                urgent = False
                if ev.type in (EventType.STARTED, EventType.EXECUTING, EventType.PROGRESS, EventType.EXECUTED,
                               EventType.CACHED):
                    if ev.type in (EventType.EXECUTED, EventType.CACHED):
                        nodes_done += 1
                    changes["progress"] = Progress(
                        node_id=ev.node_id, node_type=ev.node_type, value=ev.value, max=ev.max,
                        nodes_done=nodes_done or None,
                    )
                elif ev.type is EventType.FAILOVER:
                    changes["message"] = ev.message
                    urgent = True
                if not changes:
                    continue
                current = self._live.get(job_id)
                urgent = urgent or current is None or current.state is JobState.QUEUED
                since = time.monotonic() - last_write
                if urgent or since >= self.progress_interval:
                    pending.clear()
                    if not await write(changes):
                        return
                else:
                    pending.update(changes)
                    if flusher is None or flusher.done():
                        flusher = asyncio.get_running_loop().create_task(flush_later(self.progress_interval - since))
        finally:
            if flusher is not None:
                flusher.cancel()

    async def _succeed(self, job_id: str, result: JobResult) -> None:
        result = result.model_copy(update={"job_id": job_id})
        if self.artifacts is not None:
            try:
                prefix = (await self._run_entry(job_id)).get("store_prefix")
                result = await self.artifacts.offload(result, prefix=prefix)
            except GpuBridgeError as exc:  # the store failed, not the job: keep the bytes, say so
                log.warning("job %s: outputs kept inline: %s", job_id, exc)
                result.warnings.append(f"outputs kept inline: the artifact store failed ({exc})")
        self._cache(job_id, result)
        await self._finish(job_id, JobState.SUCCEEDED, None, None, served_by=result.provider,
                           extra={result_key(job_id): {"json": result.model_dump_json()}})

    async def _settle(self, job_id: str, exc: BaseException) -> None:
        if isinstance(exc, GpuBridgeError):
            error = error_dict(exc)
            message = exc.message if hasattr(exc, "message") else str(exc)
        else:
            log.error("job %s: unexpected %s", job_id, type(exc).__name__, exc_info=exc)
            error = {"type": "InternalError", "message": "the gateway failed on this job (a bug); see its log",
                     "retryable": False, "job_may_be_running": False}
            message = error["message"]
        await self._finish(job_id, JobState.of_error(exc), error, str(message))

    async def _finish(self, job_id: str, state: JobState, error: dict[str, Any] | None, message: str | None,
                      served_by: str | None = None, extra: dict[str, dict[str, Any]] | None = None) -> None:
        current = await self._current(job_id)
        if current is None or current.state.is_terminal:
            self._live.pop(job_id, None)
            self._runs.pop(job_id, None)
            return
        final = current.bump(state=state, finished_at=self.clock(), error=error, message=message, progress=None)
        await self._save(final, extra, (run_key(job_id),))
        self._handles.pop(job_id, None)
        self._cancelled.discard(job_id)
        if self.on_finish is not None:
            served = served_by or (error or {}).get("provider") or self.provider
            try:
                self.on_finish(final, served)
            except Exception:
                log.exception("on_finish callback failed")

    # ------------------------------------------------------------------------------------------- queries

    def _cache(self, job_id: str, result: JobResult) -> None:
        """Keep recent results in memory (bounded by count and by ``result_cache_bytes`` of outputs); the
        store holds every result anyway."""
        size = sum(len(a.data) for a in result.artifacts if a.data is not None)
        old = self._results.pop(job_id, None)
        if old is not None:
            self._cached_bytes -= self._sizes.pop(job_id, 0)
        if size > self.result_cache_bytes:
            return
        self._results[job_id] = result
        self._sizes[job_id] = size
        self._cached_bytes += size
        while len(self._results) > self._result_cache or self._cached_bytes > self.result_cache_bytes:
            gone, _ = self._results.popitem(last=False)
            self._cached_bytes -= self._sizes.pop(gone, 0)

    def _expired(self, record: JobRecord) -> bool:
        return record.finished_at is not None and self.clock() - record.finished_at > self.retention

    async def _record(self, job_id: str) -> JobRecord:
        record = await self._current(job_id)
        if record is None:
            raise JobNotFound(f"No job {job_id}", job_id=job_id, provider=self.provider)
        if self._expired(record):
            raise ResultExpired(f"Job {job_id} finished and its result expired", job_id=job_id,
                                provider=self.provider)
        return record

    async def get(self, job_id: str, *, wait: float = 0.0, after: int | None = None) -> JobEnvelope:
        record = await self._record(job_id)
        end = time.monotonic() + max(0.0, wait)
        while not record.state.is_terminal and (after is None or record.version <= after):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            seen = record.version if after is None else after
            if job_id in self._live:  # followed here: the write itself wakes us
                cond = self._cond()

                def moved() -> bool:
                    live = self._live.get(job_id)
                    return live is None or live.version > seen

                async with cond:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cond.wait_for(moved), remaining)
            else:
                await self.store.wait_changed(record_key(job_id), seen, remaining)
            record = await self._record(job_id)
        result = None
        if record.state is JobState.SUCCEEDED:
            result = self._results.get(job_id)
            if result is None:
                raw = await self.store.get(result_key(job_id))
                if raw is None:
                    raise ResultExpired(f"Job {job_id} finished and its result expired", job_id=job_id,
                                        provider=self.provider)
                result = JobResult.model_validate_json(raw["json"])
                self._cache(job_id, result)
        return JobEnvelope.of(record, self.provider, result)

    async def cancel(self, job_id: str) -> JobEnvelope:
        record = await self._record(job_id)
        if record.state.is_terminal:
            return await self.get(job_id)
        self._cancelled.add(job_id)
        handle = self._handles.get(job_id)
        if handle is None:
            entry = await self._run_entry(job_id)
            raw = entry.get("attempt") or entry.get("handle")
            handle = JobHandle.model_validate(raw) if raw else None
        if handle is not None:
            try:
                await self.runner.cancel(handle)
            except JobNotFound:
                attempt = await self._attempt_handle(job_id)
                if attempt is not None:
                    await self.runner.cancel(attempt)
        # The follower (this process or another) records the end once the runner confirms it.
        return await self.get(job_id, wait=self.cancel_wait)

    async def health(self, *, deep: bool = False) -> HealthReport:
        return await self.runner.health()

    async def capabilities(self) -> dict[str, Any] | None:
        info = await self.runner.capabilities()
        return dict(info) if info is not None else None

    async def _prune(self) -> None:
        try:
            keys = await self.store.keys("job:")
        except NotImplementedError:
            return
        for key in keys:
            raw = await self.store.get(key)
            if raw is None:
                continue
            record = JobRecord.model_validate(raw)
            if self._expired(record):
                await self._drop(record.job_id)

    async def _drop(self, job_id: str) -> None:
        for key in (record_key(job_id), run_key(job_id), result_key(job_id)):
            await self.store.delete(key)
        if self._results.pop(job_id, None) is not None:
            self._cached_bytes -= self._sizes.pop(job_id, 0)
        self._handles.pop(job_id, None)
        self._live.pop(job_id, None)
        self._runs.pop(job_id, None)

    async def _forget(self, job_id: str) -> None:
        await self._drop(job_id)
