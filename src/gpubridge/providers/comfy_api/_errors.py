"""Comfy API v2's error envelope, ``{"error": {"code", "message", "details"}}``, onto gpubridge's error tree."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from ...errors import (
    AuthError,
    GpuBridgeError,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    PayloadTooLarge,
    ProtocolError,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
    WorkflowFormatError,
    WorkflowInputError,
    WorkflowInvalid,
)

__all__ = ["envelope_of", "error_of", "failure_of", "retry_after"]

_RETRY_LATER = frozenset({"queue_full", "deployment_not_ready", "rate_limited", "too_many_requests"})


def retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def envelope_of(resp: httpx.Response) -> tuple[str, str, Mapping[str, Any]]:
    """``(code, message, details)`` of an error answer; an answer without the envelope gets a code from its
    status (``http_<status>``) and its first 200 characters as the message."""
    try:
        body = resp.json()
    except (ValueError, json.JSONDecodeError):
        body = None
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        details = error.get("details")
        return (str(error.get("code") or f"http_{resp.status_code}"), str(error.get("message") or ""),
                details if isinstance(details, Mapping) else {})
    return f"http_{resp.status_code}", resp.text[:200], {}


def error_of(resp: httpx.Response, *, provider: str, what: str, job_id: str | None = None) -> GpuBridgeError:
    """The typed error of a non-2xx answer to ``what`` (e.g. "POST /jobs")."""
    code, message, details = envelope_of(resp)
    status = resp.status_code
    text = f"Comfy API {what}: {message or code} ({code}, HTTP {status})"
    if status in (401, 403) or code in ("unauthorized", "forbidden", "invalid_api_key"):
        return AuthError(f"{text}. Check GPUBRIDGE_COMFY_API_KEY.", provider=provider)
    if status == 429 or code in _RETRY_LATER:
        return RateLimited(text, provider=provider, retry_after=retry_after(resp), status_code=status)
    if code == "deployment_stopped":
        # Terminal here (never retried against this deployment) but not for the job: failover moves on.
        err = ProviderUnavailable(f"{text}: the deployment is stopped; start it, or route elsewhere",
                                  provider=provider, status_code=status)
        err.terminal = True  # type: ignore[attr-defined]
        return err
    if code == "idempotency_key_reuse":
        return InvalidRequest(text, provider=provider)
    if code == "workflow_format_ui":
        return WorkflowFormatError(text, provider=provider)
    if code == "invalid_workflow":
        node_errors = details.get("node_errors")
        return WorkflowInvalid(text if not node_errors else None, error={"message": message},
                               node_errors=node_errors if isinstance(node_errors, Mapping) else {},
                               provider=provider)
    if code == "missing_asset":
        return WorkflowInputError(text, provider=provider)
    if code == "payload_too_large" or status == 413:
        return PayloadTooLarge(text, provider=provider)
    if code == "expired":
        return ResultExpired(text, provider=provider)
    if status == 404 or code == "not_found":
        return JobNotFound(text, provider=provider)
    if status >= 500 or code == "upstream_unreachable":
        return ProviderUnavailable(text, provider=provider, status_code=status)
    return ProtocolError(text, provider=provider, status_code=status, retryable=False)


def failure_of(error: Mapping[str, Any] | None, *, provider: str, job_id: str) -> JobFailed:
    """A ``failed`` job's ``error`` object (``node_execution_error`` with node, class, message, traceback)."""
    error = error or {}
    message = str(error.get("message") or "the job failed").rstrip("\n")
    node_id, class_type = error.get("node_id"), error.get("class_type")
    where = f" in node {node_id} ({class_type})" if node_id is not None else ""
    code = str(error.get("code") or "node_execution_error")
    return JobFailed(f"Comfy API job {job_id} failed{where}: {message}", node_id=str(node_id) if node_id else None,
                     node_type=class_type, exception_type=code, exception_message=message,
                     traceback=error.get("traceback"), details={"code": code}, provider=provider)
