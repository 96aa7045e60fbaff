"""The job model shared by every provider: workflows, requests, handles, statuses, events and results.

Everything here is a pydantic model, so it serialises to JSON (bytes as base64) and back, and is the same
whichever backend ran the job.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import enum
import json
import mimetypes
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import filetype
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)

from .errors import JobCancelled, JobTimeout, WorkflowFormatError, WorkflowInputError, scrub

__all__ = [
    "Workflow",
    "InputFile",
    "JobRequest",
    "RemoteJobRequest",
    "JobHandle",
    "JobState",
    "Progress",
    "JobStatus",
    "EventType",
    "JobEvent",
    "ArtifactKind",
    "Artifact",
    "Timings",
    "Cost",
    "Attempt",
    "JobResult",
    "HealthState",
    "HealthReport",
    "new_request_id",
]


def new_request_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------- workflow


def _looks_like_ui_format(data: Mapping[str, Any]) -> bool:
    return "nodes" in data and "links" in data and isinstance(data.get("nodes"), list)


class Workflow(RootModel[dict[str, dict[str, Any]]]):
    """An API-format ComfyUI graph: ``{node_id: {"class_type": ..., "inputs": {...}, "_meta": {...}}}``.

    Load one with :meth:`load` (a path, JSON text, bytes or a dict). A UI-format export (the one with
    ``nodes`` and ``links``) is refused with a pointer to ComfyUI's "Export (API)".

    Inputs can be changed by node id or by node title (``_meta.title``) or, when unique, by class type::

        wf.set("6.text", "a fox")          # node 6, input "text"
        wf.set("KSampler.seed", 42)        # the node titled (or of class) KSampler
    """

    model_config = ConfigDict(frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _check_format(cls, data: Any) -> Any:
        if isinstance(data, Workflow):
            return data.root
        if isinstance(data, Mapping):
            inner = data.get("prompt")
            if isinstance(inner, Mapping) and "class_type" not in inner:
                # A /prompt request body ({"prompt": {...}, "client_id": ...}): take the graph.
                data = data["prompt"]
            if _looks_like_ui_format(data):
                raise WorkflowFormatError(
                    "This is a UI-format workflow (it has 'nodes' and 'links'). gpubridge needs the API "
                    "format: in ComfyUI, enable Dev mode options in the settings and use "
                    "Workflow > Export (API), then load that file."
                )
            bad = [k for k, v in data.items() if not isinstance(v, Mapping)]
            if bad:
                raise WorkflowFormatError(
                    f"Not an API-format workflow: the value of key(s) {', '.join(map(repr, bad[:5]))} is "
                    "not a node object ({'class_type': ..., 'inputs': {...}})."
                )
            return {str(k): v for k, v in data.items()}
        raise WorkflowFormatError(
            f"A workflow must be a JSON object of nodes, not {type(data).__name__}."
        )

    # -- loading

    @classmethod
    def load(cls, source: str | Path | bytes | Mapping[str, Any] | Workflow) -> Workflow:
        """Load from a path, JSON text, JSON bytes, a dict, or another Workflow (copied)."""
        if isinstance(source, Workflow):
            return source.copy()
        if isinstance(source, Mapping):
            return cls.model_validate(source)
        if isinstance(source, bytes):
            return cls.from_json(source.decode("utf-8"))
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
            path = Path(source)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise WorkflowFormatError(f"Workflow file not found: {path}") from None
            except OSError as exc:
                raise WorkflowFormatError(f"Cannot read workflow file {path}: {exc}") from None
            return cls.from_json(text, origin=str(path))
        return cls.from_json(source)

    @classmethod
    def from_json(cls, text: str, *, origin: str | None = None) -> Workflow:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            where = f" in {origin}" if origin else ""
            raise WorkflowFormatError(f"Workflow is not valid JSON{where}: {exc}") from None
        return cls.model_validate(data)

    # -- access

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        return self.root

    def to_api(self) -> dict[str, dict[str, Any]]:
        """The graph as the plain dict ComfyUI's ``POST /prompt`` takes (not a copy)."""
        return self.root

    def copy(self) -> Workflow:
        return Workflow.model_construct(json.loads(json.dumps(self.root)))

    def __len__(self) -> int:
        return len(self.root)

    def __iter__(self):  # type: ignore[override]
        return iter(self.root)

    def __getitem__(self, node_id: str) -> dict[str, Any]:
        return self.root[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.root

    def title(self, node_id: str) -> str | None:
        meta = self.root[node_id].get("_meta")
        return meta.get("title") if isinstance(meta, Mapping) else None

    def class_type(self, node_id: str) -> str | None:
        node = self.root.get(node_id)
        return node.get("class_type") if node else None

    def nodes_of_type(self, class_type: str) -> list[str]:
        return [nid for nid, node in self.root.items() if node.get("class_type") == class_type]

    def find_node(self, ref: str) -> str:
        """Resolve a node reference (id, title, or unique class type) to its id."""
        ref = str(ref)
        if ref in self.root:
            return ref
        by_title = [nid for nid in self.root if self.title(nid) == ref]
        if len(by_title) == 1:
            return by_title[0]
        if len(by_title) > 1:
            raise WorkflowInputError(
                f"Node title {ref!r} is ambiguous: nodes {', '.join(by_title)} share it. Use a node id."
            )
        by_type = self.nodes_of_type(ref)
        if len(by_type) == 1:
            return by_type[0]
        if len(by_type) > 1:
            raise WorkflowInputError(
                f"{ref!r} matches several nodes of that class ({', '.join(by_type)}). Use a node id or a title."
            )
        names = sorted(set(self.root) | {t for nid in self.root if (t := self.title(nid))})
        hint = difflib.get_close_matches(ref, names, n=3)
        suffix = f" Did you mean {', '.join(map(repr, hint))}?" if hint else ""
        raise WorkflowInputError(f"No node {ref!r} in the workflow (by id, title or class type).{suffix}")

    def set(self, key: str, value: Any) -> Workflow:
        """Set one input: ``"NODE.input"``, where NODE is an id, a title or a unique class type.

        The input must already exist on the node (API-format exports list every widget input), so a typo
        fails here, before any GPU time, rather than being silently ignored. Returns ``self``.
        """
        ref, sep, input_name = str(key).rpartition(".")
        if not sep or not ref or not input_name:
            raise WorkflowInputError(f"Expected NODE.input (e.g. '6.text' or 'KSampler.seed'), got {key!r}.")
        node_id = self.find_node(ref)
        inputs = self.root[node_id].setdefault("inputs", {})
        if input_name not in inputs:
            hint = difflib.get_close_matches(input_name, list(inputs), n=3)
            suffix = f" Did you mean {', '.join(map(repr, hint))}?" if hint else ""
            have = ", ".join(inputs) or "none"
            raise WorkflowInputError(
                f"Node {node_id} ({self.class_type(node_id)}) has no input {input_name!r} "
                f"(it has: {have}).{suffix}"
            )
        inputs[input_name] = value
        return self

    def with_values(self, values: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Workflow:
        """A copy with several inputs set (see :meth:`set`)."""
        wf = self.copy()
        items = values.items() if isinstance(values, Mapping) else values
        for key, value in items:
            wf.set(key, value)
        return wf


# ----------------------------------------------------------------------------------------------- inputs


def _decode_data_uri(value: str) -> tuple[bytes, str | None]:
    header, sep, payload = value.partition(",")
    if not sep or ";base64" not in header:
        raise WorkflowInputError("Only base64 data URIs are supported (data:<mime>;base64,<data>).")
    mime = header[5:].split(";", 1)[0] or None
    try:
        return base64.b64decode(payload, validate=True), mime
    except (binascii.Error, ValueError) as exc:
        raise WorkflowInputError(f"Invalid base64 in data URI: {exc}") from None


class InputFile(BaseModel):
    """An input file (usually an image for LoadImage), given as bytes, a path, base64, a data URI or a URL.

    Build one with :meth:`coerce`; ``JobRequest(inputs={"face.png": "path/to/face.png"})`` does it for you.
    Paths and base64 are read at construction, so a bad input fails before anything is submitted.
    """

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", frozen=True)

    data: bytes | None = Field(default=None, repr=False)
    url: str | None = None
    mime_type: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputFile:
        if (self.data is None) == (self.url is None):
            raise WorkflowInputError("An input file needs exactly one of data or url.")
        return self

    @classmethod
    def coerce(cls, value: Any) -> InputFile:
        if isinstance(value, InputFile):
            return value
        if isinstance(value, Mapping):
            return cls.model_validate(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            return cls(data=data, mime_type=_sniff_mime(data))
        if isinstance(value, Path):
            return cls._from_path(value)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("data:"):
                data, mime = _decode_data_uri(s)
                return cls(data=data, mime_type=mime or _sniff_mime(data))
            if s.startswith(("http://", "https://")):
                return cls(url=s)
            if len(s) < 1024 and ("/" in s or "\\" in s or "." in s[-6:]) and _is_file(s):
                return cls._from_path(Path(s))
            try:
                data = base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError):
                data = b""
            mime = _sniff_mime(data) if data else None
            if mime:
                return cls(data=data, mime_type=mime)
            raise WorkflowInputError(
                "Input is neither an existing file, a URL, a data URI nor base64 of a known file type: "
                f"{s[:60]!r}{'...' if len(s) > 60 else ''}"
            )
        raise WorkflowInputError(f"Unsupported input type {type(value).__name__}.")

    @classmethod
    def _from_path(cls, path: Path) -> InputFile:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WorkflowInputError(f"Cannot read input file {path}: {exc.strerror or exc}") from None
        return cls(data=data, mime_type=_sniff_mime(data) or mimetypes.guess_type(path.name)[0])

    def as_base64(self) -> str:
        if self.data is None:
            raise WorkflowInputError("This input is a URL; fetch it first.")
        return base64.b64encode(self.data).decode("ascii")

    def __len__(self) -> int:
        return len(self.data or b"")


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _sniff_mime(data: bytes) -> str | None:
    kind = filetype.guess(data[:262])
    return kind.mime if kind else None


# ---------------------------------------------------------------------------------------------- request

_render_template: Callable[[str, Mapping[str, Any], dict[str, Any]], dict[str, Any]] | None = None
"""How ``JobRequest(template=..., params=...)`` becomes fields (installed by :mod:`gpubridge.templates`,
which sits above this module: a template registry reads files and model manifests)."""


def install_template_renderer(render: Callable[[str, Mapping[str, Any], dict[str, Any]], dict[str, Any]]) -> None:
    global _render_template
    _render_template = render


class JobRequest(BaseModel):
    """What to run: a workflow, its input files, and how long it may take.

    ``timeout`` is the job's hard deadline in seconds from submission (queue time included): when it
    passes, the job is interrupted or removed from the queue and :class:`~gpubridge.errors.JobTimeout`
    is raised. ``queue_timeout`` bounds the time spent waiting for a worker; the failover layer reroutes
    jobs that exceed it. ``idempotency_key`` identifies the job across retries and providers.
    """

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    workflow: Workflow
    inputs: dict[str, InputFile] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)
    queue_timeout: float | None = Field(default=None, gt=0)
    idempotency_key: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    request_id: str = Field(default_factory=new_request_id)
    store_prefix: str | None = Field(default=None, max_length=200)
    """Where in the configured artifact store this job's uploaded outputs go: a relative path of plain names
    under the store's own bucket and prefix (never another bucket)."""
    template: str | None = None
    """The workflow template this job was made from (``JobRequest(template=..., params=...)`` renders it
    from :func:`gpubridge.templates.default_registry`; a registry's ``request()`` from that registry)."""
    template_version: str | None = None
    """The template's version (a content hash of its workflow and manifest) when the job was rendered."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The template parameters the job used (defaults and drawn seeds included)."""

    @model_validator(mode="before")
    @classmethod
    def _from_template(cls, data: Any) -> Any:
        """``template`` + ``params`` without a workflow: render it (typed errors name the parameter)."""
        if isinstance(data, Mapping) and data.get("template") is not None and data.get("workflow") is None:
            if _render_template is None:  # pragma: no cover - gpubridge/__init__ installs it
                raise WorkflowInputError("Templates are not available (import gpubridge.templates)")
            fields = {k: v for k, v in data.items() if k not in ("template", "params")}
            return _render_template(data["template"], data.get("params") or {}, fields)
        return data

    @field_validator("store_prefix")
    @classmethod
    def _store_prefix(cls, v: str | None) -> str | None:
        if v is not None:
            problem = store_prefix_problem(v)
            if problem:
                raise WorkflowInputError(problem)
        return v

    @field_validator("workflow", mode="before")
    @classmethod
    def _workflow(cls, v: Any) -> Any:
        if isinstance(v, (str, Path, bytes)):
            return Workflow.load(v)
        return v

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise WorkflowInputError("inputs must be a mapping of name -> file")
        out = {}
        for name, value in v.items():
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise WorkflowInputError(f"Invalid input name {name!r}: use a plain file name like 'face.png'.")
            out[str(name)] = InputFile.coerce(value)
        return out

    def payload_size(self) -> int:
        """Approximate bytes this request takes on the wire (inputs base64-encoded)."""
        size = len(json.dumps(self.workflow.root, separators=(",", ":")))
        for name, f in self.inputs.items():
            size += len(name) + (len(f.data) * 4 // 3 + 4 if f.data is not None else len(f.url or ""))
        return size


# ------------------------------------------------------------------------------------ the wire request

MAX_JOB_TIMEOUT = 24 * 3600.0
"""The longest ``timeout``/``queue_timeout`` a remote request may ask for, by default (seconds)."""
MIN_JOB_TIMEOUT = 1.0
"""The shortest: below a second no job can be queued, uploaded and started."""

_URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[^\s\x00-\x1f\x7f]+$"
_NAME_PATTERN = r"^[^/\\\x00-\x1f\x7f]*[^/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]*$"

WireFileName = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=_NAME_PATTERN)]
"""A plain file name: no slash, backslash or control character, not only dots."""


