"""gpubridge's RunPod serverless worker: worker-comfyui's API, run through ``gpubridge.comfy``.

Existing RunPod callers keep working. The job ``input`` is worker-comfyui's::

    {"workflow": {<API-format graph>}, "images": [{"name": "face.png", "image": "<base64 or data URI>"}],
     "comfy_org_api_key": "..."}            # optional; images may also be http(s) URLs (gpubridge extension)

and so is the output, extended::

    {"images": [{"filename", "type": "base64", "data", "node_id", "mime_type", "width", "height"}],
     "videos": [...], "gifs": [...], "audio": [...], "files": [...],   # only when present
     "text": [{"node_id", "text"}], "errors": [...],                    # only when present
     "timings": {"queued_s", "executing_s", "upload_s", "download_s", "encode_s", "total_s"},
     "gpubridge": {"version", "prompt_id", "outputs", "warnings"}}

(``"type": "s3_url"`` with a presigned URL in ``data`` when ``BUCKET_ENDPOINT_URL`` is set, as in
worker-comfyui.) While the job runs, ``runpod.serverless.progress_update`` reports
``{"progress": {"node_id", "node_type", "value", "max", "nodes_done", "nodes_total"}}``.

Errors are returned as worker-comfyui writes them, ``{"error": "<text>", "details": ["<line>", ...]}``, with
gpubridge's typed fields beside them in ``"gpubridge_error": {"exception_type", "node_id", "node_type",
"exception_message", "traceback", ...}``, so the job ends FAILED with that text. A dead ComfyUI answers at
once with ``"refresh_worker": True`` (RunPod then replaces the worker) instead of hanging.

ComfyUI is started once per worker (``init()``, or lazily at the first job) when ``COMFY_PATH`` (a ComfyUI
checkout) or ``COMFY_START_CMD`` (a command; ``{host}``/``{port}`` are filled in) is set; otherwise the
worker uses the ComfyUI already listening at ``COMFY_URL`` (default ``http://127.0.0.1:8188``, which is
what worker-comfyui's start script runs). Other settings: ``COMFY_ARGS`` (extra ComfyUI arguments),
``COMFY_START_TIMEOUT`` (s), ``COMFY_JOB_TIMEOUT`` (s, default none: RunPod's executionTimeout applies),
``COMFY_RECONNECT_TIMEOUT`` (s, default 5), ``COMFY_VALIDATE`` (1/0), ``GPUBRIDGE_PROGRESS_INTERVAL`` (s,
default 0.5: at most one progress update per interval), ``COMFY_ORG_API_KEY``, ``BUCKET_ENDPOINT_URL`` (+ RunPod's bucket credentials).

Importing this module starts nothing; tests point it elsewhere with ``configure(comfy_url=...)`` or the
environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpubridge.comfy import ComfyClient, ComfyJob, ComfyProcess, JobFiles
from gpubridge.comfy.preflight import compact_object_info
from gpubridge.fetch import UrlFetcher
from gpubridge.storage import ArtifactStore, StoreSettings
from gpubridge.errors import (
    AuthError,
    GpuBridgeError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    ProviderUnavailable,
    WorkflowInvalid,
)
from gpubridge.models import Artifact, ArtifactKind, EventType, JobResult, store_prefix_problem
from gpubridge.server.runpod_shapes import (
    GPUBRIDGE_VERSION,
    InputError,
    file_entry,
    output_of,
    parse_input,
    quiet_runpod_sdk_logs,
    worker_comfyui_failure,
)

__all__ = ["handler", "init", "configure", "aclose", "WorkerConfig", "Worker", "parse_input"]

log = logging.getLogger("gpubridge.runpod_worker")




def _env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        log.warning("ignoring %s=%r: not a number", name, value)
        return default


def _store_settings() -> StoreSettings | None:
    settings = StoreSettings()
    return settings if settings.configured else None


@dataclass(frozen=True)
class WorkerConfig:
    comfy_url: str = "http://127.0.0.1:8188"
    comfy_path: str | None = None
    comfy_start_cmd: str | None = None
    comfy_args: tuple[str, ...] = ()
    start_timeout: float | None = 600.0
    job_timeout: float | None = None
    interrupt_grace: float = 10.0
    max_output_bytes: int = 10 * 1024 * 1024
    output_dir: str | None = None
    input_dir: str | None = None
    keep_job_files: bool = False
    reconnect_timeout: float = 5.0
    validate: bool = True
    progress_interval: float = 0.5
    comfy_org_api_key: str | None = field(default=None, repr=False)
    bucket_endpoint_url: str | None = None
    store: StoreSettings | None = field(default=None, repr=False)
    """gpubridge's artifact store (``GPUBRIDGE_STORE_*``): outputs over its threshold become ``s3_url``
    entries with their expiry and checksum; URL inputs from its endpoint are allowed."""
    watchdog_interval: float = 0.25

    @classmethod
    def from_env(cls) -> WorkerConfig:
        env = os.environ
        return cls(
            comfy_url=env.get("COMFY_URL", "").strip() or cls.comfy_url,
            comfy_path=env.get("COMFY_PATH") or None,
            comfy_start_cmd=env.get("COMFY_START_CMD") or None,
            comfy_args=tuple(shlex.split(env.get("COMFY_ARGS", ""))),
            start_timeout=_env_float("COMFY_START_TIMEOUT", 600.0),
            job_timeout=_env_float("COMFY_JOB_TIMEOUT", None),
            interrupt_grace=_env_float("COMFY_INTERRUPT_GRACE", 10.0) or 0.0,
            max_output_bytes=int((_env_float("GPUBRIDGE_MAX_OUTPUT_MB", 10.0) or 10.0) * 1024 * 1024),
            output_dir=env.get("COMFY_OUTPUT_DIR") or (str(Path(env["COMFY_PATH"]) / "output")
                                                       if env.get("COMFY_PATH") else None),
            input_dir=env.get("COMFY_INPUT_DIR") or (str(Path(env["COMFY_PATH"]) / "input")
                                                     if env.get("COMFY_PATH") else None),
            keep_job_files=env.get("GPUBRIDGE_KEEP_JOB_FILES", "").strip().lower() in ("1", "true", "yes", "on"),
            reconnect_timeout=_env_float("COMFY_RECONNECT_TIMEOUT", 5.0) or 5.0,
            validate=env.get("COMFY_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off"),
            progress_interval=_env_float("GPUBRIDGE_PROGRESS_INTERVAL", 0.5) or 0.0,
            comfy_org_api_key=env.get("COMFY_ORG_API_KEY") or None,
            bucket_endpoint_url=env.get("BUCKET_ENDPOINT_URL") or None,
            store=_store_settings(),
        )

    @property
    def manages_comfy(self) -> bool:
        return bool(self.comfy_path or self.comfy_start_cmd)


# ------------------------------------------------------------------------------------------------ input


# ----------------------------------------------------------------------------------------------- worker


class ComfyDead(ProviderUnavailable):
    """ComfyUI is gone: the worker cannot run jobs any more and must be replaced."""


class Worker:
    """One worker process: one ComfyUI (started once) and one ComfyClient per event loop, reused by jobs."""

    def __init__(self, config: WorkerConfig | None = None):
        self.config = config or WorkerConfig.from_env()
        self.process: ComfyProcess | None = None
        self._clients: dict[asyncio.AbstractEventLoop, ComfyClient] = {}
        self._starting: asyncio.Future[None] | None = None
        self.start_error: ComfyDead | None = None
        self.jobs_run = 0
        self.hung: str | None = None  # a prompt ComfyUI would not interrupt: this worker must be replaced
        cfg = self.config
        self.files = None if cfg.keep_job_files else JobFiles(cfg.output_dir, cfg.input_dir)
        self.artifacts = ArtifactStore(cfg.store) if cfg.store is not None else None
        self.templates = _templates()

    # -- ComfyUI lifecycle

    def _make_process(self) -> ComfyProcess:
        cfg = self.config
        split = urlsplit(cfg.comfy_url)
        host, port = split.hostname or "127.0.0.1", split.port or 8188
        if cfg.comfy_path:
            return ComfyProcess(path=cfg.comfy_path, host=host, port=port, args=cfg.comfy_args,
                                start_timeout=cfg.start_timeout)
        return ComfyProcess(cfg.comfy_start_cmd, host=host, port=port, args=cfg.comfy_args,
                            start_timeout=cfg.start_timeout)

    def init(self) -> None:
        """Start ComfyUI now (blocking) if this worker manages it. Call before runpod.serverless.start.

        A ComfyUI that exits or never answers (within ``start_timeout``) does not crash the worker: it comes
        up anyway and fails every job at once with ``refresh_worker`` and the start log's tail, so RunPod
        replaces it instead of restarting a container that dies before it can report anything."""
        if self.config.manages_comfy and self.process is None and self.start_error is None:
            proc = self._make_process()
            try:
                proc.start()
            except Exception as exc:
                self.start_error = self._start_failure(proc, exc)
                log.error("%s", self.start_error)
                with contextlib.suppress(Exception):
                    proc.stop()
                return
            self.process = proc

    @staticmethod
    def _start_failure(proc: ComfyProcess, exc: BaseException) -> ComfyDead:
        tail = " | ".join(line.strip() for line in proc.output[-5:] if line.strip()) or "(no output)"
        return ComfyDead(f"ComfyUI did not start: {exc}. Last output: {tail}", provider="comfy")

    async def _ensure_comfy(self) -> None:
        if self.hung is not None:
            raise ComfyDead(f"ComfyUI is still running prompt {self.hung}, which ignored its interrupt; this "
                            "worker cannot run jobs any more", provider="comfy")
        if not self.config.manages_comfy:
            return
        if self.start_error is not None:
            raise self.start_error
        if self.process is None:
            # Concurrent first jobs share one start.
            if self._starting is None:
                proc = self._make_process()
                self._starting = asyncio.ensure_future(proc.astart())
                self._starting.add_done_callback(lambda f: self._started(proc, f))
            await asyncio.shield(self._starting)
        elif not self.process.alive():
            raise ComfyDead(
                f"ComfyUI exited (code {self.process.returncode}) and this worker does not restart it. Last "
                "output: " + " | ".join(self.process.output[-5:]),
                provider="comfy",
            )

    def _started(self, proc: ComfyProcess, fut: asyncio.Future[None]) -> None:
        self._starting = None
        if not fut.cancelled() and fut.exception() is None:
            self.process = proc
        elif not fut.cancelled():
            exc = fut.exception()
            assert exc is not None
            self.start_error = self._start_failure(proc, exc)
            with contextlib.suppress(Exception):
                proc.stop()

    async def client(self) -> ComfyClient:
        """This loop's ComfyClient (created once), with ComfyUI started if this worker manages it."""
        await self._ensure_comfy()
        loop = asyncio.get_running_loop()
        for other in [lp for lp in self._clients if lp.is_closed()]:
            del self._clients[other]
        client = self._clients.get(loop)
        if client is None:
            url = self.process.url if self.process is not None else self.config.comfy_url
            client = ComfyClient(url, provider="comfy", validate=self.config.validate,
                                 reconnect_timeout=self.config.reconnect_timeout, url_setting="COMFY_URL")
            if self.artifacts is not None and self.artifacts.endpoint_host:
                # Inputs the RunPod provider uploaded to the store come as its presigned URLs.
                client.url_fetcher = UrlFetcher.from_settings(also_allow=[self.artifacts.endpoint_host])
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close the ComfyClient of the running loop (ComfyUI itself keeps running; see :meth:`stop`)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    # -- jobs

    async def capabilities(self) -> dict[str, Any]:
        """The ``{"input": {"gpubridge_capabilities": true}}`` job: what this worker's ComfyUI can run (node
        classes and model files, :func:`~gpubridge.comfy.preflight.compact_object_info`), for the RunPod
        provider's preflight. It runs no workflow and takes no GPU time."""
        try:
            client = await self.client()
            info = await client.object_info(refresh=True)  # models on the volume may have changed
        except GpuBridgeError as exc:
            return _failure(exc)
        return {"capabilities": compact_object_info(info), "gpubridge": {"version": GPUBRIDGE_VERSION}}

    async def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        raw = job.get("input")
        if isinstance(raw, Mapping) and raw.get("gpubridge_capabilities") is True:
            return await self.capabilities()
        prefix = _store_prefix(job)
        message = store_prefix_problem(prefix) if prefix is not None else None
        if message:
            return {"error": message, "details": {"exception_type": "WorkflowInputError", "exception_message": message}}
        try:
            spec = parse_input(raw, self.templates)
        except InputError as exc:
            details: dict[str, Any] = {"exception_type": exc.exception_type, "exception_message": exc.message}
            if exc.errors:
                details["errors"] = exc.errors
            return {"error": exc.message, "details": details}
        try:
            client = await self.client()
        except ProviderUnavailable as exc:
            return _dead(exc)
        comfy_job: ComfyJob | None = None
        progress: asyncio.Task[None] | None = None
        prompt_id = str(uuid.uuid4())  # ours, so a job cancelled mid-submit can still be found
        if self.files is not None:
            self.files.begin()
        try:
            extra = {}
            key = spec.comfy_org_api_key or self.config.comfy_org_api_key
            if key:
                extra["api_key_comfy_org"] = key
            comfy_job = await client.submit(
                spec.workflow,
                prompt_id=prompt_id,
                inputs=spec.images or None,
                timeout=_smaller(spec.timeout, self.config.job_timeout),
                extra_data=extra or None,
            )
            progress = asyncio.create_task(self._report_progress(job, comfy_job))
            await self._wait(comfy_job)
            result = await client.collect(comfy_job)
        except asyncio.CancelledError:
            # RunPod cancelled the job (cancel request or executionTimeout): stop it in ComfyUI too.
            if comfy_job is None or not comfy_job.finished:
                grace = self.config.interrupt_grace
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wait_for(client.cancel(comfy_job or prompt_id), max(grace, 0.1)))
                # A node that ignores the interrupt keeps the GPU: the next job must not wait behind it.
                # The job is gone (RunPod cancelled it), so the next one asks for the replacement.
                with contextlib.suppress(Exception):
                    if not await asyncio.shield(client.stops_within(prompt_id, 0)):
                        self.hung = prompt_id
            raise
        except ComfyDead as exc:
            if comfy_job is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.cancel(comfy_job), 2)
            return _dead(exc)
        except JobTimeout as exc:
            out = _failure(exc)
            if comfy_job is not None and not await client.stops_within(comfy_job.prompt_id, self.config.interrupt_grace):
                # The node ignores the interrupt (a stuck kernel, a blocking custom node): every later job
                # would wait behind it. Ask RunPod for a fresh worker instead of holding this GPU.
                self.hung = comfy_job.prompt_id
                out["refresh_worker"] = True
                out["details"]["worker_failure"] = True
                out["error"] += (f"; ComfyUI did not stop the job within {self.config.interrupt_grace:g}s of its "
                                 "interrupt, so this worker asks to be replaced")
            return out
        except GpuBridgeError as exc:
            return _failure(exc)
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await progress
            if comfy_job is not None:
                client.forget(comfy_job.prompt_id)
            if self.files is not None:  # the outputs are in memory by now: their files can go
                try:
                    self.files.end(comfy_job)  # synchronous: it runs even when the job was cancelled
                except Exception as exc:
                    log.warning("could not remove job files: %s", exc)
        self.jobs_run += 1
        return await self._output(job, result, t0)

    async def _wait(self, comfy_job: ComfyJob) -> None:
        """Wait for the job; with a managed ComfyUI, notice at once when its process dies."""
        if self.process is None:
            await comfy_job.wait()
            return
        done = asyncio.ensure_future(comfy_job.wait())
        try:
            while True:
                finished, _ = await asyncio.wait({done}, timeout=self.config.watchdog_interval)
                if finished:
                    done.result()
                    return
                if not self.process.alive():
                    raise ComfyDead(
                        f"ComfyUI exited (code {self.process.returncode}) while running job "
                        f"{comfy_job.prompt_id}", provider="comfy",
                    )
        finally:
            if not done.done():
                done.cancel()

    async def _report_progress(self, job: Mapping[str, Any], comfy_job: ComfyJob) -> None:
        # Each runpod progress_update is a thread and an HTTP request: at most one per interval, and a
        # trailing one at the interval's end, so the node that started last is never left unreported.
        interval = self.config.progress_interval
        last_sent = float("-inf")
        trailing: asyncio.Task[None] | None = None

        def send() -> None:
            nonlocal last_sent
            last_sent = time.monotonic()
            p = comfy_job.progress()
            send_progress(dict(job), {"progress": {
                "node_id": p.node_id, "node_type": p.node_type, "value": p.value, "max": p.max,
                "nodes_done": p.nodes_done, "nodes_total": p.nodes_total,
            }})

        async def send_later(delay: float) -> None:
            await asyncio.sleep(delay)  # the end of the throttle interval
            send()

        try:
            async for event in comfy_job.events():
                if event.type not in (EventType.EXECUTING, EventType.PROGRESS):
                    continue
                since = time.monotonic() - last_sent
                if since >= interval:
                    if trailing is not None:
                        trailing.cancel()
                        trailing = None
                    send()
                elif trailing is None or trailing.done():
                    trailing = asyncio.get_running_loop().create_task(send_later(interval - since))
        finally:
            if trailing is not None:
                trailing.cancel()

    async def _output(self, job: Mapping[str, Any], result: JobResult, t0: float) -> dict[str, Any]:
        t_enc = time.perf_counter()
        entries = [
            (art, await self._file_entry(str(job.get("id", "job")), art, index, _store_prefix(job)))
            for index, art in enumerate(result.artifacts) if art.kind is not ArtifactKind.TEXT
        ]
        t = result.timings
        timings = {
            "queued_s": t.queued_s,
            "executing_s": t.executing_s,
            "upload_s": t.upload_s,
            "download_s": t.download_s,
            "encode_s": round(time.perf_counter() - t_enc, 6),
            "total_s": round(time.perf_counter() - t0, 6),
        }
        out = output_of(result, version=GPUBRIDGE_VERSION, entries=entries, timings=timings)
        size = len(json.dumps(out, separators=(",", ":")))
        limit = self.config.max_output_bytes
        if size > limit:
            # RunPod refuses a result this large and the SDK only logs it: the job would never report.
            message = (f"The job's outputs are {size / 1e6:.1f} MB encoded; a RunPod result may be at most "
                       f"{limit / 1e6:.1f} MB (GPUBRIDGE_MAX_OUTPUT_MB). Set BUCKET_ENDPOINT_URL to upload "
                       "outputs to a bucket, or make the workflow return fewer or smaller files.")
            return {"error": message, "details": {"exception_type": "OutputTooLarge", "exception_message": message,
                                                  "size": size, "limit": limit,
                                                  "files": sum(len(out.get(k) or []) for k in
                                                               ("images", "videos", "gifs", "audio", "files"))}}
        return out

    async def _file_entry(self, job_id: str, art: Artifact, index: int, prefix: str | None = None
                          ) -> dict[str, Any]:
        if self.config.bucket_endpoint_url and art.data is not None:
            # worker-comfyui's contract: every file to the BUCKET_* bucket through runpod's rp_upload
            filename = file_entry(art, index, data="")["filename"]
            url = await asyncio.to_thread(_upload, job_id, filename, art.data)
            return file_entry(art, index, data=url, type_="s3_url")
        if self.artifacts is not None and art.data is not None and self.artifacts.should_upload(len(art.data)):
            filename = file_entry(art, index, data="")["filename"]
            stored = await self.artifacts.put(art.data, filename, content_type=art.mime_type, job_id=job_id,
                                              prefix=prefix)
            entry = file_entry(art, index, data=stored.url, type_="s3_url")
            entry.update(size=stored.size, sha256=stored.sha256, url_expires_at=stored.expires_at)
            return entry
        return file_entry(art, index)


