"""ComfyUI's wire formats, as pure functions: no I/O here.

The rules come from recordings of a real ComfyUI server (tests/fixtures/comfyui-contract/README.md):

- Text websocket frames are ``{"type", "data"}``. A job is done when ``executing`` arrives with
  ``node: null`` for its prompt_id (sent after the history entry is written); ``execution_success`` comes
  before the history entry exists and is not a completion signal.
- Binary frames start with a big-endian uint32 event type: 1 = preview image (then a uint32 format,
  1 JPEG / 2 PNG), 3 = text (uint32 node-id length, node id, UTF-8 text), 4 = preview image with a JSON
  metadata block (uint32 length, JSON, image bytes).
- Outputs are ``{node_id: {"images"|"gifs"|"audio"|...: [{filename, subfolder, type}], "text": [...],
  "animated": [bool]}}``. Videos may be reported under ``images``: their kind comes from the file type.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ..errors import JobFailed, WorkflowInvalid
from ..models import ArtifactKind, artifact_kind

__all__ = [
    "BinaryFrame",
    "OutputRef",
    "decode_binary_frame",
    "output_refs",
    "text_outputs",
    "prepare_prompt",
    "input_upload_name",
    "execution_error",
    "validation_error",
    "guess_mime",
    "history_outcome",
    "is_worker_failure",
    "FILE_OUTPUT_KEYS",
]

# Keys under a node's output that list files. ComfyUI core uses "images" (also for videos, with
# "animated"), "audio", "3d"/"meshes"; VideoHelperSuite uses "gifs"; some nodes use "videos" or "files".
FILE_OUTPUT_KEYS = ("images", "gifs", "videos", "audio", "files", "3d", "meshes")

BINARY_PREVIEW_IMAGE = 1
BINARY_UNENCODED_PREVIEW_IMAGE = 2
BINARY_TEXT = 3
BINARY_PREVIEW_IMAGE_WITH_METADATA = 4
_IMAGE_FORMATS = {1: "image/jpeg", 2: "image/png"}

mimetypes.add_type("image/webp", ".webp")
mimetypes.add_type("video/webm", ".webm")
mimetypes.add_type("video/mp4", ".mp4")
mimetypes.add_type("audio/flac", ".flac")
mimetypes.add_type("model/gltf-binary", ".glb")


@dataclass(frozen=True, slots=True)
class BinaryFrame:
    event: int
    data: bytes = b""
    mime_type: str | None = None
    node_id: str | None = None
    prompt_id: str | None = None
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.event in (BINARY_PREVIEW_IMAGE, BINARY_PREVIEW_IMAGE_WITH_METADATA)


def decode_binary_frame(frame: bytes) -> BinaryFrame:
    """Decode one binary websocket frame. Unknown or short frames come back with only ``event`` set."""
    if len(frame) < 4:
        return BinaryFrame(event=-1)
    (event,) = struct.unpack_from(">I", frame, 0)
    try:
        if event == BINARY_PREVIEW_IMAGE and len(frame) >= 8:
            (fmt,) = struct.unpack_from(">I", frame, 4)
            return BinaryFrame(event=event, data=frame[8:], mime_type=_IMAGE_FORMATS.get(fmt))
        if event == BINARY_TEXT and len(frame) >= 8:
            (n,) = struct.unpack_from(">I", frame, 4)
            node_id = frame[8 : 8 + n].decode("utf-8")
            return BinaryFrame(event=event, node_id=node_id, text=frame[8 + n :].decode("utf-8", "replace"))
        if event == BINARY_PREVIEW_IMAGE_WITH_METADATA and len(frame) >= 8:
            (n,) = struct.unpack_from(">I", frame, 4)
            meta = json.loads(frame[8 : 8 + n])
            return BinaryFrame(
                event=event,
                data=frame[8 + n :],
                mime_type=meta.get("image_type"),
                node_id=meta.get("node_id"),
                prompt_id=meta.get("prompt_id"),
                metadata=meta,
            )
    except (ValueError, UnicodeDecodeError, struct.error):
        pass
    return BinaryFrame(event=event, data=frame[4:])


@dataclass(frozen=True, slots=True)
class OutputRef:
    """A file a node wrote, as ComfyUI reports it."""

    node_id: str
    key: str
    filename: str
    subfolder: str
    type: str
    animated: bool = False
    format: str | None = None

    @property
    def mime_type(self) -> str | None:
        return guess_mime(self.filename, self.format)

    @property
    def kind(self) -> ArtifactKind:
        return artifact_kind(self.mime_type, animated=self.animated)

    def view_params(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


def guess_mime(filename: str, fmt: str | None = None) -> str | None:
    if fmt and "/" in fmt:  # VHS reports e.g. "video/h264-mp4"
        major, _, minor = fmt.partition("/")
        if major in ("video", "image", "audio"):
            mime = mimetypes.guess_type(filename)[0]
            return mime or f"{major}/{minor.split('-')[-1]}"
    return mimetypes.guess_type(filename)[0]


def output_refs(outputs: Mapping[str, Any], *, include_temp: bool = True) -> list[OutputRef]:
    """Every file listed in a history/executed ``outputs`` mapping, in node order."""
    refs: list[OutputRef] = []
    for node_id, out in outputs.items():
        if not isinstance(out, Mapping):
            continue
        animated_flags = out.get("animated")
        animated = bool(animated_flags and any(animated_flags))
        for key in FILE_OUTPUT_KEYS:
            items = out.get(key)
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, Mapping) or not item.get("filename"):
                    continue
                ftype = item.get("type") or "output"
                if ftype == "temp" and not include_temp:
                    continue
                refs.append(
                    OutputRef(
                        node_id=str(node_id),
                        key=key,
                        filename=str(item["filename"]),
                        subfolder=str(item.get("subfolder") or ""),
                        type=str(ftype),
                        animated=animated,
                        format=item.get("format"),
                    )
                )
    return refs


def text_outputs(outputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(node_id, text) for every text value in ``outputs`` (PreviewAny, ShowText and the like)."""
    found: list[tuple[str, str]] = []
    for node_id, out in outputs.items():
        if not isinstance(out, Mapping):
            continue
        for value in out.get("text") or ():
            found.append((str(node_id), value if isinstance(value, str) else json.dumps(value)))
    return found


