"""RunPod's serverless wire shapes, as worker-comfyui speaks them: the job ``input``, the worker's output and
its errors, and RunPod's job status body. Shared by the gateway's RunPod facade and the RunPod worker
(``contrib/runpod_worker``), so both read and write exactly the same JSON.

Input (worker-comfyui's)::

    {"workflow": {<API-format graph>}, "images": [{"name": "face.png", "image": "<base64, data URI or URL>"}],
     "comfy_org_api_key": "...", "timeout": 300}          # the last two optional

Output: ``{"images": [{"filename", "type": "base64", "data", "node_id", "mime_type", "width", "height"}], ...}``
(see :func:`output_of`). Status: ``{"id", "status", "delayTime", "executionTime", "output" | "error"}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import mimetypes
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpubridge.errors import WorkflowError, WorkflowInputError
from gpubridge.fetch import parse_url
from gpubridge.models import Artifact, ArtifactKind, InputFile, JobResult, JobState, Workflow

__all__ = [
    "GPUBRIDGE_VERSION", "InputError", "JobInput", "parse_input", "decode_image", "KIND_KEY", "ext", "file_entry", "output_of",
    "failure_of", "worker_comfyui_failure", "RUNPOD_STATES", "quiet_runpod_sdk_logs",
]

try:
    from importlib.metadata import version as _version

    GPUBRIDGE_VERSION = _version("gpubridge")
except Exception:  # pragma: no cover - not installed as a distribution
    GPUBRIDGE_VERSION = "unknown"
"""gpubridge's version, as outputs report it (``output.gpubridge.version``)."""

KIND_KEY = {
    ArtifactKind.IMAGE: "images",
    ArtifactKind.ANIMATION: "gifs",
    ArtifactKind.VIDEO: "videos",
    ArtifactKind.AUDIO: "audio",
    ArtifactKind.FILE: "files",
}

RUNPOD_STATES = {
    JobState.QUEUED: "IN_QUEUE",
    JobState.RUNNING: "IN_PROGRESS",
    JobState.SUCCEEDED: "COMPLETED",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "CANCELLED",
    JobState.TIMED_OUT: "TIMED_OUT",
}


class InputError(Exception):
    """The job input is unusable (worker-comfyui's messages). ``exception_type``: the gpubridge error type."""

    def __init__(self, message: str, errors: list[str] | None = None, exception_type: str = "WorkflowInputError"):
        super().__init__(message)
        self.message = message
        self.errors = errors or []
        self.exception_type = exception_type


@dataclass
class JobInput:
    workflow: dict[str, Any]
    images: dict[str, InputFile]
    comfy_org_api_key: str | None = None
    timeout: float | None = None
    template: str | None = None
    template_version: str | None = None
    params: dict[str, Any] | None = None


class _BadUrl(ValueError):
    pass


def parse_input(raw: Any, templates: Any = None) -> JobInput:
    """Validate worker-comfyui's input shape (same messages), decoding the images. ``{"template": NAME,
    "params": {...}}`` in place of ``workflow`` renders a template of ``templates`` (a
    :class:`~gpubridge.templates.TemplateRegistry`); a bad parameter is an :class:`InputError` naming it."""
    if raw is None or raw == "":
        raise InputError("Please provide input")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise InputError("Invalid JSON format in input") from None
    if not isinstance(raw, Mapping):
        raise InputError("Invalid JSON format in input")
    workflow = raw.get("workflow")
    rendered = None
    if workflow is None and raw.get("template") is not None:
        rendered = _render(raw, templates)
        workflow = rendered.workflow.to_api()
    if workflow is None:
        raise InputError("Missing 'workflow' parameter", exception_type="WorkflowFormatError")
    try:
        workflow = Workflow.model_validate(workflow).to_api()
    except WorkflowError as exc:
        raise InputError(str(exc), exception_type=type(exc).__name__) from None
    except Exception as exc:  # pydantic ValidationError wrapping our error
        raise InputError(f"Invalid workflow: {exc}", exception_type="WorkflowFormatError") from None
    images_raw = raw.get("images")
    images: dict[str, InputFile] = {}
    if images_raw is not None:
        if not isinstance(images_raw, list) or not all(
            isinstance(i, Mapping) and "name" in i and "image" in i for i in images_raw
        ):
            raise InputError("'images' must be a list of objects with 'name' and 'image' keys")
        errors = []
        for item in images_raw:
            name, value = str(item["name"]), item["image"]
            try:
                images[name] = decode_image(name, value)
            except _BadUrl as exc:
                errors.append(str(exc))
            except ValueError as exc:
                errors.append(f"Error decoding base64 for {name}: {exc}")
        if errors:
            raise InputError("Failed to upload one or more input images", errors)
    gb = raw.get("gpubridge") if isinstance(raw.get("gpubridge"), Mapping) else {}
    timeout = raw.get("timeout", gb.get("timeout"))
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0 or timeout == float("inf")):
        raise InputError(f"'timeout' must be a positive number of seconds, not {timeout!r}")
    key = raw.get("comfy_org_api_key")
    if rendered is not None:
        clash = set(images) & set(rendered.inputs)
        if clash:
            raise InputError(f"'images' has {', '.join(sorted(clash))}, which a template parameter uploads",
                             exception_type="ParamInvalid")
        images.update(rendered.inputs)
    return JobInput(
        workflow=workflow,
        images=images,
        comfy_org_api_key=key if isinstance(key, str) and key else None,
        timeout=float(timeout) if timeout is not None else None,
        template=raw["template"] if rendered is not None else None,
        template_version=templates[raw["template"]].version if rendered is not None else None,
        params=rendered.params if rendered is not None else None,
    )


