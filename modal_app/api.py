"""The job API: a plain FastAPI app over a :class:`~modal_app.backends.JobBackend`.

The Modal app serves it from ``@modal.asgi_app``; anything else can serve it with uvicorn::

    app = create_app(InProcessBackend.for_url("http://127.0.0.1:8188"), tokens=["s3cret"])
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (all under ``/v1`` need ``Authorization: Bearer <token>`` unless auth is left to Modal's proxy):

- ``POST /v1/jobs``: submit a :class:`~gpubridge.models.JobRequest`; 202 with the job's envelope.
- ``GET /v1/jobs/{id}?wait=S&after=V``: the envelope; long-polls up to S seconds (capped at
  ``max_wait``) for the job to end, or, with ``after``, for its version to pass V.
- ``DELETE /v1/jobs/{id}``: cancel (dequeue or interrupt ComfyUI).
- ``POST /v1/run?timeout=S``: submit and wait (capped at ``sync_timeout``); 200 when the job ended, 202
  with the job still running otherwise.
- ``GET /v1/health?deep=1``: 200 when healthy or degraded, 503 otherwise.

OpenAPI at ``/openapi.json`` and ``/docs``.
"""

# No `from __future__ import annotations`: FastAPI must see the endpoints' annotations, which refer to
# values local to create_app.
import contextlib
import hmac
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gpubridge.errors import AuthError, GpuBridgeError, PayloadTooLarge, WorkflowFormatError
from gpubridge.models import HealthReport, JobRequest

from .backends import JobBackend
from .schema import ErrorBody, JobEnvelope, error_dict, error_headers, http_status

__all__ = ["create_app"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid credentials (AuthError)"},
    404: {"model": ErrorBody, "description": "Unknown job (JobNotFound) or expired result (ResultExpired)"},
    413: {"model": ErrorBody, "description": "Request body too large (PayloadTooLarge)"},
    422: {"model": ErrorBody, "description": "Invalid workflow or request (WorkflowInvalid, ...)"},
    429: {"model": ErrorBody, "description": "Too many jobs (RateLimited); see Retry-After"},
    503: {"model": ErrorBody, "description": "ComfyUI or Modal unavailable (ProviderUnavailable, retryable)"},
}


def _error_response(exc: GpuBridgeError) -> JSONResponse:
    return JSONResponse(
        status_code=http_status(exc), content={"error": error_dict(exc)}, headers=error_headers(exc)
    )