class WireNode(BaseModel):
    """One node of an API-format graph: ``{"class_type": ..., "inputs": {...}}`` (other keys kept)."""

    model_config = ConfigDict(extra="allow")

    class_type: str = Field(min_length=1)
    inputs: dict[str, Any]


class WireInput(BaseModel):
    """An input file sent inline (``data``: base64 or a base64 data URI) or by ``url`` (http/https),
    exactly one of the two. Never a path: a remote server reads no file of its own for a caller."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["data"], "properties": {"data": {"type": "string"}, "url": {"type": "null"}}},
                {"required": ["url"], "properties": {"url": {"type": "string"}, "data": {"type": "null"}}},
            ]
        }
    )

    data: str | None = Field(default=None, min_length=1, description="base64, or data:<mime>;base64,...")
    url: str | None = Field(default=None, max_length=8192, pattern=_URL_PATTERN)
    mime_type: str | None = Field(default=None, max_length=255)

    _decoded: tuple[bytes, str | None] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_source(self) -> WireInput:
        if (self.data is None) == (self.url is None):
            raise ValueError("an input needs exactly one of data (base64 or data URI) or url")
        if self.url is not None:
            import httpx  # the client's URL parser: what it refuses, no fetch could use

            try:
                parsed = httpx.URL(self.url)
            except (httpx.InvalidURL, ValueError) as exc:
                raise ValueError(f"invalid url: {exc}") from None
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise ValueError("url must be an absolute http(s) URL with a host")
        else:
            text = (self.data or "").strip()
            try:
                if text.startswith("data:"):
                    self._decoded = _decode_data_uri(text)
                else:  # standard or URL-safe alphabet (pydantic writes bytes as URL-safe base64)
                    text = text.replace("-", "+").replace("_", "/")
                    self._decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True), None
            except (WorkflowInputError, binascii.Error, ValueError) as exc:
                raise ValueError(f"data is not valid base64: {exc}") from None
        return self

    def to_input(self) -> InputFile:
        if self.url is not None or self._decoded is None:
            return InputFile(url=self.url, mime_type=self.mime_type)
        data, mime = self._decoded
        return InputFile(data=data, mime_type=self.mime_type or mime or _sniff_mime(data))


class RemoteJobRequest(BaseModel):
    """The job request a remote API accepts (the job API's body): a :class:`JobRequest` whose workflow is a
    JSON object of nodes and whose inputs are inline data or URLs, never paths (paths are a convenience of
    the local library, resolved on the caller's side before sending). Convert with :meth:`to_request`.

    A :class:`JobRequest` serialised as JSON (``model_dump_json()``) validates as one of these.
    ``timeout``/``queue_timeout`` lie in [:data:`MIN_JOB_TIMEOUT`, :data:`MAX_JOB_TIMEOUT`];
    :meth:`capped` makes a variant with another cap.
    """

    # A request that runs on any ComfyUI (no models): the OpenAPI document's example, which generated
    # clients show and which lets schema-driven fuzzing create real jobs and follow them.
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "example"}},
        },
        "timeout": 60,
    }]})

    workflow: dict[str, WireNode] | None = Field(
        default=None, min_length=1, description="An API-format graph: node id -> node (or give a template)"
    )
    template: str | None = Field(
        default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run this server's workflow template (GET /v1/templates) instead of a workflow",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, max_length=200,
        description="The template's parameters (its JSON Schema is in GET /v1/templates); images as base64, "
        "a data URI or an http(s) URL",
    )
    inputs: dict[WireFileName, WireInput] = Field(default_factory=dict)
    timeout: float | None = Field(
        default=None, ge=MIN_JOB_TIMEOUT, le=MAX_JOB_TIMEOUT, allow_inf_nan=False,
        description="The job's deadline in seconds from submission, queue time included",
    )
    queue_timeout: float | None = Field(
        default=None, ge=MIN_JOB_TIMEOUT, le=MAX_JOB_TIMEOUT, allow_inf_nan=False
    )
    idempotency_key: str | None = Field(default=None, max_length=255)
    tags: dict[str, str] = Field(default_factory=dict)
    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=255)
    webhook: str | None = Field(
        default=None, min_length=1, max_length=8192,
        description="An http(s) URL the server POSTs the job's envelope to when it ends, signed per Standard "
        "Webhooks (webhook-id, webhook-timestamp, webhook-signature). Loopback, private and metadata "
        "addresses are refused unless the server allows them.",
    )
    webhook_events: list[Literal["progress"]] = Field(
        default_factory=list, max_length=1,
        description="Also POST progress updates (best effort, rate-limited) to the webhook",
    )
    store_prefix: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._\-/]+$",
        description="Where in the server's artifact store this job's uploaded outputs go: a relative path of "
        "plain names under the store's own bucket and prefix",
    )

    @field_validator("store_prefix")
    @classmethod
    def _plain_prefix(cls, v: str | None) -> str | None:
        problem = store_prefix_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("workflow", mode="before")
    @classmethod
    def _not_ui_format(cls, v: Any) -> Any:
        if isinstance(v, Mapping) and _looks_like_ui_format(v):
            raise ValueError(
                "a UI-format workflow (it has 'nodes' and 'links'); send the API format (in ComfyUI: "
                "Workflow > Export (API))"
            )
        return v

    @model_validator(mode="after")
    def _workflow_or_template(self) -> RemoteJobRequest:
        if (self.workflow is None) == (self.template is None):
            raise ValueError("give exactly one of 'workflow' (an API-format graph) or 'template' (with 'params')")
        if self.params and self.template is None:
            raise ValueError("'params' go with a 'template'")
        return self

    @classmethod
    def capped(cls, max_timeout: float) -> type[RemoteJobRequest]:
        """This model with ``timeout``/``queue_timeout`` capped at ``max_timeout`` seconds."""
        if max_timeout == MAX_JOB_TIMEOUT:
            return cls
        limit = Annotated[
            float | None, Field(ge=MIN_JOB_TIMEOUT, le=max_timeout, allow_inf_nan=False)
        ]
        return create_model(  # type: ignore[no-any-return]
            cls.__name__, __base__=cls, timeout=(limit, None), queue_timeout=(limit, None)
        )

    def to_request(self, templates: Any = None) -> JobRequest:
        """The :class:`JobRequest` this describes (inputs decoded; raises WorkflowError when they are bad).
        A templated request is rendered with ``templates`` (a :class:`~gpubridge.templates.TemplateRegistry`);
        a bad parameter raises :class:`~gpubridge.errors.ParamInvalid` naming it."""
        fields: dict[str, Any] = dict(
            inputs={name: f.to_input() for name, f in self.inputs.items()},
            timeout=self.timeout,
            queue_timeout=self.queue_timeout,
            idempotency_key=self.idempotency_key,
            tags=self.tags,
            request_id=self.request_id,
            store_prefix=self.store_prefix,
        )
        if self.template is not None:
            if templates is None:
                from .errors import TemplateNotFound

                raise TemplateNotFound(f"No template {self.template!r}: this server has no templates",
                                       template=self.template)
            return JobRequest(**templates.request_fields(self.template, self.params, fields, remote=True))
        nodes = {node_id: node.model_dump() for node_id, node in (self.workflow or {}).items()}
        return JobRequest(workflow=Workflow.model_validate(nodes), **fields)


# ---------------------------------------------------------------------------------------- handle/status


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of_error(cls, exc: BaseException) -> JobState:
        """The terminal state a job ends in when it ends with ``exc``."""
        if isinstance(exc, JobCancelled):
            return cls.CANCELLED
        if isinstance(exc, JobTimeout):
            return cls.TIMED_OUT
        return cls.FAILED


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT})


class JobHandle(BaseModel):
    """A reference to a submitted job. ``job_id`` is the provider's id; ``str(handle)`` is that id."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    provider: str
    request_id: str | None = None
    submitted_at: float = Field(default_factory=time.time)
    deadline: float | None = None
    """Wall-clock time (epoch seconds) after which the job is cancelled."""
    extra: dict[str, Any] = Field(default_factory=dict)

    def __str__(self) -> str:
        return self.job_id


class Progress(BaseModel):
    """Where a running job is: the node executing, its step/of, and how many nodes are done."""

    node_id: str | None = None
    node_type: str | None = None
    value: float | None = None
    max: float | None = None
    nodes_done: int | None = None
    nodes_total: int | None = None

    @property
    def fraction(self) -> float | None:
        """Overall completion in [0, 1] when it can be estimated."""
        if self.nodes_total:
            done = self.nodes_done or 0
            step = (self.value / self.max) if self.value is not None and self.max else 0.0
            return min(1.0, (done + step) / self.nodes_total)
        if self.value is not None and self.max:
            return min(1.0, self.value / self.max)
        return None


class JobStatus(BaseModel):
    job_id: str
    provider: str
    state: JobState
    progress: Progress | None = None
    queue_position: int | None = None
    message: str | None = None
    error: dict[str, Any] | None = None
    updated_at: float = Field(default_factory=time.time)

    @property
    def done(self) -> bool:
        return self.state.is_terminal


# ------------------------------------------------------------------------------------------------ events


class EventType(str, enum.Enum):
    QUEUED = "queued"
    STARTED = "started"
    CACHED = "cached"
    EXECUTING = "executing"
    PROGRESS = "progress"
    EXECUTED = "executed"
    PREVIEW = "preview"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    RETRYING = "retrying"
    FAILOVER = "failover"
    LOG = "log"

    def __str__(self) -> str:
        return self.value


TERMINAL_EVENTS = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED, EventType.TIMED_OUT})

