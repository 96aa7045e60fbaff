"""Every error gpubridge raises, in one tree.

Catch :class:`GpuBridgeError` to catch them all. Each class says whether the operation that raised it
may succeed when tried again (``retryable``), which the retry and failover layers key on, and whether a
remote job may still be running after it (``job_may_be_running``), so that nothing is resubmitted before
the original has been cancelled::

    GpuBridgeError
    ├── ConfigError                  bad or missing configuration                      not retryable
    │   └── ProviderNotFound         no provider plugin registered under that name
    ├── WorkflowError                the workflow itself is wrong (fails before any GPU time)
    │   ├── WorkflowFormatError      not an API-format graph (UI export, not JSON, ...)
    │   ├── WorkflowInputError       --set/--input names an unknown node or input, bad image data
    │   │   └── TemplateNotFound     no workflow template by that name
    │   ├── WorkflowInvalid          ComfyUI-style validation failed; carries node_errors
    │   │   └── ParamInvalid         a template parameter is unknown, of the wrong type or out of bounds
    │   └── WorkflowUnsupported      no provider has what the workflow needs (node classes, models)
    ├── PayloadTooLarge              request over the backend's size limit
    ├── AuthError                    credentials missing or rejected (401/403)
    ├── InvalidRequest               a malformed API request (bad JSON, parameter, header)  not retryable
    ├── Conflict                     not now: the job has not ended yet (DELETE during a cancel) retryable
    ├── ProviderError                the backend could not be reached or misbehaved       retryable
    │   ├── CapabilityMissing        this backend lacks a node class or model file the workflow needs
    │   ├── ProviderUnavailable      connection refused/reset, 5xx, health red, worker crashed
    │   ├── RateLimited              429 / throttled; carries retry_after
    │   ├── ProtocolError            a response we could not understand (malformed JSON, ...)
    │   └── InputUnavailable         an input URL could not be fetched now (DNS, 5xx, timeout); HTTP 424
    └── JobError                     a job was accepted, then did not produce a result
        ├── JobFailed                the workflow raised while executing (node, exception, traceback)
        ├── JobTimeout               the job's deadline passed; it was interrupted/removed       retryable
        ├── JobCancelled             the job was cancelled
        └── JobNotFound              unknown job id, or its result expired at the backend
            └── ResultExpired        the backend dropped the result (retention window passed)

Errors never carry secrets: messages name URLs and job ids, never tokens or auth headers, and the
``user:password@`` of any URL in a message is replaced by ``***@`` (:func:`scrub`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "GpuBridgeError",
    "ConfigError",
    "ProviderNotFound",
    "WorkflowError",
    "WorkflowFormatError",
    "WorkflowInputError",
    "WorkflowInvalid",
    "ParamInvalid",
    "TemplateNotFound",
    "WorkflowUnsupported",
    "CapabilityMissing",
    "NodeError",
    "PayloadTooLarge",
    "AuthError",
    "InvalidRequest",
    "Conflict",
    "ProviderError",
    "ProviderUnavailable",
    "RateLimited",
    "ProtocolError",
    "InputUnavailable",
    "JobError",
    "JobFailed",
    "JobTimeout",
    "JobCancelled",
    "JobNotFound",
    "ResultExpired",
    "is_retryable",
    "redact_url",
    "scrub",
]

# ``scheme://user:password@host``: the credentials part of a URL, wherever it stands in a text.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]*@")


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``, for messages, logs and reprs."""
    return _USERINFO.sub(r"\1***@", url)


def scrub(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***`` (see :func:`redact_url`)."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


class GpuBridgeError(Exception):
    """Base class of every gpubridge error.

    ``retryable``: trying the same operation again (here or on another provider) may succeed.
    ``job_may_be_running``: a remote job may still be executing after this error; cancel it before
    resubmitting anywhere.
    ``provider``: the provider that raised it, when known.
    """

    retryable: bool = False
    job_may_be_running: bool = False

    def __init__(self, message: str = "", *, provider: str | None = None, retryable: bool | None = None):
        message = scrub(message)  # a URL with user:password@ in it never reaches a message
        super().__init__(message)
        self.message = message
        self.provider = provider
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description, used by the CLI's --json output and the web APIs."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
            "provider": self.provider,
        }


class ConfigError(GpuBridgeError):
    """The configuration is missing something or holds an invalid value."""


class ProviderNotFound(ConfigError):
    """No provider plugin is registered under the requested name."""


