"""Running jobs on one ComfyUI: the part of the app that lives next to the GPU.

:class:`ComfyWorker` owns one :class:`~gpubridge.comfy.ComfyClient` (reused across jobs) and runs a job
as: health check, submit (inputs uploaded, prompt validated, deadline armed), follow progress, collect
the outputs, price them. It records every step in a :class:`JobStore` so the API can tell *queued*
from *running* from done. The Modal GPU class calls :meth:`ComfyWorker.run` once per input; the
in-process backend calls :meth:`~ComfyWorker.start` and :meth:`~ComfyWorker.finish` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from gpubridge.comfy import ComfyClient, ComfyJob, ComfyProcess, JobFiles
from gpubridge.errors import (
    GpuBridgeError,
    JobCancelled,
    JobError,
    JobFailed,
    JobTimeout,
    ProviderUnavailable,
)
from gpubridge.manifest import Manifest, present
from gpubridge.models import (
    Cost,
    EventType,
    HealthReport,
    HealthState,
    JobRequest,
    JobResult,
    JobState,
    Timings,
)

from .config import gpu_from_device
from gpubridge.server.schema import HEALTH_KEY, JobRecord, error_dict
from gpubridge.server.store import JobStore
from gpubridge.storage import ArtifactStore

__all__ = ["ComfyWorker", "ModalDictStore", "Outcome"]

log = logging.getLogger("gpubridge.modal_app")

Outcome = dict[str, Any]
"""What a finished job hands back: ``{"job_id", "state", "result": JobResult JSON | None, "error": ...}``."""


# ------------------------------------------------------------------------------------------------ stores


class ModalDictStore(JobStore):
    """Records in a ``modal.Dict`` (shared by the API and the GPU containers)."""

    def __init__(self, d: Any):
        self.dict = d

    async def get(self, key: str) -> dict[str, Any] | None:
        return await self.dict.get.aio(key)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self.dict.put.aio(key, value)

    async def put_new(self, key: str, value: dict[str, Any]) -> bool:
        return bool(await self.dict.put.aio(key, value, skip_if_exists=True))

    async def delete(self, key: str) -> None:
        await self.dict.pop.aio(key, None)

    async def keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (``modal.Dict.keys`` walks the whole Dict: a start-up call,
        e.g. resuming pending webhook deliveries, not one per job)."""
        return [k async for k in self.dict.keys.aio() if isinstance(k, str) and k.startswith(prefix)]


# ------------------------------------------------------------------------------------------------ worker


