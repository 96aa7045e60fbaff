"""Provider ``local``: a ComfyUI server you run yourself, at ``GPUBRIDGE_COMFY_URL``.

This is the default provider. It is a thin adapter from the runner interface to
:class:`gpubridge.comfy.ComfyClient`: one HTTP pool and one websocket for all jobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ..comfy import ComfyClient, ComfyJob
from ..config import DEFAULT_COMFY_URL, ProviderSettings, Settings, instance_env_prefix
from ..errors import GpuBridgeError, JobTimeout
from ..models import HealthReport, JobEvent, JobHandle, JobRequest, JobResult, JobState, JobStatus
from ..plugins import ProviderSpec, hookimpl
from ..runner import JobRef, WorkflowRunner, job_id_of, poll_events

__all__ = ["LocalRunner", "LocalSettings"]


class LocalSettings(ProviderSettings):
    """Settings of the local provider (environment prefix ``GPUBRIDGE_COMFY_``, TOML ``[providers.local]``)."""

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_COMFY_")
    section = "local"

    url: str = DEFAULT_COMFY_URL
    """The ComfyUI server (``GPUBRIDGE_COMFY_URL``)."""
    output_prefix: str | None = "gpubridge/{job}"
    """Per-job output folder put in front of every filename_prefix; empty to leave prefixes alone."""
    validate_prompts: bool = True
    """Validate against the server's /object_info before queueing."""
    include_temp_outputs: bool = False
    """Also return PreviewImage (temp) outputs."""
    reconnect_timeout: float = Field(default=15.0, gt=0)
    """How long to keep trying to reconnect a dropped websocket before failing unfinished jobs."""
    request_timeout: float = Field(default=30.0, gt=0)
    max_output_bytes: int = Field(default=1 << 30, gt=0)
    """Largest output file downloaded from /view (streamed; a larger one fails with PayloadTooLarge)."""
    deadline_grace: float = Field(default=5.0, gt=0)
    """Seconds past a job's deadline to wait for ComfyUI to confirm the interrupt (and to finish
    downloads) before the job ends JobTimeout anyway; an unconfirmed interrupt is retried in the background."""


class LocalRunner(WorkflowRunner):
    """Runs jobs on one ComfyUI server.

    A job's deadline holds even when ComfyUI never confirms the interrupt (see ``deadline_grace`` of
    :class:`~gpubridge.comfy.ComfyClient`). ``status()`` and ``cancel()`` after ``wait()`` answer the job's
    final state as this process decided it (``timed_out`` stays ``timed_out``). ``aclose()`` does not
    cancel jobs still running: their waiters get a ``JobError`` and the jobs run on in ComfyUI.
    """

    def __init__(
        self,
        url: str = DEFAULT_COMFY_URL,
        *,
        name: str = "local",
        default_timeout: float = 600.0,
        client: ComfyClient | None = None,
        **client_options: Any,
    ):
        self.name = name
        self.default_timeout = default_timeout
        self.client = client or ComfyClient(url, provider=name, **client_options)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> LocalRunner:
        name = options.pop("name", "local")
        cfg = LocalSettings.from_settings(settings, **options)
        # A named instance ([providers.NAME] type = "local") reads GPUBRIDGE_<NAME>_URL, so its errors say that.
        url_setting = "GPUBRIDGE_COMFY_URL" if name == "local" else instance_env_prefix(name) + "URL"
        return cls(
            cfg.url,
            name=name,
            url_setting=url_setting,
            default_timeout=settings.timeout,
            output_prefix=cfg.output_prefix or None,
            validate=cfg.validate_prompts,
            include_temp_outputs=cfg.include_temp_outputs,
            reconnect_timeout=cfg.reconnect_timeout,
            timeout=cfg.request_timeout,
            max_output_bytes=cfg.max_output_bytes,
            deadline_grace=cfg.deadline_grace,
        )

    @property
    def url(self) -> str:
        return self.client.url

    async def submit(self, request: JobRequest) -> JobHandle:
        timeout = request.timeout or self.default_timeout
        job = await self.client.submit(
            request.workflow.to_api(), inputs=request.inputs or None, timeout=timeout
        )
        job.tags["request_id"] = request.request_id
        job.tags["tags"] = request.tags
        return JobHandle(
            job_id=job.prompt_id,
            provider=self.name,
            request_id=request.request_id,
            submitted_at=job.submitted_at,
            deadline=job.submitted_at + timeout,
        )

    def _job(self, job: JobRef) -> ComfyJob | None:
        return self.client.job(job_id_of(job))

    async def status(self, job: JobRef) -> JobStatus:
        known = self._job(job)
        if known is None:
            return await self.client.remote_status(job_id_of(job))
        status = known.status()
        if status.state is JobState.QUEUED:
            status.queue_position = await self.client.queue_position(known.prompt_id)
        return status

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        known = self._job(job)
        if known is None:
            return await self._wait_remote(job_id_of(job), timeout)
        await known.wait(timeout)
        try:
            result = await self.client.collect(known)
        finally:
            self.client.forget(known.prompt_id)
        result.request_id = known.tags.get("request_id")
        result.tags = dict(known.tags.get("tags") or {})
        return result

    async def _wait_remote(self, job_id: str, timeout: float | None) -> JobResult:
        """A job this process did not submit: follow its status, then read the result from history."""

        async def until_done() -> None:
            async for event in poll_events(lambda: self.client.remote_status(job_id), provider=self.name):
                if event.terminal:
                    return

        try:
            await asyncio.wait_for(until_done(), timeout)
        except TimeoutError:
            raise JobTimeout(
                f"Stopped waiting for job {job_id} after {timeout:g}s", job_id=job_id, provider=self.name,
                cancelled=False,
            ) from None
        return await self.client.result_of(job_id)

    async def cancel(self, job: JobRef) -> JobStatus:
        known = self._job(job)
        return await self.client.cancel(known if known is not None else job_id_of(job))

    def events(self, job: JobRef) -> AsyncIterator[JobEvent]:
        known = self._job(job)
        if known is not None:
            return known.events()
        job_id = job_id_of(job)
        return poll_events(lambda: self.client.remote_status(job_id), provider=self.name)

    async def health(self) -> HealthReport:
        return await self.client.health()

    async def capabilities(self) -> dict[str, Any] | None:
        """ComfyUI's ``/object_info`` (cached by the client); None while it does not answer."""
        try:
            return await self.client.object_info()
        except GpuBridgeError:
            return None

    async def aclose(self) -> None:
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"<LocalRunner {self.name!r} {self.client.url}>"


@hookimpl
def register_providers(register: Any) -> None:
    register(
        ProviderSpec(
            name="local",
            factory=LocalRunner.from_settings,
            description="A ComfyUI server you run (GPUBRIDGE_COMFY_URL, default http://127.0.0.1:8188)",
            settings=LocalSettings,
        )
    )