class WorkflowError(GpuBridgeError):
    """The workflow or its inputs are wrong. Never retryable: it fails the same way everywhere."""


class WorkflowFormatError(WorkflowError):
    """The document is not an API-format ComfyUI graph."""


class WorkflowInputError(WorkflowError):
    """An override or input names a node or input that does not exist, or the input data is unusable."""


class NodeError:
    """One validation problem, as ComfyUI reports it in ``node_errors``."""

    __slots__ = ("node_id", "class_type", "type", "message", "details", "input_name")

    def __init__(
        self,
        node_id: str,
        class_type: str | None,
        type: str,
        message: str,
        details: str = "",
        input_name: str | None = None,
    ):
        self.node_id = node_id
        self.class_type = class_type
        self.type = type
        self.message = message
        self.details = details
        self.input_name = input_name

    def __repr__(self) -> str:
        return (
            f"NodeError(node_id={self.node_id!r}, class_type={self.class_type!r}, type={self.type!r}, "
            f"input_name={self.input_name!r}, message={self.message!r})"
        )

    def __str__(self) -> str:
        where = f"node {self.node_id}"
        if self.class_type:
            where += f" ({self.class_type})"
        if self.input_name:
            where += f" input '{self.input_name}'"
        text = f"{where}: {self.message}"
        if self.details and self.details not in self.message:
            text += f" [{self.details}]"
        return text


class WorkflowInvalid(WorkflowError):
    """ComfyUI (or our validator, which reproduces it) rejected the workflow before running it.

    ``error`` is ComfyUI's ``error`` object (type, message, details, extra_info) and ``node_errors`` its
    per-node errors, unchanged; ``errors`` flattens them into :class:`NodeError` items.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        error: Mapping[str, Any] | None = None,
        node_errors: Mapping[str, Any] | None = None,
        provider: str | None = None,
    ):
        self.error = dict(error or {})
        self.node_errors = dict(node_errors or {})
        self.errors: list[NodeError] = list(_flatten_node_errors(self.node_errors))
        if message is None:
            message = self._compose()
        super().__init__(message, provider=provider)

    def _compose(self) -> str:
        head = self.error.get("message") or "Workflow failed validation"
        if self.errors:
            lines = "; ".join(str(e) for e in self.errors[:10])
            more = f" (+{len(self.errors) - 10} more)" if len(self.errors) > 10 else ""
            return f"{head}: {lines}{more}"
        details = self.error.get("details")
        return f"{head} ({details})" if details else head

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["error"] = self.error
        d["node_errors"] = self.node_errors
        return d


class TemplateNotFound(WorkflowInputError):
    """The request names a workflow template the registry does not hold. ``template`` is its name."""

    def __init__(self, message: str, *, template: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.template = template

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "template": self.template}


class ParamInvalid(WorkflowInvalid):
    """A templated request's parameters are wrong: an unknown name, a wrong type, a value out of bounds or
    not among the choices. ``params`` maps each bad parameter's name to what is wrong with it; nothing was
    sent to a backend."""

    def __init__(self, template: str, params: Mapping[str, str], *, provider: str | None = None):
        self.template = template
        self.params = dict(params)
        parts = "; ".join(f"{name!r}: {problem}" for name, problem in list(self.params.items())[:10])
        super().__init__(
            f"Template {template!r}: invalid parameter{'s' if len(self.params) > 1 else ''} {parts}",
            error={
                "type": "invalid_params",
                "message": f"Invalid parameters for template {template!r}",
                "details": parts,
                "extra_info": {"template": template, "params": self.params},
            },
            provider=provider,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "template": self.template, "params": self.params}


def _flatten_node_errors(node_errors: Mapping[str, Any]):
    for node_id, entry in node_errors.items():
        if not isinstance(entry, Mapping):
            continue
        class_type = entry.get("class_type")
        for err in entry.get("errors") or []:
            if not isinstance(err, Mapping):
                continue
            extra = err.get("extra_info") or {}
            yield NodeError(
                node_id=str(node_id),
                class_type=class_type,
                type=str(err.get("type", "")),
                message=str(err.get("message", "")),
                details=str(err.get("details", "")),
                input_name=extra.get("input_name") if isinstance(extra, Mapping) else None,
            )


class WorkflowUnsupported(WorkflowError):
    """No provider can run the workflow: each lacks a node class or model file it needs. ``problems``
    lists them per provider (dicts of :class:`gpubridge.comfy.preflight.Problem`)."""

    def __init__(self, message: str, *, problems: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 **kw: Any):
        super().__init__(message, **kw)
        self.problems = {k: list(v) for k, v in (problems or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "problems": self.problems}


class PayloadTooLarge(GpuBridgeError):
    """The request is larger than the backend accepts. ``size`` and ``limit`` are in bytes."""

    def __init__(self, message: str, *, size: int | None = None, limit: int | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.size = size
        self.limit = limit


class AuthError(GpuBridgeError):
    """Credentials are missing or were rejected. Not retryable: the same key fails everywhere it is used."""


class InvalidRequest(GpuBridgeError):
    """An HTTP request to a gpubridge API was malformed: bad JSON, a bad parameter or header, a method the
    route does not take, or an ``Idempotency-Key`` reused with a different body. Not retryable as sent."""


class Conflict(GpuBridgeError):
    """The request cannot be done in the resource's current state, but may be once it changes: deleting a
    job whose cancel is not confirmed yet. HTTP 409; retryable."""

    retryable = True


class ProviderError(GpuBridgeError):
    """The backend could not be reached, or answered in a way that says it is unwell."""

    retryable = True

    def __init__(self, message: str, *, status_code: int | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.status_code = status_code


class CapabilityMissing(ProviderError):
    """This backend lacks a node class or model file the workflow needs (found before submitting it);
    another backend may have it. ``problems``: what is missing, as dicts."""

    def __init__(self, message: str, *, problems: Sequence[Mapping[str, Any]] = (), **kw: Any):
        super().__init__(message, **kw)
        self.problems = list(problems)


class ProviderUnavailable(ProviderError):
    """Connection refused or reset, 5xx, a dead ComfyUI, a crashed worker."""


class RateLimited(ProviderError):
    """The backend asked us to slow down. ``retry_after`` is in seconds when the backend said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ProtocolError(ProviderError):
    """A response that does not follow the protocol (malformed JSON, missing fields)."""


