"""The shadow runner (mirror a sample of jobs to a candidate) and the split runner (the canary).

Both are :class:`~gpubridge.runner.WorkflowRunner` and see only that interface.

:class:`ShadowRunner` semantics:

- ``submit`` submits to the control at once; when the job is sampled, the candidate's submission starts
  in a background task afterwards. ``wait``/``run`` return exactly the control's result, or raise exactly
  the control's exception object. ``events``, ``status`` and ``health`` are the control's.
- The candidate runs with its own deadline (``timeout``; default the request's ``timeout``, else 600 s);
  past it the candidate's job is cancelled. At most ``max_inflight`` shadows run at once: a sampled job
  beyond that is not shadowed, and ``metrics.dropped`` counts it.
- The request is snapshotted (deep copy of the workflow and inputs) in ``submit`` before anything is
  awaited: the candidate and the noise rerun run what the caller submitted, even when the caller changes
  its ``Workflow`` object (the next seed) right after.
- The sampling slot (``max_inflight``) is released as soon as the candidate's run (and the noise rerun)
  ends. The pair is compared once the control's outcome is known: when the caller's ``wait`` (or ``run``)
  through this runner returns or raises, or, for a caller that follows the job with ``status()`` or
  ``events()`` instead, from the control's own ``wait`` which the shadow calls itself; it gives up after
  ``timeout`` (``metrics.unpaired``).
- Comparisons (image and video decoding) run on the shadow's own bounded thread pool
  (``compare_workers`` threads), never on the event loop's default executor, which the loop needs for
  DNS lookups (``getaddrinfo``) of every new connection.
- For a sample of shadowed jobs (:class:`~gpubridge.shadow.sampling.NoiseFloorSampler`) the control also
  runs the job a second time, in the background; that control-against-control pair is stored with
  ``kind="noise"`` and gives the workflow's noise floor.
- Cancelling a job cancels its shadow jobs. ``aclose`` lets running shadows finish for ``drain_timeout``,
  cancels the rest (and their remote jobs), then closes the candidate, the sink and the control.
- Anything that fails on the shadow path (candidate, comparator, sink, this code) is logged on the
  ``gpubridge.shadow`` logger and counted in :attr:`ShadowRunner.metrics`; it never reaches the caller.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import JobNotFound, JobTimeout
from ..models import (
    HealthReport,
    HealthState,
    JobEvent,
    JobHandle,
    JobRequest,
    JobResult,
    JobStatus,
    new_request_id,
)
from ..runner import JobRef, RunnerWrapper, WorkflowRunner, job_id_of
from .compare import Comparison, compare, workflow_key
from .sampling import Admission, NoiseFloorSampler, Sampler, WeightedChoice
from .store import ShadowSink

__all__ = ["ShadowRunner", "ShadowMetrics", "SplitRunner", "DEFAULT_CANDIDATE_TIMEOUT"]

log = logging.getLogger("gpubridge.shadow")

DEFAULT_CANDIDATE_TIMEOUT = 600.0
Outcome = JobResult | BaseException
Comparator = Callable[..., Comparison]


@dataclasses.dataclass
class ShadowMetrics:
    """Counters of a :class:`ShadowRunner` (since it was created)."""

    seen: int = 0
    """Jobs submitted through the runner."""
    sampled: int = 0
    """Jobs the sampler chose."""
    started: int = 0
    """Shadows started (sampled, and under ``max_inflight``)."""
    dropped: int = 0
    """Sampled jobs not shadowed because ``max_inflight`` shadows were running."""
    recorded: int = 0
    """Candidate comparisons written to the sink."""
    noise_started: int = 0
    noise_recorded: int = 0
    candidate_failures: int = 0
    """Candidate jobs that raised (its errors are findings, recorded as such)."""
    candidate_timeouts: int = 0
    comparator_errors: int = 0
    sink_errors: int = 0
    internal_errors: int = 0
    unpaired: int = 0
    """Shadows whose control outcome was never observed through this runner."""
    cancelled: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Pair:
    __slots__ = ("request", "control", "control_s", "started", "task", "slot")

    def __init__(self, request: JobRequest, started: float):
        self.request = request
        self.started = started
        self.control: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.control_s: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.slot = True
        """Whether the pair still holds its ``max_inflight`` slot."""

    def resolve(self, outcome: Outcome) -> None:
        if not self.control.done():
            self.control_s = time.monotonic() - self.started
            self.control.set_result(outcome)


def _derive(request: JobRequest, role: str, *, new_id: bool) -> JobRequest:
    """The request a shadow side submits: tagged, with its own idempotency key so no deduplicating layer
    hands back the control's job."""
    key = request.idempotency_key
    update: dict[str, Any] = {
        "workflow": request.workflow.copy(),  # no runner can change the caller's graph under another
        "tags": {**request.tags, "shadow": role},
        "idempotency_key": f"{key}:shadow-{role}" if key else None,
    }
    if new_id:
        update["request_id"] = new_request_id()
    return request.model_copy(update=update)