class ComfyWorker:
    """Runs jobs on one ComfyUI server and records them in ``store``.

    ``gpu`` names the GPU type for the cost estimate; without it the worker reads it from ComfyUI's
    ``/system_stats``. ``on_dead`` is awaited once when a health check finds ComfyUI dead (on Modal:
    ``modal.experimental.stop_fetching_inputs``). ``manifest`` + ``models_dir`` let :meth:`health`
    report which manifest models ComfyUI can see.
    """

    def __init__(
        self,
        client: ComfyClient,
        store: JobStore,
        *,
        provider: str = "modal",
        process: ComfyProcess | None = None,
        gpu: str | None = None,
        prices: Mapping[str, float] | None = None,
        price: Callable[[str | None], float | None] | None = None,
        default_timeout: float = 600.0,
        progress_interval: float = 0.0,
        on_dead: Callable[[], Awaitable[None]] | None = None,
        manifest: Manifest | None = None,
        models_dir: str | Path | None = None,
        interrupt_grace: float = 10.0,
        probe_timeout: float = 5.0,
        files: JobFiles | None = None,
        artifacts: ArtifactStore | None = None,
    ):
        self.client = client
        self.artifacts = artifacts  # outputs over its threshold leave as presigned URLs, next to ComfyUI
        self.store = store
        self.provider = provider
        self.process = process
        self.gpu = gpu
        self._price = price or (lambda g: (prices or {}).get(g.partition(":")[0]) if g else None)
        self.default_timeout = default_timeout
        self.progress_interval = progress_interval
        self.on_dead = on_dead
        self.manifest = manifest
        self.models_dir = Path(models_dir) if models_dir else None
        self.dead = False
        self.hung: str | None = None
        self.interrupt_grace = interrupt_grace
        self.probe_timeout = probe_timeout  # < the job API's deep health wait (20 s) < a client's (30 s)
        self.files = files  # removes each job's files from ComfyUI's folders once its result is read
        self._gpu_probed = gpu is not None

    # ----------------------------------------------------------------------------------------- health

    async def alive(self) -> bool:
        """ComfyUI's process (when we own it) runs and its HTTP API answers."""
        if self.process is not None and not self.process.alive():
            return False
        try:
            await self.client.system_stats()
        except GpuBridgeError:
            return False
        return True

    async def require_alive(self) -> None:
        """Raise a retryable ProviderUnavailable while ComfyUI is down.

        With ``on_dead`` (on Modal: the container stops taking inputs) the first failed check is final:
        the worker is dead for good and Modal routes jobs to other containers. Without it (the job API
        serving a ComfyUI of its own, ``python -m modal_app.serve``) every check asks again, so jobs are
        refused while ComfyUI is down and taken again once it answers.
        """
        if self.hung is not None and not self.dead:
            if not await self.client.stops_within(self.hung, 0):  # still stuck on the prompt
                raise ProviderUnavailable(
                    f"ComfyUI at {self.client.url} is still running prompt {self.hung}, which ignored its "
                    "interrupt; retry later", provider=self.provider)
            self.hung = None  # it ended after all
        if not self.dead and await self.alive():
            return
        if self.on_dead is None:
            raise ProviderUnavailable(
                f"ComfyUI at {self.client.url} is not answering; retry later", provider=self.provider
            )
        if not self.dead:
            self.dead = True
            log.error("ComfyUI at %s is dead; this worker stops taking jobs", self.client.url)
            with contextlib.suppress(Exception):
                await self.on_dead()
            with contextlib.suppress(Exception):
                await self.store.put(HEALTH_KEY, (await self.health()).model_dump(mode="json"))
        raise ProviderUnavailable(
            f"ComfyUI is not running on this worker ({self.client.url}); it stopped taking jobs. Retry: "
            "another worker will take the job.",
            provider=self.provider,
        )

    async def health(self) -> HealthReport:
        """ComfyUI reachable, queue depth, GPU, version, and the manifest's models ComfyUI can see."""
        report = await self.client.health(timeout=self.probe_timeout)
        report.provider = self.provider
        if self.process is not None and not self.process.alive():
            report.state = HealthState.UNHEALTHY
            report.message = f"ComfyUI exited with code {self.process.returncode}"
        elif report.details.get("timeout") and self.process is not None:
            # Its process runs (it started and answered before) but the API is silent: frozen, not starting.
            report.message = (f"ComfyUI's process (pid {self.process.pid}) is running but its API did not answer "
                              f"within {self.probe_timeout:g}s: frozen or overloaded, not a cold start")
        report.details["comfyui"] = "reachable" if report.state is HealthState.HEALTHY else "unreachable"
        if report.state is HealthState.HEALTHY:
            report.details["gpu"] = await self.gpu_type()
        if self.manifest is not None and self.models_dir is not None:
            have, lack = present(self.manifest, self.models_dir)
            report.details["models"] = {"expected": len(self.manifest), "present": have, "missing": lack}
            if lack and report.state is HealthState.HEALTHY:
                report.state = HealthState.DEGRADED
                report.message = f"{len(lack)} of {len(self.manifest)} manifest models are missing"
        if self.hung is not None:
            report.state = HealthState.UNHEALTHY
            report.message = (f"ComfyUI is still running prompt {self.hung}, which ignored its interrupt; this "
                              "worker stopped taking jobs")
        if self.dead:
            report.state = HealthState.UNHEALTHY
            report.message = report.message or "ComfyUI died; this worker stopped taking jobs"
        return report

    async def gpu_type(self) -> str | None:
        """The GPU type for prices: as given, else read once from ComfyUI's first device."""
        if not self._gpu_probed:
            with contextlib.suppress(GpuBridgeError, LookupError, TypeError, AttributeError):
                stats = await self.client.system_stats()
                device = (stats.get("devices") or [{}])[0]
                self.gpu = gpu_from_device(device.get("name"), device.get("vram_total"))
                self._gpu_probed = True
        return self.gpu

    # ------------------------------------------------------------------------------------------- jobs

    async def run(self, job_id: str, request: JobRequest, *, submitted_at: float | None = None) -> Outcome:
        """Run one job to its end and return its outcome; every failure is recorded, never raised.

        Cancellation (Modal cancelling the input) interrupts the ComfyUI prompt and records the job as
        cancelled before it propagates.
        """
        current = await self._current(job_id, request, submitted_at)
        if current.state.is_terminal:  # cancelled or timed out while it waited for a container
            return {"job_id": job_id, "state": current.state.value, "result": None, "error": current.error}
        try:
            cjob, record = await self.start(job_id, request, submitted_at=submitted_at)
        except GpuBridgeError as exc:
            return await self._end(await self._current(job_id, request, submitted_at), exc)
        return await self.finish(cjob, record, request)

    async def start(
        self, job_id: str, request: JobRequest, *, submitted_at: float | None = None
    ) -> tuple[ComfyJob, JobRecord]:
        """Health-check, mark the job running and queue it on ComfyUI. Raises the typed error on failure."""
        record = await self._current(job_id, request, submitted_at)
        if record.state.is_terminal:
            raise JobCancelled(
                f"Job {job_id} was {record.state.value} before it started",
                job_id=job_id,
                provider=self.provider,
            )
        await self.require_alive()
        remaining = (record.deadline - time.time()) if record.deadline is not None else None
        if remaining is not None and remaining <= 0:
            raise JobTimeout(
                f"Job {job_id} passed its deadline while queued and was not started",
                job_id=job_id,
                provider=self.provider,
                state="queued",
                cancelled=True,
            )
        prompt_id = str(uuid.uuid4())
        # Still queued: it runs when ComfyUI starts executing it (it may wait behind another prompt).
        record = record.bump(gpu=await self.gpu_type(), prompt_id=prompt_id, message="on a worker")
        await self.store.save(record)
        if self.files is not None:
            self.files.begin()
        try:
            cjob = await self.client.submit(
                request.workflow.to_api(), inputs=request.inputs or None, timeout=remaining, prompt_id=prompt_id
            )
        except BaseException:
            if self.files is not None:
                self.files.end(None)
            raise
        return cjob, record

    async def finish(self, cjob: ComfyJob, record: JobRecord, request: JobRequest) -> Outcome:
        """Follow a submitted job to its end, record it, and return its outcome."""
        latest = [record]
        watcher = asyncio.create_task(self._follow(cjob, latest))
        try:
            try:
                await cjob.wait()
                result = await self.client.collect(cjob)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher
                record = latest[0]
        except asyncio.CancelledError:
            # Interrupt ComfyUI and record the cancellation in one task that a second cancel (a retried
            # DELETE, Modal cancelling again) cannot break off: the job always ends in a terminal state.
            cleanup = asyncio.ensure_future(self._cancelled(cjob, record))
            while not cleanup.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(cleanup)
            raise
        except GpuBridgeError as exc:
            if isinstance(exc, ProviderUnavailable):
                with contextlib.suppress(GpuBridgeError):
                    await self.require_alive()
            if isinstance(exc, JobTimeout) and not await self.client.stops_within(cjob.prompt_id,
                                                                                 self.interrupt_grace):
                await self._hung(cjob.prompt_id)
            return await self._end(record, exc)
        except Exception as exc:  # a bug must still end the job, visibly
            log.exception("job %s failed inside the worker", record.job_id)
            return await self._end(
                record,
                JobFailed(
                    f"The worker failed while running job {record.job_id}: {type(exc).__name__}: {exc}",
                    job_id=record.job_id,
                    provider=self.provider,
                    exception_type=type(exc).__name__,
                    exception_message=str(exc),
                ),
            )
        finally:
            self.client.forget(cjob.prompt_id)
            if self.files is not None:  # the outputs are in memory by now: their files can go
                try:
                    self.files.end(cjob)
                except Exception as exc:
                    log.warning("could not remove job files: %s", exc)
        return await self._succeed(record, result, request)

    async def _hung(self, prompt_id: str) -> None:
        """ComfyUI keeps running a prompt past its deadline and interrupt: every later job would wait behind
        it. Stop taking inputs (on Modal the container exits once idle) instead of holding the GPU."""
        self.hung = prompt_id
        log.error("ComfyUI did not stop prompt %s within %gs of its interrupt; this worker stops taking jobs",
                  prompt_id, self.interrupt_grace)
        if self.on_dead is not None and not self.dead:
            self.dead = True
            with contextlib.suppress(Exception):
                await self.on_dead()
            with contextlib.suppress(Exception):
                await self.store.put(HEALTH_KEY, (await self.health()).model_dump(mode="json"))

    async def _cancelled(self, cjob: ComfyJob, record: JobRecord) -> None:
        with contextlib.suppress(Exception):
            await self.client.cancel(cjob)
        with contextlib.suppress(Exception):
            await self._end(
                record,
                JobCancelled(
                    f"Job {record.job_id} was cancelled", job_id=record.job_id, provider=self.provider
                ),
            )

    async def _follow(self, cjob: ComfyJob, latest: list[JobRecord]) -> None:
        """Mirror the ComfyUI job's progress into the store (throttled to ``progress_interval``);
        ``latest[0]`` is kept at the last record written."""
        last_write = 0.0
        async for ev in cjob.events():
            if ev.type is EventType.STARTED:
                record = latest[0].bump(
                    state=JobState.RUNNING,
                    started_at=cjob.started_at or time.time(),
                    message=None,
                    progress=cjob.progress(),
                )
            elif ev.type in (EventType.EXECUTING, EventType.PROGRESS):
                now = time.monotonic()
                if ev.type is EventType.PROGRESS and now - last_write < self.progress_interval:
                    continue
                last_write = now
                record = latest[0].bump(
                    state=JobState.RUNNING,
                    progress=cjob.progress(),
                    started_at=latest[0].started_at or cjob.started_at or time.time(),
                )
            else:
                continue
            latest[0] = record
            await self.store.save(record)

    async def _current(self, job_id: str, request: JobRequest, submitted_at: float | None) -> JobRecord:
        record = await self.store.record(job_id)
        if record is not None:
            return record
        submitted = submitted_at if submitted_at is not None else time.time()
        timeout = request.timeout or self.default_timeout
        return JobRecord(
            job_id=job_id,
            submitted_at=submitted,
            deadline=submitted + timeout,
            request_id=request.request_id,
            tags=dict(request.tags),
        )

    async def _end(self, record: JobRecord, exc: GpuBridgeError) -> Outcome:
        if isinstance(exc, JobError):
            exc.job_id = record.job_id
        exc.provider = self.provider
        state = JobState.of_error(exc)
        latest = await self.store.record(record.job_id)
        if latest is not None and latest.version >= record.version:
            record = latest
        record = record.bump(state=state, finished_at=time.time(), error=error_dict(exc), message=str(exc))
        await self.store.save(record)
        return {"job_id": record.job_id, "state": state.value, "result": None, "error": record.error}

    async def _succeed(self, record: JobRecord, result: JobResult, request: JobRequest) -> Outcome:
        finished = result.timings.finished_at or time.time()
        started = record.started_at or result.timings.started_at
        executing = result.timings.executing_s
        if executing is None and started is not None:
            executing = finished - started
        result.job_id = record.job_id
        result.provider = self.provider
        for art in result.artifacts:
            if art.data is not None:
                art.url = None  # a URL of the container's own ComfyUI means nothing to the caller
        result.request_id = request.request_id
        result.tags = dict(request.tags)
        result.timings = Timings(
            submitted_at=record.submitted_at,
            started_at=started,
            finished_at=finished,
            queued_s=round(started - record.submitted_at, 6) if started else None,
            executing_s=executing,
            total_s=round(finished - record.submitted_at, 6),
            upload_s=result.timings.upload_s,
            download_s=result.timings.download_s,
        )
        result.cost = self.cost(record.gpu or self.gpu, executing)
        if result.cost is None:
            result.warnings.append(f"No cost estimate: unknown price for GPU {record.gpu or self.gpu!r}")
        if self.artifacts is not None:
            try:
                result = await self.artifacts.offload(result, prefix=request.store_prefix)
            except GpuBridgeError as exc:  # the store failed, not the job: the bytes go back inline
                log.warning("job %s: outputs kept inline: %s", record.job_id, exc)
                result.warnings.append(f"outputs kept inline: the artifact store failed ({exc})")
        latest = await self.store.record(record.job_id)
        if latest is not None and latest.version >= record.version:
            record = latest
        record = record.bump(
            state=JobState.SUCCEEDED, started_at=started, finished_at=finished, progress=None, message=None
        )
        await self.store.save(record)
        return {
            "job_id": record.job_id,
            "state": JobState.SUCCEEDED.value,
            "result": result.model_dump(mode="json"),
            "error": None,
        }

    def cost(self, gpu: str | None, seconds: float | None) -> Cost | None:
        """GPU price x execution seconds, or None when either is unknown."""
        rate = self._price(gpu)
        if rate is None or seconds is None:
            return None
        return Cost(
            usd=round(rate * seconds, 10),
            gpu=gpu,
            seconds=round(seconds, 6),
            rate_usd_per_s=rate,
            basis="estimate",
        )

    async def aclose(self) -> None:
        await self.client.aclose()


