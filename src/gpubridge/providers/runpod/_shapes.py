"""The shapes RunPod and the worker send: job states, FAILED bodies, outputs, progress; small parsers."""

from __future__ import annotations

import hashlib
import base64
import contextlib
import binascii
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ...comfy.protocol import guess_mime, is_worker_failure
from ...errors import GpuBridgeError, ProtocolError, JobFailed, WorkflowFormatError, WorkflowInputError, WorkflowInvalid
from ...models import Artifact, ArtifactKind, JobRequest, JobState, Progress, artifact_kind

_STATES = {
    "IN_QUEUE": JobState.QUEUED,
    "IN_PROGRESS": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,  # in RunPod's docs; the API answers IN_PROGRESS
    "COMPLETED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "TIMED_OUT": JobState.TIMED_OUT,
}
# Output keys that list files, in worker-comfyui's shape ({"filename", "type": "base64"|"s3_url", "data"}).
_FILE_KEYS = ("images", "videos", "gifs", "audio", "files", "previews")


@contextlib.contextmanager
def parsing(what: str, *, job_id: str | None = None, provider: str | None = None) -> Iterator[None]:
    """The one place a RunPod body is read: anything unexpected in it (wrong types, missing keys) becomes
    a ProtocolError, retryable because it is the backend's fault, instead of a TypeError or
    ValidationError that nothing can classify."""
    try:
        yield
    except GpuBridgeError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ProtocolError(
            f"RunPod sent {what}" + (f" for job {job_id}" if job_id else "")
            + f" that gpubridge cannot read ({type(exc).__name__}: {text})",
            provider=provider, retryable=True,
        ) from None


_WORKER_FAILURE_TEXT = re.compile(
    r"worker (?:exited|crashed|died|was lost|lost)|out of memory|exit code -?\d+|"
    r"comfyui (?:at \S+ )?(?:is not reachable|not reachable|went away|died|is dead)|cannot reach comfyui",
    re.IGNORECASE,
)
_WC_EXEC = re.compile(r"Node Type: (?P<type>[^,]+), Node ID: (?P<id>[^,]+), Message: (?P<msg>.*)", re.DOTALL)