STATE_EVENTS: dict[JobState, EventType] = {
    JobState.QUEUED: EventType.QUEUED,
    JobState.RUNNING: EventType.STARTED,
    JobState.SUCCEEDED: EventType.SUCCEEDED,
    JobState.FAILED: EventType.FAILED,
    JobState.CANCELLED: EventType.CANCELLED,
    JobState.TIMED_OUT: EventType.TIMED_OUT,
}
"""The event that announces a job entering each state."""


class JobEvent(BaseModel):
    """One thing that happened to a job, in order. Terminal types end a job's event stream."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    type: EventType
    job_id: str
    provider: str | None = None
    at: float = Field(default_factory=time.time)
    node_id: str | None = None
    node_type: str | None = None
    value: float | None = None
    max: float | None = None
    queue_position: int | None = None
    message: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    image: bytes | None = Field(default=None, repr=False)
    """Preview image bytes, for PREVIEW events."""

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


# ----------------------------------------------------------------------------------------------- results


class ArtifactKind(str, enum.Enum):
    IMAGE = "image"
    ANIMATION = "animation"  # gif, animated webp/png
    VIDEO = "video"
    AUDIO = "audio"
    TEXT = "text"
    FILE = "file"

    def __str__(self) -> str:
        return self.value


_ANIMATED_MIMES = {"image/gif"}


def artifact_kind(mime_type: str | None, *, animated: bool = False) -> ArtifactKind:
    if not mime_type:
        return ArtifactKind.FILE
    major = mime_type.split("/", 1)[0]
    if major == "video":
        return ArtifactKind.VIDEO
    if major == "audio":
        return ArtifactKind.AUDIO
    if major == "image":
        return ArtifactKind.ANIMATION if animated or mime_type in _ANIMATED_MIMES else ArtifactKind.IMAGE
    if major == "text":
        return ArtifactKind.TEXT
    return ArtifactKind.FILE


class Artifact(BaseModel):
    """One output of a job: a file (image, video, audio ...) or a text value, with the node that made it."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    node_id: str
    kind: ArtifactKind
    filename: str | None = None
    subfolder: str = ""
    type: str | None = None
    """ComfyUI's folder type: output, temp or input."""
    mime_type: str | None = None
    data: bytes | None = Field(default=None, repr=False)
    url: str | None = Field(default=None, repr=False)
    """Where the bytes are when the artifact does not hold them (a presigned object-store URL: a secret)."""
    url_expires_at: float | None = None
    """Unix time after which ``url`` stops working (presigned URLs)."""
    sha256: str | None = None
    """The bytes' SHA-256 (hex) when the backend reported it; checked when a URL artifact is saved."""
    text: str | None = None
    width: int | None = None
    height: int | None = None
    size: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def holds(self) -> Literal["bytes", "url", "text", "nothing"]:
        """What the artifact carries: its ``bytes``, a ``url`` to them, a ``text`` value, or ``nothing``."""
        if self.data is not None:
            return "bytes"
        if self.url is not None:
            return "url"
        return "text" if self.text is not None else "nothing"

    def save(self, directory: str | Path, *, name: str | None = None, max_bytes: int | None = None) -> Path:
        """Write the artifact under ``directory`` and return the path. Text artifacts become .txt files; a URL
        artifact is streamed to disk (bounded memory, ``max_bytes`` cap, its ``sha256`` checked).

        The file name (``name``, else the artifact's ``filename``, else one made from the node id) is reduced
        to a plain name inside ``directory``: no separators, ``..``, NUL or control characters."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind is ArtifactKind.TEXT and self.data is None:
            path = directory / safe_filename(name, fallback=f"node{self.node_id}_text.txt")
            path.write_text(self.text or "", encoding="utf-8")
            return path
        path = directory / safe_filename(name or self.filename, fallback=f"node{self.node_id}.bin")
        if self.data is None:
            if self.url is None:
                raise ValueError(f"Artifact {self.filename!r} has neither bytes nor a URL")
            from .download import DEFAULT_MAX_BYTES, download

            download(self.url, path, max_bytes=max_bytes or DEFAULT_MAX_BYTES, sha256=self.sha256,
                     expected_size=self.size)
            return path
        path.write_bytes(self.data)
        return path


_UNSAFE_NAME_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


_STORE_PREFIX = re.compile(r"^[A-Za-z0-9._\-/]{1,200}$")


def store_prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be an artifact-store prefix (None when it can): a relative path of plain names."""
    segments = prefix.strip("/").split("/")
    if (not _STORE_PREFIX.match(prefix) or prefix.startswith("/") or "//" in prefix
            or any(seg in ("", ".", "..") for seg in segments)):
        return (f"store prefix {prefix!r} must be a relative path of plain names (letters, digits, . _ - /), "
                "inside the configured bucket and prefix")
    return None