# ------------------------------------------------------------------------------------------- prompting


def input_upload_name(name: str, data: bytes) -> str:
    """A content-addressed file name for an uploaded input: identical bytes share one file, different
    bytes never collide, whatever names concurrent jobs use."""
    digest = hashlib.sha256(data).hexdigest()[:24]
    suffix = PurePosixPath(name).suffix.lower() or ".png"
    return f"{digest}{suffix}"


def prepare_prompt(
    prompt: Mapping[str, Mapping[str, Any]],
    *,
    output_prefix: str | None,
    input_paths: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The prompt to send: output prefixes made unique for this job, input names pointed at uploads.

    ``output_prefix`` (e.g. ``"gpubridge/3fa2c1d0"``) is put in front of every ``filename_prefix`` input,
    so concurrent jobs never write the same files and each job's outputs sit in their own folder.
    ``input_paths`` maps input names (``face.png``) to their uploaded path (``gpubridge/ab12...png``);
    every string input equal to such a name is rewritten. The caller's prompt is not modified: only the
    nodes that change are copied.
    """
    paths = input_paths or {}
    out: dict[str, Any] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        if not isinstance(inputs, Mapping):
            out[node_id] = node
            continue
        changed: dict[str, Any] | None = None
        for key, value in inputs.items():
            if type(value) is not str:
                continue
            new = value
            if key == "filename_prefix" and output_prefix:
                new = f"{output_prefix}/{value.lstrip('/')}" if value else output_prefix
            elif value in paths:
                new = paths[value]
            if new is not value:
                if changed is None:
                    changed = dict(inputs)
                changed[key] = new
        if changed is None:
            out[node_id] = node
        else:
            copy = dict(node)
            copy["inputs"] = changed
            out[node_id] = copy
    return out


# ---------------------------------------------------------------------------------------------- errors


def validation_error(body: Any, *, provider: str | None = None) -> WorkflowInvalid:
    """WorkflowInvalid from ComfyUI's 400 body ``{"error": {...}, "node_errors": {...}}``."""
    if not isinstance(body, Mapping):
        return WorkflowInvalid(f"ComfyUI rejected the workflow: {str(body)[:300]}", provider=provider)
    error = body.get("error")
    if isinstance(error, str):
        error = {"type": "error", "message": error}
    return WorkflowInvalid(error=error or {}, node_errors=body.get("node_errors") or {}, provider=provider)


# Exceptions that say the machine, not the workflow, failed: the same job may succeed on a bigger GPU or a
# fresh worker. ComfyUI reports the full type name (``torch.OutOfMemoryError``); older torch raised
# ``torch.cuda.OutOfMemoryError``; some nodes catch it and raise a RuntimeError saying "CUDA out of memory".
WORKER_FAILURE_TYPES = frozenset({
    "WorkerCrashed", "WorkerLost", "SystemExit", "KeyboardInterrupt", "MemoryError", "OutOfMemoryError",
    "torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "ProviderUnavailable", "ComfyStartError",
})
_OUT_OF_MEMORY_TEXT = re.compile(
    r"out of memory|CUDA error: out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
    r"MPS backend out of memory|HIP out of memory",
    re.IGNORECASE,
)


def is_worker_failure(exception_type: str | None, exception_message: str | None = None) -> bool:
    """True when a node's exception means the worker ran out of a resource (GPU/host memory) or died, so
    the job may succeed elsewhere (retryable), rather than the workflow being wrong."""
    exc_type = (exception_type or "").strip()
    short = exc_type.rsplit(".", 1)[-1]
    if exc_type in WORKER_FAILURE_TYPES or short in WORKER_FAILURE_TYPES:
        return True
    return bool(exception_message and _OUT_OF_MEMORY_TEXT.search(str(exception_message)))


def execution_error(
    data: Mapping[str, Any],
    *,
    job_id: str | None,
    provider: str | None,
    class_type_of: Callable[[str], str | None] | None = None,
) -> JobFailed:
    """JobFailed from an ``execution_error`` frame or history message."""
    node_id = data.get("node_id")
    node_id = str(node_id) if node_id is not None else None
    node_type = data.get("node_type") or (class_type_of(node_id) if class_type_of and node_id else None)
    exc_type = data.get("exception_type") or "Exception"
    exc_msg = str(data.get("exception_message") or "").strip()
    where = f"node {node_id}" + (f" ({node_type})" if node_type else "") if node_id else "the workflow"
    message = f"{where} raised {exc_type}" + (f": {exc_msg}" if exc_msg else "")
    tb = data.get("traceback") or []
    details = {
        k: data[k]
        for k in ("executed", "current_inputs", "current_outputs", "timestamp")
        if k in data
    }
    return JobFailed(
        message,
        job_id=job_id,
        provider=provider,
        node_id=node_id,
        node_type=node_type,
        exception_type=exc_type,
        exception_message=exc_msg,
        traceback=tb if isinstance(tb, list) else [str(tb)],
        details=details,
        # Out of memory (or a dead worker) is the machine's fault: failover may move the job to a bigger GPU.
        retryable=is_worker_failure(str(exc_type), exc_msg),
    )


@dataclass(frozen=True, slots=True)
class HistoryOutcome:
    """What a finished history entry says: ``status`` is success, error or interrupted."""

    status: str
    outputs: Mapping[str, Any]
    error: Mapping[str, Any] | None = None
    interrupted: Mapping[str, Any] | None = None
    start_ms: int | None = None
    end_ms: int | None = None


def history_outcome(entry: Mapping[str, Any]) -> HistoryOutcome:
    """Read one ``/history/{id}`` entry (the value under the prompt id)."""
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    error = interrupted = None
    start_ms = end_ms = None
    for msg in messages:
        if not isinstance(msg, (list, tuple)) or len(msg) != 2:
            continue
        kind, data = msg
        if not isinstance(data, Mapping):
            continue
        if kind == "execution_start":
            start_ms = data.get("timestamp")
        elif kind == "execution_error":
            error, end_ms = data, data.get("timestamp")
        elif kind == "execution_interrupted":
            interrupted, end_ms = data, data.get("timestamp")
        elif kind == "execution_success":
            end_ms = data.get("timestamp")
    if error is not None:
        state = "error"
    elif interrupted is not None:
        state = "interrupted"
    elif status.get("status_str") == "error" or status.get("completed") is False:
        state = "error"
    else:
        state = "success"
    return HistoryOutcome(
        status=state,
        outputs=entry.get("outputs") or {},
        error=error,
        interrupted=interrupted,
        start_ms=start_ms,
        end_ms=end_ms,
    )