def _clean_type(value: Any) -> str | None:
    if not value:
        return None
    text = str(value)
    m = re.fullmatch(r"<class '([^']+)'>", text.strip())
    text = m.group(1) if m else text.strip()
    for prefix in ("builtins.", "__main__."):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def parse_failure(body: Mapping[str, Any], *, job_id: str | None = None, provider: str | None = None) -> GpuBridgeError:
    """The typed error of a FAILED job: its ``error`` (a JSON string for worker exceptions, else text),
    plus ``output.details`` (worker-comfyui's list of strings) and ``output.gpubridge_error`` (the gpubridge
    worker's typed fields), lose nothing."""
    raw = body.get("error")
    output = body.get("output") if isinstance(body.get("output"), Mapping) else {}
    parsed: Mapping[str, Any] | None = None
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            candidate = json.loads(raw)
            parsed = candidate if isinstance(candidate, Mapping) else None
        except ValueError:
            parsed = None
    elif isinstance(raw, Mapping):
        parsed = raw
    details_raw = output.get("details") if output else None
    if details_raw is None and parsed is not None:
        details_raw = parsed.get("details")
    typed = output.get("gpubridge_error") if output else None  # the gpubridge worker's typed fields
    details: dict[str, Any] = dict(typed) if isinstance(typed, Mapping) else (
        dict(details_raw) if isinstance(details_raw, Mapping) else {})  # (a dict: gpubridge workers before 0.2)
    if isinstance(details_raw, list):
        details.setdefault("errors", list(details_raw))

    text = (parsed.get("error_message") or parsed.get("error")) if parsed is not None else raw
    text = str(text) if text is not None else "RunPod reported the job FAILED without an error"
    exc_type = _clean_type(details.get("exception_type")) or _clean_type(parsed.get("error_type") if parsed else None)
    exc_message = details.get("exception_message") or (parsed.get("error_message") if parsed else None)
    traceback = details.get("traceback") or (parsed.get("error_traceback") if parsed else None) or None
    node_id = details.get("node_id", details.get("node"))
    node_type = details.get("node_type")
    # worker-comfyui: "Workflow execution error: Node Type: X, Node ID: N, Message: M" (in error or details)
    for candidate in [text, *[e for e in details.get("errors", []) if isinstance(e, str)]]:
        m = _WC_EXEC.search(candidate)
        if m and node_id is None:
            node_type = node_type or m.group("type").strip()
            node_id = m.group("id").strip()
            exc_message = exc_message or m.group("msg").strip()
    node_id = str(node_id) if node_id is not None else None
    extra = {k: parsed[k] for k in ("hostname", "worker_id", "runpod_version") if parsed and parsed.get(k)}
    if body.get("workerId"):
        extra["worker_id"] = body["workerId"]
    full_details = {**details, **({"runpod": extra} if extra else {})}
    if output:
        full_details.setdefault("output", {k: v for k, v in output.items() if k not in ("details", "gpubridge_error")})

    # Errors the workflow or its inputs caused, reported by the gpubridge worker, keep their own type.
    if exc_type == "WorkflowInvalid" or (text.startswith("Workflow validation failed") and exc_type is None):
        return WorkflowInvalid(
            f"RunPod worker rejected the workflow: {text}" if not details.get("node_errors") else None,
            error=details.get("error") if isinstance(details.get("error"), Mapping) else {"message": text},
            node_errors=details.get("node_errors") if isinstance(details.get("node_errors"), Mapping) else {},
            provider=provider,
        )
    if exc_type in ("WorkflowFormatError", "WorkflowInputError"):
        cls = WorkflowFormatError if exc_type == "WorkflowFormatError" else WorkflowInputError
        return cls(f"RunPod worker: {text}", provider=provider)

    # Retryable only when the worker (not the workflow) failed: the worker says so, the error type means
    # the process died or ran out of memory, or (no node to blame) the text says the worker/ComfyUI died.
    worker_failure = bool(
        details.get("worker_failure")
        or details.get("refresh_worker")
        or is_worker_failure(exc_type, None if exc_message is None else str(exc_message))
        or (node_id is None and (_WORKER_FAILURE_TEXT.search(text)
                                 or _WORKER_FAILURE_TEXT.search(str(exc_message or ""))))
    )
    if node_id:
        where = f"node {node_id}" + (f" ({node_type})" if node_type else "")
        message = f"{where} raised {exc_type or 'an error'}" + (f": {str(exc_message).strip()}" if exc_message else "")
    else:
        message = text if exc_type is None or text.startswith(exc_type) else f"{exc_type}: {text}"
    return JobFailed(
        f"RunPod job {job_id} failed: {message}" if job_id else message,
        job_id=job_id,
        provider=provider,
        node_id=node_id,
        node_type=node_type,
        exception_type=exc_type,
        exception_message=str(exc_message).strip() if exc_message else text,
        traceback=traceback,
        details=full_details,
        retryable=worker_failure,
    )


# ---------------------------------------------------------------------------------------------- helpers


def _progress_of(output: Any) -> Progress | None:
    """Progress from an IN_PROGRESS ``output`` (what the worker sent with progress_update)."""
    if not isinstance(output, Mapping):
        return None
    p = output.get("progress")
    if isinstance(p, Mapping):
        try:
            return Progress(
                node_id=str(p["node_id"]) if p.get("node_id") is not None else None,
                node_type=p.get("node_type"),
                value=_float(p.get("value")),
                max=_float(p.get("max")),
                nodes_done=p.get("nodes_done"),
                nodes_total=p.get("nodes_total"),
            )
        except (ValueError, TypeError):
            return None
    if isinstance(p, (int, float)):
        return Progress(value=float(p), max=100.0)
    if isinstance(output.get("percent"), (int, float)):
        return Progress(value=float(output["percent"]), max=100.0)
    return None