def safe_filename(name: str | None, *, fallback: str, max_bytes: int = 200) -> str:
    """``name`` as a plain file name that stays inside the folder it is joined to.

    A backend's ``filename`` keeps only its last path part (``"/etc/x"`` -> ``"x"``); ``fallback`` (made from
    a node id, which may hold anything) has its separators replaced instead. Control characters, NUL and
    characters Windows forbids become ``_``; ``""``, ``"."`` and ``".."`` fall back; the name is cut to
    ``max_bytes`` bytes of UTF-8, keeping its extension."""

    def clean(text: str) -> str:
        text = _UNSAFE_NAME_CHARS.sub("_", text).strip().strip(".")  # no "..", no hidden or trailing-dot names
        if len(text.encode("utf-8")) > max_bytes:
            stem, dot, ext = text.rpartition(".")
            ext = ext[:16] if dot else ""
            keep = (stem if dot else text).encode("utf-8")[: max_bytes - len(ext) - 1].decode("utf-8", "ignore")
            text = f"{keep}.{ext}" if ext else keep
        return text

    if name:
        last = re.split(r"[/\\]", name)[-1]
        cleaned = clean(last)
        if cleaned:
            return cleaned
    return clean(fallback) or "output"


class Timings(BaseModel):
    """Seconds spent in each phase; wall-clock stamps are epoch seconds."""

    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    queued_s: float | None = None
    executing_s: float | None = None
    total_s: float | None = None
    upload_s: float | None = None
    download_s: float | None = None