def _templates() -> Any:
    """The workflow templates jobs may name (``{"template": ..., "params": ...}``): the folder in
    GPUBRIDGE_TEMPLATES (the image ships the repository's workflows/), checked at start so a bad one fails
    the deploy, not a job. None without the variable."""
    folder = os.environ.get("GPUBRIDGE_TEMPLATES")
    if not folder:
        return None
    from gpubridge.templates import TemplateRegistry

    return TemplateRegistry.load(folder)


def _store_prefix(job: Mapping[str, Any]) -> str | None:
    """``input.gpubridge.store_prefix`` (checked when the job arrived, see :meth:`Worker.handle`)."""
    raw = job.get("input")
    meta = raw.get("gpubridge") if isinstance(raw, Mapping) else None
    prefix = meta.get("store_prefix") if isinstance(meta, Mapping) else None
    return prefix if isinstance(prefix, str) and prefix else None


def _smaller(a: float | None, b: float | None) -> float | None:
    """The tighter of two limits (either may be unset): a caller never raises the operator's cap."""
    return min(x for x in (a, b) if x is not None) if (a is not None or b is not None) else None


def send_progress(job: dict[str, Any], payload: Any) -> None:
    """``runpod.serverless.progress_update``, looked up at call time (the endpoint double routes it). Off
    RunPod (``--test_input``, ``--rp_serve_api``) the SDK has nowhere to post it and logs "Failed to return
    job results" per update, so then it is not sent."""
    try:
        import runpod.serverless
    except ImportError:  # pragma: no cover - runpod is installed in the worker image
        return
    update = runpod.serverless.progress_update
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") and getattr(update, "__module__", "").startswith(
            "runpod."):
        return
    try:
        runpod.serverless.progress_update(job, payload)
    except Exception as exc:  # progress is best effort
        log.debug("progress update failed: %s", exc)