def _render(raw: Mapping[str, Any], templates: Any) -> Any:
    from gpubridge.errors import ParamInvalid, TemplateNotFound

    name, params = raw.get("template"), raw.get("params", {})
    if not isinstance(name, str) or not name:
        raise InputError("'template' must be a template name", exception_type="TemplateNotFound")
    if not isinstance(params, Mapping):
        raise InputError("'params' must be an object of template parameters", exception_type="ParamInvalid")
    if templates is None:
        raise InputError(f"No template {name!r}: this worker has no templates (GPUBRIDGE_TEMPLATES)",
                         exception_type="TemplateNotFound")
    try:
        return templates[name].render(params, remote=True)
    except TemplateNotFound as exc:
        raise InputError(exc.message, exception_type="TemplateNotFound") from None
    except ParamInvalid as exc:
        raise InputError(exc.message, [f"{k}: {v}" for k, v in exc.params.items()],
                         exception_type="ParamInvalid") from None


def decode_image(name: str, value: Any) -> InputFile:
    """An ``images[].image``: base64 (optionally a data URI) or an http(s) URL (a gpubridge extension)."""
    if not isinstance(value, str) or not value:
        raise ValueError("the image must be a base64 string, a data URI or a URL")
    if value.startswith(("http://", "https://")):
        # Syntax checked here; the address, size, time and type when it is fetched (gpubridge.fetch,
        # configured by GPUBRIDGE_FETCH_*: private and loopback addresses are refused unless allowed).
        try:
            parse_url(value, f"image {name!r}")
        except WorkflowInputError as exc:
            raise _BadUrl(str(exc)) from None
        return InputFile(url=value)
    if value.startswith("data:") or "," in value[:100]:
        value = value.split(",", 1)[1]  # worker-comfyui: strip any data URI prefix
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None
    if not data:
        raise ValueError("empty image")
    return InputFile(data=data)


def ext(mime: str | None) -> str:
    return (mimetypes.guess_extension(mime or "") or ".bin") if mime else ".bin"


def file_entry(art: Artifact, index: int, *, data: str | None = None, type_: str = "base64") -> dict[str, Any]:
    """One output file, worker-comfyui's shape; ``data`` defaults to the artifact's bytes in base64."""
    filename = art.filename or f"node{art.node_id}_{index}{ext(art.mime_type)}"
    if data is None and art.data is None and art.url is not None:
        data, type_ = art.url, "s3_url"  # an artifact the store holds: its presigned URL
    if data is None:
        data = base64.b64encode(art.data).decode("ascii") if art.data is not None else ""
    entry: dict[str, Any] = {"filename": filename, "type": type_, "data": data,
                             "node_id": art.node_id, "mime_type": art.mime_type}
    if art.url_expires_at is not None:
        entry["url_expires_at"] = art.url_expires_at
    if art.sha256 is not None:
        entry["sha256"] = art.sha256
    if art.subfolder:
        entry["subfolder"] = art.subfolder
    if art.width and art.height:
        entry["width"], entry["height"] = art.width, art.height
    if art.size is not None:
        entry["size"] = art.size
    if art.metadata.get("animated"):
        entry["animated"] = True
    return entry


def output_key(art: Artifact) -> str:
    """Where an output goes. ``images`` holds exactly what worker-comfyui puts there: every non-temp entry
    of a node's ComfyUI ``images`` list (animated WebP and core video saves included), so its clients get
    everything; the rest go beside it by kind (``gifs``, ``videos``, ``audio``, ``files``), and temp
    previews under ``previews`` (worker-comfyui drops them)."""
    if art.type == "temp":
        return "previews"
    key = art.metadata.get("key")
    if key == "images" or (key is None and art.kind in (ArtifactKind.IMAGE, ArtifactKind.ANIMATION)):
        return "images"
    return KIND_KEY.get(art.kind, "files")