class ShadowRunner(RunnerWrapper):
    """Runs every job on ``control`` and mirrors a ``sample_rate`` share of them to ``candidate``.

    See the module docstring for the semantics. ``sink`` receives the comparison records (None: compare
    and count only). ``rng`` seeds sampling; ``clock`` (epoch seconds) drives the noise-floor refresh.
    """

    def __init__(
        self,
        control: WorkflowRunner,
        candidate: WorkflowRunner,
        sample_rate: float = 1.0,
        *,
        sink: ShadowSink | None = None,
        timeout: float | None = None,
        max_inflight: int = 16,
        noise_rate: float = 0.05,
        noise_warmup: int = 10,
        noise_refresh_s: float | None = None,
        drain_timeout: float = 10.0,
        compare_workers: int = 2,
        comparator: Comparator = compare,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        group: str | None = None,
    ):
        super().__init__(control)
        self.candidate = candidate
        self.group = group
        """A route's name: records' workflow keys read ``GROUP/KEY``, so each route is judged apart."""
        self.sink = sink
        self.timeout = timeout
        self.drain_timeout = drain_timeout
        self.comparator = comparator
        self._compare_pool = ThreadPoolExecutor(max_workers=max(1, compare_workers),
                                                thread_name_prefix="gpubridge-shadow-compare")
        rng = rng or random.Random()
        self.sampler = Sampler(sample_rate, rng)
        self.admission = Admission(max_inflight)
        self.noise = NoiseFloorSampler(
            rate=noise_rate,
            warmup=noise_warmup,
            refresh_s=noise_refresh_s,
            rng=random.Random(rng.getrandbits(64)),
            clock=clock,
        )
        self.metrics = ShadowMetrics()
        self._pairs: dict[str, _Pair] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def control(self) -> WorkflowRunner:
        return self.inner

    @property
    def sample_rate(self) -> float:
        return self.sampler.rate

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    # ------------------------------------------------------------------------------------ caller's path

    async def submit(self, request: JobRequest) -> JobHandle:
        self.metrics.seen += 1
        if self._closing or not self._sample():
            return await self.inner.submit(request)
        started = time.monotonic()
        snapshot = self._snapshot(request)  # before any await: the caller may change its workflow next
        try:
            handle = await self.inner.submit(request)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if snapshot is not None:
                self._start(snapshot, started, None, exc)
            raise
        if snapshot is not None:
            self._start(snapshot, started, handle, None)
        return handle

    def _snapshot(self, request: JobRequest) -> JobRequest | None:
        """A deep copy of the request (workflow and inputs) as submitted."""
        try:
            return request.model_copy(update={"workflow": request.workflow.copy()}, deep=True)
        except Exception:
            self.metrics.internal_errors += 1
            log.exception("could not snapshot the request; not shadowing this job")
            return None

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        pair = self._pairs.get(job_id_of(job))
        if pair is None:
            return await self.inner.wait(job, timeout=timeout)
        try:
            result = await self.inner.wait(job, timeout=timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not (isinstance(exc, JobTimeout) and not exc.cancelled):  # not just "stopped waiting"
                pair.resolve(exc)
            raise
        pair.resolve(result)
        return result

    async def cancel(self, job: JobRef) -> JobStatus:
        pair = self._pairs.get(job_id_of(job))
        if pair is not None and pair.task is not None and not pair.task.done():
            pair.task.cancel()
        return await self.inner.cancel(job)

    async def health(self) -> HealthReport:
        report = await self.inner.health()
        details = {**report.details, "shadow": {"candidate": self.candidate.name, **self.metrics.as_dict()}}
        return report.model_copy(update={"details": details})

    def _sample(self) -> bool:
        try:
            hit = self.sampler.decide()
        except Exception:
            self.metrics.internal_errors += 1
            log.exception("shadow sampler failed; not shadowing this job")
            return False
        self.metrics.sampled += hit
        return hit

    def _start(
        self, request: JobRequest, started: float, handle: JobHandle | None, error: BaseException | None
    ) -> None:
        """Start the shadow of one job (synchronous and cheap: it runs on the caller's path)."""
        try:
            if not self.admission.try_acquire():
                self.metrics.dropped += 1
                log.debug("shadow dropped: %d shadows in flight", self.admission.inflight)
                return
        except Exception:
            self.metrics.internal_errors += 1
            log.exception("could not start a shadow")
            return
        try:
            pair = _Pair(request, started)
            if error is not None:
                pair.resolve(error)
            pair.task = asyncio.get_running_loop().create_task(self._shadow(pair, handle))
        except Exception:
            self.admission.release()
            self.metrics.internal_errors += 1
            log.exception("could not start a shadow")
            return
        if handle is not None:
            self._pairs[handle.job_id] = pair
        self.metrics.started += 1
        self._tasks.add(pair.task)
        pair.task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------- shadow path

    def _budget(self, request: JobRequest) -> float:
        return self.timeout or request.timeout or DEFAULT_CANDIDATE_TIMEOUT

    async def _shadow(self, pair: _Pair, handle: JobHandle | None) -> None:
        subtasks: list[asyncio.Task[Any]] = []
        try:
            request = pair.request
            workflow = workflow_key(request)
            if self.group:
                workflow = f"{self.group}/{workflow}"
            budget = self._budget(request)
            noise = handle is not None and self.noise.decide(workflow)  # not when the control refused it
            cand_request = _derive(request, "candidate", new_id=False)
            cand = asyncio.ensure_future(self._run_side(self.candidate, cand_request, budget, "candidate"))
            subtasks.append(cand)
            noise_task = None
            if noise:
                self.metrics.noise_started += 1
                noise_task = asyncio.ensure_future(
                    self._run_side(self.inner, _derive(request, "noise", new_id=True), budget, "noise")
                )
                subtasks.append(noise_task)
            cand_outcome, cand_s = await cand
            noise_outcome: tuple[Outcome, float] | None = None
            if noise_task is not None:
                noise_outcome = await noise_task
            self._release(pair)  # the candidate's run has ended: free the sampling slot
            control = await self._control_outcome(pair, handle, budget)
            if control is None:
                self.metrics.unpaired += 1
                log.info("shadow of %s: the control's outcome was not seen within %.0f s; not compared",
                         handle.job_id if handle else request.request_id, budget)
                return
            await self._record(control, cand_outcome, pair, cand_s, workflow, "candidate")
            if noise_outcome is not None:
                await self._record(control, noise_outcome[0], pair, noise_outcome[1], workflow, "noise")
        except asyncio.CancelledError:
            self.metrics.cancelled += 1
            raise
        except Exception:
            self.metrics.internal_errors += 1
            log.exception("shadow task failed")
        finally:
            for t in subtasks:
                if not t.done():
                    t.cancel()
            if subtasks:
                await asyncio.wait(subtasks)  # each side arranges the cancel of its remote job
            if handle is not None and self._pairs.get(handle.job_id) is pair:
                del self._pairs[handle.job_id]
            self._release(pair)

    def _release(self, pair: _Pair) -> None:
        if pair.slot:
            pair.slot = False
            self.admission.release()

    async def _control_outcome(self, pair: _Pair, handle: JobHandle | None, budget: float) -> Outcome | None:
        """The control's outcome: from the caller's ``wait`` through this runner, or, when the caller
        follows the job otherwise (``status()``, ``events()``), from the control's own ``wait``. None when
        neither gives it within ``budget``."""
        if pair.control.done():
            return pair.control.result()
        if handle is None:  # pragma: no cover - a refused submit resolves the pair at once
            return None
        own = asyncio.ensure_future(self.inner.wait(handle, timeout=budget))
        try:
            async with asyncio.timeout(budget):
                await asyncio.wait({own, pair.control}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            if not own.done():
                own.cancel()
                await asyncio.wait({own})
        if pair.control.done():
            return pair.control.result()
        if own.cancelled():
            return None
        exc = own.exception()
        if exc is None:
            pair.resolve(own.result())
        elif isinstance(exc, JobTimeout) and not exc.cancelled:  # stopped waiting: not the job's outcome
            return None
        elif isinstance(exc, Exception):
            pair.resolve(exc)
        return pair.control.result() if pair.control.done() else None

    async def _run_side(
        self, runner: WorkflowRunner, request: JobRequest, budget: float, role: str
    ) -> tuple[Outcome, float]:
        """Run one shadow job within ``budget`` seconds; return its result or error, and its duration.

        On timeout or cancellation the remote job is cancelled (from a tracked cleanup task). Deadlines use
        ``asyncio.timeout``: on Python 3.11 ``asyncio.wait_for`` can swallow a cancellation."""
        started = time.monotonic()
        submit = asyncio.ensure_future(runner.submit(request))
        try:
            try:
                async with asyncio.timeout(budget):
                    handle = await asyncio.shield(submit)
            except TimeoutError:
                self._cleanup(runner, submit)
                return self._timed_out(role, budget, None), time.monotonic() - started
            except asyncio.CancelledError:
                self._cleanup(runner, submit)
                raise
            remaining = max(0.0, budget - (time.monotonic() - started))
            try:
                async with asyncio.timeout(remaining):
                    result = await runner.wait(handle)
            except TimeoutError:
                self._cleanup(runner, submit)
                return self._timed_out(role, budget, handle), time.monotonic() - started
            except asyncio.CancelledError:
                self._cleanup(runner, submit)
                raise
            return result, time.monotonic() - started
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if role == "candidate":
                self.metrics.candidate_failures += 1
            log.debug("shadow %s job raised %s: %s", role, type(exc).__name__, exc)
            return exc, time.monotonic() - started

    def _timed_out(self, role: str, budget: float, handle: JobHandle | None) -> JobTimeout:
        if role == "candidate":
            self.metrics.candidate_timeouts += 1
            self.metrics.candidate_failures += 1
        log.info("shadow %s job %s timed out after %.1f s; cancelling it", role,
                 handle.job_id if handle else "(not yet accepted)", budget)
        return JobTimeout(
            f"shadow {role} deadline of {budget:g} s passed",
            job_id=handle.job_id if handle else None,
            provider=handle.provider if handle else None,
            cancelled=True,
        )

    def _cleanup(self, runner: WorkflowRunner, submit: asyncio.Future[JobHandle]) -> None:
        """Cancel the job behind ``submit`` once it is accepted, in a tracked background task."""

        async def cancel_job() -> None:
            try:
                async with asyncio.timeout(max(self.drain_timeout, 1.0)):
                    handle = await asyncio.shield(submit)
            except BaseException:
                if not submit.done():
                    submit.cancel()
                elif not submit.cancelled():
                    submit.exception()  # retrieved: no "never retrieved" warning
                return
            try:
                async with asyncio.timeout(max(self.drain_timeout, 1.0)):
                    await runner.cancel(handle)
            except Exception as exc:
                log.warning("could not cancel shadow job %s on %s: %s", handle.job_id, runner.name, exc)

        task = asyncio.get_running_loop().create_task(cancel_job())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _record(
        self, control: Outcome, other: Outcome, pair: _Pair, other_s: float, workflow: str, kind: str
    ) -> None:
        try:
            record = await asyncio.get_running_loop().run_in_executor(self._compare_pool, functools.partial(
                self.comparator,
                control,
                other,
                workflow=workflow,
                kind=kind,
                request_id=pair.request.request_id,
                control_measured_s=pair.control_s,
                candidate_measured_s=other_s,
                control_provider=self.inner.name,
                candidate_provider=(self.candidate if kind == "candidate" else self.inner).name,
            ))
        except Exception:
            self.metrics.comparator_errors += 1
            log.exception("shadow comparator failed (%s pair of workflow %s)", kind, workflow)
            return
        log.debug("shadow %s pair %s: %s, phash distance %s", kind, workflow, record.outcome,
                  record.phash_distance)
        if self.sink is None:
            return
        try:
            await self.sink.write(record)
        except Exception:
            self.metrics.sink_errors += 1
            log.exception("shadow sink failed to store a %s record", kind)
            return
        if kind == "candidate":
            self.metrics.recorded += 1
        else:
            self.metrics.noise_recorded += 1

    # ------------------------------------------------------------------------------------------ close

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until no shadow runs (at most ``timeout`` seconds); return whether none is left."""
        tasks = set(self._tasks) | set(self._cleanups)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return not (self._tasks or self._cleanups)

    async def aclose(self) -> None:
        self._closing = True
        try:
            if self._tasks:
                _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    log.info("closing: cancelled %d running shadows", len(pending))
                    await asyncio.wait(pending, timeout=max(self.drain_timeout, 1.0))
            if self._cleanups:
                await asyncio.wait(set(self._cleanups), timeout=max(self.drain_timeout, 1.0))
            self._compare_pool.shutdown(wait=False, cancel_futures=True)
            for closer, what in ((self.candidate.aclose, "candidate runner"),
                                 (self.sink.aclose if self.sink else None, "shadow sink")):
                if closer is None:
                    continue
                try:
                    await closer()
                except Exception:
                    log.exception("closing the %s failed", what)
        finally:
            await self.inner.aclose()

    def __repr__(self) -> str:
        return f"<ShadowRunner {self.inner.name!r} -> {self.candidate.name!r} rate={self.sampler.rate:g}>"


# ------------------------------------------------------------------------------------------------ split


class SplitRunner(WorkflowRunner):
    """Routes each job to one of several runners, with probability proportional to its weight (the canary).

    ``routes`` is ``[(runner, weight), ...]``; the first is the primary. A job with an ``idempotency_key``
    is routed by a hash of it (``sticky``), so its retries land on the same runner. Later calls for a job go
    to the runner that took it; for a job id this runner did not submit, to the runner named by the
    handle's ``provider``, else to each runner in order until one knows the job.
    """

    def __init__(
        self,
        routes: Sequence[tuple[WorkflowRunner, float]],
        *,
        rng: random.Random | None = None,
        sticky: bool = True,
        name: str | None = None,
        max_tracked: int = 100_000,
    ):
        self.routes = list(routes)
        self.choice: WeightedChoice[WorkflowRunner] = WeightedChoice(self.routes, rng)
        self.sticky = sticky
        self.name = name or "+".join(r.name for r, _ in self.routes)
        self.max_tracked = max_tracked
        self._jobs: collections.OrderedDict[str, WorkflowRunner] = collections.OrderedDict()

    @property
    def counts(self) -> dict[str, int]:
        """Jobs routed to each runner so far, by runner name."""
        return {r.name: n for r, n in zip(self.choice.options, self.choice.counts, strict=True)}

    async def submit(self, request: JobRequest) -> JobHandle:
        key = request.idempotency_key if self.sticky else None
        runner = self.choice.choose(key)
        handle = await runner.submit(request)
        self._jobs[handle.job_id] = runner
        if len(self._jobs) > self.max_tracked:
            self._jobs.popitem(last=False)
        return handle

    def _candidates(self, job: JobRef) -> list[WorkflowRunner]:
        known = self._jobs.get(job_id_of(job))
        if known is not None:
            return [known]
        runners = [r for r, _ in self.routes]
        if isinstance(job, JobHandle):
            named = [r for r in runners if r.name == job.provider]
            if named:
                return named
        return runners

    async def _first(self, job: JobRef, call: Callable[[WorkflowRunner], Any]) -> Any:
        runners = self._candidates(job)
        for i, runner in enumerate(runners):
            try:
                return await call(runner)
            except JobNotFound:
                if i == len(runners) - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def status(self, job: JobRef) -> JobStatus:
        return await self._first(job, lambda r: r.status(job))

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        return await self._first(job, lambda r: r.wait(job, timeout=timeout))

    async def cancel(self, job: JobRef) -> JobStatus:
        return await self._first(job, lambda r: r.cancel(job))

    def events(self, job: JobRef) -> AsyncIterator[JobEvent]:
        return self._candidates(job)[0].events(job)

    async def health(self) -> HealthReport:
        """Healthy when every runner is; unhealthy when none is usable; degraded otherwise."""

        async def one(runner: WorkflowRunner) -> HealthReport:
            try:
                return await runner.health()
            except Exception as exc:
                return HealthReport(provider=runner.name, state=HealthState.UNHEALTHY, message=str(exc))

        reports = await asyncio.gather(*(one(r) for r, _ in self.routes))
        live = [rep for rep, w in zip(reports, self.choice.weights, strict=True) if w > 0] or list(reports)
        if all(r.state is HealthState.HEALTHY for r in live):
            state = HealthState.HEALTHY
        elif all(not r.ok for r in live):
            state = HealthState.UNHEALTHY
        else:
            state = HealthState.DEGRADED
        components = [
            {"provider": rep.provider, "state": rep.state.value, "weight": round(w, 6),
             "message": rep.message}
            for rep, w in zip(reports, self.choice.weights, strict=True)
        ]
        return HealthReport(provider=self.name, state=state, details={"components": components,
                                                                       "routed": self.counts})

    async def aclose(self) -> None:
        errors: list[BaseException] = []
        for runner, _ in self.routes:
            try:
                await runner.aclose()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        pairs = zip(self.choice.options, self.choice.weights, strict=True)
        arms = ", ".join(f"{r.name}={w:.3g}" for r, w in pairs)
        return f"<SplitRunner {arms}>"