def _upload(job_id: str, filename: str, data: bytes) -> str:
    from runpod.serverless.utils import rp_upload

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(filename).name
        path.write_bytes(data)
        return rp_upload.upload_image(job_id, str(path))


def _dead(exc: BaseException) -> dict[str, Any]:
    message = f"ComfyUI is not reachable: {exc}"
    return {
        "error": message,
        "refresh_worker": True,
        "details": {
            "exception_type": "ProviderUnavailable",
            "exception_message": str(exc),
            "worker_failure": True,
        },
    }


def _failure(exc: GpuBridgeError) -> dict[str, Any]:
    details: dict[str, Any] = {"exception_type": type(exc).__name__, "exception_message": str(exc)}
    if isinstance(exc, JobFailed):
        details.update(
            node=exc.node_id,
            node_id=exc.node_id,
            node_type=exc.node_type,
            exception_type=exc.exception_type,
            exception_message=exc.exception_message,
            traceback=exc.traceback,
        )
        if exc.details:
            details["comfy"] = _jsonable(exc.details)
        message = (
            f"Workflow execution error: Node Type: {exc.node_type}, Node ID: {exc.node_id}, "
            f"Message: {exc.exception_message}"
        )
        return {"error": message, "details": details}
    if isinstance(exc, WorkflowInvalid):
        details.update(error=exc.error, node_errors=exc.node_errors)
        lines = "\n".join(f"• {e}" for e in exc.errors) or exc.error.get("message", "")
        return {"error": f"Workflow validation failed:\n{lines}", "details": details}
    if isinstance(exc, ProviderUnavailable):
        return _dead(exc)  # ComfyUI went away during the job
    if isinstance(exc, JobTimeout):
        details.update(state=exc.state)
        return {"error": f"Job timed out: {exc}", "details": details}
    if isinstance(exc, JobCancelled):
        return {"error": f"Job was cancelled in ComfyUI: {exc}", "details": details}
    if isinstance(exc, AuthError):
        return {"error": f"ComfyUI refused the worker: {exc}", "details": details}
    return {"error": str(exc), "details": details}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------- module API