def output_of(result: JobResult, *, version: str = GPUBRIDGE_VERSION, entries: list[tuple[Artifact, dict[str, Any]]] | None = None,
              timings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A successful job's output in worker-comfyui's shape, extended with gpubridge's fields. ``entries``:
    the file entries already built (e.g. uploaded to a bucket); by default every artifact inline."""
    if entries is None:
        entries = [(a, file_entry(a, i)) for i, a in enumerate(result.artifacts) if a.kind is not ArtifactKind.TEXT]
    out: dict[str, Any] = {"images": []}
    for art, entry in entries:
        out.setdefault(output_key(art), []).append(entry)
    texts = [{"node_id": a.node_id, "text": a.text or ""} for a in result.artifacts if a.kind is ArtifactKind.TEXT]
    if texts:
        out["text"] = texts
    if result.warnings:
        out["errors"] = list(result.warnings)
    if not any(out.get(k) for k in (*KIND_KEY.values(), "previews")) and not texts and not result.warnings:
        out["status"] = "success_no_images"  # worker-comfyui's marker
    t = result.timings
    out["timings"] = dict(timings) if timings is not None else {
        "queued_s": t.queued_s, "executing_s": t.executing_s, "upload_s": t.upload_s,
        "download_s": t.download_s,
    }
    out["gpubridge"] = {"version": version, "prompt_id": result.job_id, "outputs": result.outputs,
                        "warnings": list(result.warnings)}
    return out


def worker_comfyui_failure(error: str, typed: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A failed job's output as worker-comfyui writes it: ``error`` text and ``details``, a list of strings;
    gpubridge's typed fields (exception type, node, node_errors, worker_failure...) beside them in
    ``gpubridge_error``, so stock clients read what they know and gpubridge's provider loses nothing."""
    node_id = typed.get("node_id", typed.get("node"))
    node_errors = typed.get("node_errors")
    if node_id is not None:
        lines = [f"Workflow execution error: Node Type: {typed.get('node_type')}, Node ID: {node_id}, "
                 f"Message: {typed.get('exception_message')}"]
    elif isinstance(node_errors, Mapping) and node_errors:
        lines = [f"Node {nid} ({key}): {value}"  # worker-comfyui's own format for ComfyUI's node_errors
                 for nid, err in node_errors.items()
                 for key, value in (err.items() if isinstance(err, Mapping) else [("error", err)])]
    elif isinstance(typed.get("errors"), list) and typed["errors"]:
        lines = [str(e) for e in typed["errors"]]
    else:
        lines = [str(typed.get("exception_message") or error)]
    return {"error": error, "details": lines, "gpubridge_error": dict(typed), **extra}


def failure_of(error: Mapping[str, Any]) -> dict[str, Any]:
    """A failed job's ``{"error", "details", "gpubridge_error"}`` from gpubridge's error dict (``error_dict``):
    worker-comfyui's texts where it has one (:func:`worker_comfyui_failure`)."""
    kind = str(error.get("type") or "JobFailed")
    message = str(error.get("message") or "the job failed")
    details: dict[str, Any] = {"exception_type": error.get("exception_type") or kind, "exception_message": message,
                               "gpubridge_error": dict(error)}
    node_id, node_type = error.get("node_id"), error.get("node_type")
    if node_id is not None:
        details.update(node=node_id, node_id=node_id, node_type=node_type,
                       exception_message=error.get("exception_message") or message)
        if error.get("traceback"):
            details["traceback"] = error["traceback"]
        text = (f"Workflow execution error: Node Type: {node_type}, Node ID: {node_id}, "
                f"Message: {details['exception_message']}")
        return worker_comfyui_failure(text, details)
    if kind == "WorkflowInvalid":
        if isinstance(error.get("node_errors"), Mapping):
            details["node_errors"] = error["node_errors"]
        return worker_comfyui_failure(f"Workflow validation failed:\n{message}", details)
    if kind in ("ProviderUnavailable", "WorkerLost") or error.get("retryable"):
        details["worker_failure"] = True
    return worker_comfyui_failure(message, details)


def quiet_runpod_sdk_logs() -> None:
    """Keep the runpod SDK's logging to what an operator needs. The SDK prints at DEBUG unless told
    otherwise (every job's whole output, base64 images included), and importing it configures the root
    logger at INFO, so httpx then logs every HTTP request. This sets the SDK's logger to INFO unless
    ``RUNPOD_LOG_LEVEL``/``RUNPOD_DEBUG_LEVEL`` choose a level, and httpx/httpcore to WARNING unless the
    application set them. Does nothing without the SDK."""
    try:
        from runpod.serverless.modules.rp_logger import RunPodLogger
    except ImportError:
        return
    if not (os.environ.get("RUNPOD_LOG_LEVEL") or os.environ.get("RUNPOD_DEBUG_LEVEL")):
        RunPodLogger.level = "INFO"  # the class attribute its singleton reads; set_level() would log a line
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