class InputUnavailable(ProviderError):
    """A caller-supplied input URL could not be fetched right now (its server answered 5xx, timed out or
    dropped the connection). Retryable; a refused or wrong URL is a :class:`WorkflowInputError` instead."""


class JobError(GpuBridgeError):
    """A job was accepted by a backend and then did not produce a result."""

    def __init__(self, message: str, *, job_id: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.job_id = job_id

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["job_id"] = self.job_id
        return d


class JobFailed(JobError):
    """The workflow raised while it ran.

    ``node_id``/``node_type`` name the failing node, ``exception_type``/``exception_message``/``traceback``
    are what the backend reported. A failure in the workflow is not retryable; a failure of the worker
    (crash, out of memory, lost container) is, and is raised with ``retryable=True``.
    """

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        node_type: str | None = None,
        exception_type: str | None = None,
        exception_message: str | None = None,
        traceback: Sequence[str] | str | None = None,
        details: Mapping[str, Any] | None = None,
        **kw: Any,
    ):
        super().__init__(message, **kw)
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        if isinstance(traceback, str):
            traceback = [traceback]
        self.traceback: list[str] = list(traceback or [])
        self.details = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(
            node_id=self.node_id,
            node_type=self.node_type,
            exception_type=self.exception_type,
            exception_message=self.exception_message,
            traceback=self.traceback,
        )
        return d


class JobTimeout(JobError):
    """The job's deadline passed. The job was interrupted or removed from the queue (``cancelled``).

    Retryable: a retry layer may resubmit, but only within the caller's own deadline. ``state`` is the
    state the job was in when time ran out ("queued" or "running"): a job stuck in a queue is what
    failover reroutes.
    """

    retryable = True

    def __init__(self, message: str, *, state: str | None = None, cancelled: bool = False, **kw: Any):
        super().__init__(message, **kw)
        self.state = state
        self.cancelled = cancelled
        self.job_may_be_running = not cancelled


class JobCancelled(JobError):
    """The job was cancelled (by us, or at the backend)."""


class JobNotFound(JobError):
    """The backend does not know this job id (never submitted, purged, or expired)."""


class ResultExpired(JobNotFound):
    """The job ran, but the backend no longer holds its result (retention window passed)."""


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` may succeed on another try. Unknown exceptions are not retried."""
    return bool(getattr(exc, "retryable", False)) if isinstance(exc, GpuBridgeError) else False