def _artifacts_of(output: Any) -> tuple[list[Artifact], dict[str, Any], list[str], dict[str, Any]]:
    """Artifacts from worker-comfyui's output shape (and its gpubridge extensions)."""
    if not isinstance(output, Mapping):
        return [], ({"output": output} if output is not None else {}), [], {}
    artifacts: list[Artifact] = []
    warnings: list[str] = [str(e) for e in output.get("errors") or []] if isinstance(output.get("errors"), list) else []
    for key in _FILE_KEYS:
        for item in output.get(key) or []:
            if not isinstance(item, Mapping):
                continue
            art = _artifact_of(key, item)
            if art is not None:
                artifacts.append(art)
    message = output.get("message")
    if isinstance(message, str) and message and not artifacts:  # worker-comfyui < 5: one image
        art = _artifact_of("images", {"filename": None, "type": "base64", "data": message})
        if art is not None:
            artifacts.append(art)
    for item in output.get("text") or []:
        if isinstance(item, Mapping):
            artifacts.append(Artifact(node_id=str(item.get("node_id", "")), kind=ArtifactKind.TEXT,
                                      text=str(item.get("text", "")), mime_type="text/plain"))
        elif isinstance(item, str):
            artifacts.append(Artifact(node_id="", kind=ArtifactKind.TEXT, text=item, mime_type="text/plain"))
    meta = output.get("gpubridge") if isinstance(output.get("gpubridge"), Mapping) else {}
    outputs = dict(meta.get("outputs") or {}) if isinstance(meta.get("outputs"), Mapping) else {}
    warnings.extend(str(w) for w in meta.get("warnings") or [])
    timings = output.get("timings") if isinstance(output.get("timings"), Mapping) else {}
    return artifacts, outputs, warnings, dict(timings)


def _artifact_of(key: str, item: Mapping[str, Any]) -> Artifact | None:
    filename = item.get("filename")
    kind_of_data = item.get("type") or "base64"
    data = url = None
    value = item.get("data")
    if not isinstance(value, str):
        return None
    if kind_of_data == "s3_url" or value.startswith(("http://", "https://")):
        url = value
    else:
        if value.startswith("data:"):
            value = value.partition(",")[2]
        try:
            data = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            return None
    mime = item.get("mime_type") or (guess_mime(filename) if filename else None)
    if mime is None and data:
        from ...models import _sniff_mime  # filetype-based sniffing

        mime = _sniff_mime(data)
    if key == "videos":
        kind = ArtifactKind.VIDEO if not mime or not mime.startswith("image/") else ArtifactKind.ANIMATION
    elif key == "gifs":
        kind = artifact_kind(mime, animated=True) if mime else ArtifactKind.ANIMATION
    else:
        kind = artifact_kind(mime, animated=bool(item.get("animated")))
    return Artifact(
        node_id=str(item.get("node_id", "")),
        kind=kind,
        filename=filename,
        subfolder=str(item.get("subfolder") or ""),
        type=item.get("comfy_type") or "output",
        mime_type=mime,
        data=data,
        url=url,
        url_expires_at=item.get("url_expires_at") if isinstance(item.get("url_expires_at"), (int, float)) else None,
        sha256=item.get("sha256") if isinstance(item.get("sha256"), str) else None,
        width=item.get("width"),
        height=item.get("height"),
        size=len(data) if data is not None else (item["size"] if isinstance(item.get("size"), int) else None),
    )


def _pick(body: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: body[k] for k in keys if body.get(k) is not None}


def _int_map(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    out = {}
    for k, v in value.items():
        try:
            out[str(k)] = int(v)
        except (TypeError, ValueError):
            continue
    return out


def _seconds(ms: Any) -> float | None:
    value = _float(ms)
    return round(value / 1000.0, 6) if value is not None else None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _clamp_ms(seconds: float, low: float, high: float) -> int:
    return int(math.ceil(min(high, max(low, seconds)) * 1000))


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _workflow_key(request: JobRequest) -> str:
    """Jobs of one workflow take about as long as each other: key them by the graph's node types (seeds,
    prompts and sizes aside), or by ``tags["workflow"]`` when the caller names it."""
    named = request.tags.get("workflow")
    if named:
        return f"tag:{named}"
    types = sorted(str(n.get("class_type")) for n in request.workflow.to_api().values())
    return "graph:" + hashlib.sha1("|".join(types).encode()).hexdigest()[:16]