_WORKER: Worker | None = None


def get_worker() -> Worker:
    global _WORKER
    if _WORKER is None:
        _WORKER = Worker(WorkerConfig.from_env())
    return _WORKER


def configure(**overrides: Any) -> Worker:
    """Replace the process's worker with one built from the environment plus ``overrides`` (tests)."""
    global _WORKER
    quiet_runpod_sdk_logs()
    _WORKER = Worker(replace(WorkerConfig.from_env(), **overrides))
    return _WORKER


def init() -> Worker:
    """Start ComfyUI (if managed) before taking jobs."""
    worker = get_worker()
    worker.init()
    return worker


async def aclose() -> None:
    if _WORKER is not None:
        await _WORKER.aclose()


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler: ``runpod.serverless.start({"handler": handler})``. A failure leaves in
    worker-comfyui's shape: ``details`` a list of strings, the typed fields in ``gpubridge_error``."""
    out = await get_worker().handle(job)
    if "error" in out and isinstance(out.get("details"), dict):
        extra = {k: v for k, v in out.items() if k not in ("error", "details")}
        return worker_comfyui_failure(out["error"], out["details"], **extra)
    return out


if __name__ == "__main__":  # pragma: no cover - the container's entry point
    import runpod

    quiet_runpod_sdk_logs()
    init()
    runpod.serverless.start({"handler": handler})