def _json(model: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        model.model_dump_json(), status_code=status_code, media_type="application/json", headers=headers
    )


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 (by Content-Length, else while reading)."""

    def __init__(self, app: Any, limit: int, provider: str):
        self.app = app
        self.limit = limit
        self.provider = provider

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send, int(length))
        if length is not None:
            return await self.app(scope, receive, send)
        # No length (chunked): read the body here, bounded, then hand it on.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send, size)
            if not message.get("more_body", False):
                break

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any, size: int) -> None:
        err = PayloadTooLarge(
            f"The request is {size} bytes; this server accepts at most {self.limit}. Send inputs by URL.",
            size=size,
            limit=self.limit,
            provider=self.provider,
        )
        await _error_response(err)(scope, receive, send)


def create_app(
    backend: JobBackend,
    *,
    tokens: Sequence[str] | str | None = None,
    proxy_auth: bool = False,
    allow_anonymous: bool = False,
    max_body_bytes: int = 64 * 1024 * 1024,
    max_wait: float = 50.0,
    sync_timeout: float = 110.0,
    title: str = "gpubridge job API",
) -> FastAPI:
    """The job API over ``backend``.

    ``tokens``: accepted bearer tokens (a comma-separated string is split). ``proxy_auth``: Modal's proxy
    checks Modal-Key/Modal-Secret before requests arrive, so no token is needed. Without tokens, proxy
    auth or ``allow_anonymous`` every request is refused (fail closed).
    """
    if isinstance(tokens, str):
        tokens = [t.strip() for t in tokens.split(",")]
    secrets = [t.encode() for t in (tokens or []) if t and t.strip()]
    bearer = HTTPBearer(
        auto_error=False, description="GPUBRIDGE_API_TOKEN from the deployment's Modal Secret"
    )

    async def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if not secrets:
            if proxy_auth or allow_anonymous:
                return
            raise AuthError(
                "This server has no API token configured and refuses every request", provider=backend.provider
            )
        given = (credentials.credentials if credentials else "").encode()
        ok = False
        for secret in secrets:  # compare with every token, in constant time
            ok |= hmac.compare_digest(given, secret)
        if not given or not ok:
            raise AuthError(
                "Missing or invalid bearer token (Authorization: Bearer <token>)", provider=backend.provider
            )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.aclose()

    app = FastAPI(
        title=title,
        version="1",
        description="Run ComfyUI workflows as jobs. Bodies are gpubridge JobRequest JSON (bytes base64).",
        lifespan=lifespan,
    )
    app.state.backend = backend

    @app.exception_handler(GpuBridgeError)
    async def _gpubridge_error(_request: Request, exc: GpuBridgeError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:10]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return _error_response(
            WorkflowFormatError("Invalid job request: " + "; ".join(parts), provider=backend.provider)
        )

    v1 = [Depends(authorize)]

    def _clamp(wait: float, cap: float) -> float:
        return max(0.0, min(wait, cap))

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobEnvelope,
        responses=_ERRORS,
        dependencies=v1,
        summary="Submit a job",
    )
    async def submit(
        request: JobRequest,
        idempotency_key: Annotated[
            str | None,
            Header(description="Send a submit again with the same key and get the same job back (not a "
                               "second one): safe retries after a lost answer."),
        ] = None,
    ) -> Response:
        env, created = await backend.submit_idempotent(request, idempotency_key)
        return _json(env, 202 if created else 200, {"Location": f"/v1/jobs/{env.job_id}"})

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobEnvelope,
        responses=_ERRORS,
        dependencies=v1,
        summary="Job status and result (long-poll with ?wait)",
    )
    async def get_job(
        job_id: str,
        wait: Annotated[
            float, Query(ge=0, description=f"Seconds to wait for a change (max {max_wait:g})")
        ] = 0,
        after: Annotated[int | None, Query(description="Answer once the job's version passes this")] = None,
    ) -> Response:
        return _json(await backend.get(job_id, wait=_clamp(wait, max_wait), after=after))

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobEnvelope,
        responses=_ERRORS,
        dependencies=v1,
        summary="Cancel a job",
    )
    async def cancel_job(job_id: str) -> Response:
        return _json(await backend.cancel(job_id))

    @app.post(
        "/v1/run",
        response_model=JobEnvelope,
        responses={**_ERRORS, 202: {"model": JobEnvelope}},
        dependencies=v1,
        summary="Submit and wait (bounded)",
    )
    async def run(
        request: JobRequest,
        timeout: Annotated[
            float | None, Query(gt=0, description=f"Seconds to wait (max {sync_timeout:g})")
        ] = None,
    ) -> Response:
        env = await backend.submit(request)
        budget = _clamp(timeout if timeout is not None else sync_timeout, sync_timeout)
        if not env.terminal:
            env = await backend.get(env.job_id, wait=budget)
        if env.terminal:
            return _json(env)
        return _json(env, 202, {"Location": f"/v1/jobs/{env.job_id}"})

    @app.get(
        "/v1/health",
        response_model=HealthReport,
        responses={503: {"model": HealthReport}},
        dependencies=v1,
        summary="ComfyUI, queue, GPU, version and models",
    )
    async def health(
        deep: Annotated[bool, Query(description="Check on a GPU container (may start one)")] = False,
    ) -> Response:
        report = await backend.health(deep=deep)
        return _json(report, 200 if report.ok else 503)

    app.add_middleware(_BodyLimit, limit=max_body_bytes, provider=backend.provider)
    return app