class Cost(BaseModel):
    usd: float
    gpu: str | None = None
    seconds: float | None = None
    rate_usd_per_s: float | None = None
    basis: str = "estimate"
    """'estimate' (GPU price x seconds) or 'billed' (reported by the provider)."""


class Attempt(BaseModel):
    """One try of a job on one provider (the resilience layer lists every try in the result)."""

    provider: str
    job_id: str | None = None
    outcome: str
    error: dict[str, Any] | None = None
    started_at: float | None = None
    ended_at: float | None = None


class JobResult(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    job_id: str
    provider: str
    request_id: str | None = None
    state: JobState = JobState.SUCCEEDED
    artifacts: list[Artifact] = Field(default_factory=list)
    outputs: dict[str, Any] = Field(default_factory=dict)
    """The raw per-node outputs as the backend reported them (filenames, text...)."""
    timings: Timings = Field(default_factory=Timings)
    cost: Cost | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)

    @property
    def images(self) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind is ArtifactKind.IMAGE]

    @property
    def videos(self) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind in (ArtifactKind.VIDEO, ArtifactKind.ANIMATION)]

    @property
    def texts(self) -> list[str]:
        return [a.text or "" for a in self.artifacts if a.kind is ArtifactKind.TEXT]

    def save(self, directory: str | Path, *, max_bytes: int | None = None) -> list[Path]:
        """Write every artifact under ``directory`` (file names are kept unique); URL artifacts are streamed
        to disk, each at most ``max_bytes``."""
        directory = Path(directory)
        paths: list[Path] = []
        used: set[str] = set()
        for art in self.artifacts:
            base = safe_filename(art.filename, fallback=f"node{art.node_id}_{art.kind.value}.txt")
            name, n = base, 1
            while name in used:
                stem, dot, ext = base.rpartition(".")
                name = f"{stem or base}_{n}{dot}{ext}" if dot else f"{base}_{n}"
                n += 1
            used.add(name)
            paths.append(art.save(directory, name=name, max_bytes=max_bytes))
        return paths

    def summary(self) -> dict[str, Any]:
        """The result as JSON-safe data without artifact bytes (what ``gpubridge run --json`` prints)."""
        return self.model_dump(mode="json", exclude={"artifacts": {"__all__": {"data"}}})


# ------------------------------------------------------------------------------------------------ health


class HealthState(str, enum.Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


class HealthReport(BaseModel):
    """A provider's health, in one shape for every backend."""

    provider: str
    state: HealthState
    message: str | None = None
    latency_ms: float | None = None
    checked_at: float = Field(default_factory=time.time)
    queue_depth: int | None = None
    running: int | None = None
    workers: dict[str, int] | None = None
    version: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("message")
    @classmethod
    def _no_url_credentials(cls, v: str | None) -> str | None:
        return scrub(v) if v else v

    @property
    def ok(self) -> bool:
        return self.state in (HealthState.HEALTHY, HealthState.DEGRADED)
