"""The job API: a plain FastAPI app over a :class:`~modal_app.backends.JobBackend`.

The Modal app serves it from ``@modal.asgi_app``; anything else can serve it with uvicorn::

    app = create_app(InProcessBackend.for_url("http://127.0.0.1:8188"), tokens=["s3cret"])
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (all under ``/v1`` need ``Authorization: Bearer <token>`` unless auth is left to Modal's proxy):

- ``POST /v1/jobs``: submit a :class:`~gpubridge.models.RemoteJobRequest` (a JobRequest as JSON, inputs
  inline or by URL, never a path on this server); 202 with the job's envelope.
- ``GET /v1/jobs/{id}?wait=S&after=V``: the envelope; long-polls up to S seconds (capped at
  ``max_wait``) for the job to end, or, with ``after``, for its version to pass V.
- ``POST /v1/jobs/{id}/cancel``: cancel (dequeue or interrupt ComfyUI); the job stays readable.
- ``DELETE /v1/jobs/{id}``: cancel if it has not ended, then forget it (404 from then on; 409 while a cancel
  is not confirmed yet).
- ``POST /v1/run?timeout=S``: submit and wait (capped at ``sync_timeout``); 200 when the job ended, 202
  with the job still running otherwise.
- ``GET /v1/health?deep=1``: 200 when healthy or degraded, 503 otherwise.
- ``GET /v1/templates``, ``GET /v1/templates/{name}``: the workflow templates this server runs, each with
  its version and the JSON Schema of its ``params``; submit ``{"template": name, "params": {...}}``.

OpenAPI at ``/openapi.json`` and ``/docs`` (behind the same auth unless ``public_docs``). Every error,
FastAPI's and Starlette's own included, answers ``{"error": {"type", "message", "retryable", ...}}``.
"""

# No `from __future__ import annotations`: FastAPI must see the endpoints' annotations, which refer to
# values local to create_app.
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gpubridge.errors import (
    AuthError,
    GpuBridgeError,
    InvalidRequest,
    PayloadTooLarge,
    WorkflowFormatError,
    WorkflowInputError,
)
from gpubridge.models import MAX_JOB_TIMEOUT, HealthReport, JobRequest, RemoteJobRequest

from gpubridge.config import WebhookSettings

from .backend import JobBackend
from .webhooks import WebhookDispatcher
from .schema import (
    Capabilities,
    ErrorBody,
    JobEnvelope,
    TemplateInfo,
    TemplateList,
    error_dict,
    error_headers,
    fingerprint,
    http_status,
)

__all__ = ["create_app"]


def _dispatcher(backend: JobBackend, settings: WebhookSettings) -> WebhookDispatcher:
    """Webhooks for ``backend``'s jobs: the payload is the job's envelope (without its delivery state, so
    every attempt sends the same body)."""

    async def load(job_id: str) -> tuple[bytes, bool]:
        env = await backend.get(job_id)
        return env.model_dump_json(exclude={"webhook"}).encode(), env.terminal

    async def wait(job_id: str, after: int | None, seconds: float) -> int:
        return (await backend.get(job_id, wait=seconds, after=after)).version

    return WebhookDispatcher(backend.store, settings, loaders={"v1": load}, wait=wait, provider=backend.provider)

def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_E400 = {400: _err("A body that could not be read as JSON (InvalidRequest)")}
_E401 = {401: _err("Missing or invalid credentials (AuthError)")}
_E404 = {404: _err("Unknown job (JobNotFound) or expired result (ResultExpired)")}
_E409 = {409: _err("The job's cancel is not confirmed yet; DELETE again once it has ended (Conflict)")}
_E413 = {413: _err("Request body too large (PayloadTooLarge)")}
_E422 = {
    422: _err(
        "Invalid request: body, parameter or header (InvalidRequest, WorkflowFormatError, "
        "WorkflowInputError, WorkflowInvalid), or an Idempotency-Key reused with another body"
    )
}
_E424 = {424: _err("An input URL could not be fetched right now: DNS, its server's 5xx, a timeout (InputUnavailable, "
                   "retryable)")}
_E429 = {429: _err("Too many jobs (RateLimited); see Retry-After")}
_E500 = {500: _err("A bug in the server (InternalError)")}
_E502 = {502: _err("ComfyUI answered in a way the server could not understand (ProtocolError)")}
_E503 = {503: _err("ComfyUI or Modal unavailable (ProviderUnavailable, retryable)")}
# What each operation can answer besides its success (every one: 401 and 500).
_SUBMIT_ERRORS = {**_E400, **_E401, **_E413, **_E422, **_E424, **_E429, **_E500, **_E502, **_E503}
_JOB_ERRORS = {**_E401, **_E404, **_E422, **_E500, **_E503}
_CANCEL_ERRORS = {**_E401, **_E404, **_E422, **_E500, **_E503}
_HEALTH_ERRORS = {**_E401, **_E422, **_E500}

# OpenAPI links: the job a submit answered with can be followed (and cancelled) by its id.
_JOB_LINKS = {
    "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/job_id"}},
    "CancelJob": {"operationId": "cancel_job", "parameters": {"job_id": "$response.body#/job_id"}},
    "DeleteJob": {"operationId": "delete_job", "parameters": {"job_id": "$response.body#/job_id"}},
}

_REASONS = {400: "InvalidRequest", 404: "NotFound", 405: "MethodNotAllowed"}


def _error_response(exc: GpuBridgeError, status: int | None = None, **headers: str) -> JSONResponse:
    return JSONResponse(
        status_code=status or http_status(exc),
        content={"error": error_dict(exc)},
        headers={**error_headers(exc), **headers},
    )


def _envelope(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": type_, "message": message, "retryable": False, "job_may_be_running": False}
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


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
    max_timeout: float = MAX_JOB_TIMEOUT,
    public_docs: bool = False,
    title: str = "gpubridge job API",
    webhooks: WebhookSettings | None = None,
    runpod_endpoints: Sequence[str] | None = None,
    runpod_sync_wait: float = 90.0,
    metrics: Any = None,
    templates: Any = None,
) -> FastAPI:
    """The job API over ``backend``.

    ``tokens``: accepted bearer tokens (a comma-separated string is split). Several tokens exist for
    rotation: any of them reads and cancels any job (jobs are not scoped to a token); only
    ``Idempotency-Key``s are, so two callers never share a key by accident. ``proxy_auth``: Modal's proxy
    checks Modal-Key/Modal-Secret before requests arrive, so no token is needed. Without tokens, proxy
    auth or ``allow_anonymous`` every request is refused (fail closed). ``/openapi.json`` and ``/docs``
    take the same auth unless ``public_docs``. ``max_timeout`` caps a job's ``timeout`` (422 above it).
    ``webhooks``: how job webhooks are signed and delivered (:mod:`gpubridge.server.webhooks`); without it a
    job that asks for one is refused (422). ``runpod_endpoints``: serve RunPod's serverless API under
    ``/v2/{id}/`` for these endpoint ids (:mod:`gpubridge.server.runpod_facade`); ``runpod_sync_wait``:
    how long its ``runsync`` waits before answering with the job still running. ``metrics``: a
    :class:`~gpubridge.server.metrics.GatewayMetrics`, served at ``GET /metrics`` (same auth).
    ``templates``: a :class:`~gpubridge.templates.TemplateRegistry` whose templates jobs may name (listed at
    ``GET /v1/templates``; their parameter schemas are in the OpenAPI document).
    """
    if isinstance(tokens, str):
        tokens = [t.strip() for t in tokens.split(",")]
    secrets = [t.encode() for t in (tokens or []) if t and t.strip()]
    bearer = HTTPBearer(
        auto_error=False, description="GPUBRIDGE_API_TOKEN from the deployment's Modal Secret"
    )

    async def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        """The caller's scope for idempotency keys: a hash of its token (never the token itself)."""
        return check_token(credentials.credentials if credentials else "")

    def check_token(token: str) -> str:
        if not secrets:
            if proxy_auth or allow_anonymous:
                return "anonymous"
            raise AuthError(
                "This server has no API token configured and refuses every request", provider=backend.provider
            )
        given = token.encode()
        ok = False
        for secret in secrets:  # compare with every token, in constant time
            ok |= hmac.compare_digest(given, secret)
        if not given or not ok:
            raise AuthError(
                "Missing or invalid bearer token (Authorization: Bearer <token>)", provider=backend.provider
            )
        return "token:" + hashlib.sha256(given).hexdigest()

    dispatcher = _dispatcher(backend, webhooks) if webhooks is not None else None
    if dispatcher is not None and metrics is not None:
        dispatcher.on_attempt = metrics.webhook_attempt

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await backend.start()
            if dispatcher is not None:
                await dispatcher.start()
            yield
        finally:
            try:
                if dispatcher is not None:
                    await dispatcher.aclose()
            finally:
                await backend.aclose()

    app = FastAPI(
        title=title,
        version="1",
        description="Run ComfyUI workflows as jobs. Bodies are gpubridge JobRequest JSON with inputs inline "
        "(base64) or by URL. Every error answers {\"error\": {\"type\", \"message\", \"retryable\", ...}}.",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.backend = backend
    app.state.webhooks = dispatcher

    async def _accept_webhook(request: RemoteJobRequest) -> None:
        """Refuse a webhook this job may not use before anything runs."""
        if request.webhook is None:
            return
        if dispatcher is None:
            raise InvalidRequest(
                "This server sends no webhooks (it has no webhook configuration); leave out 'webhook'",
                provider=backend.provider,
            )
        await dispatcher.check(request.webhook)

    async def _register_webhook(request: RemoteJobRequest, env: JobEnvelope) -> JobEnvelope:
        if request.webhook is None or dispatcher is None:
            return env
        await dispatcher.register(env.job_id, request.webhook, events=request.webhook_events)
        return await _with_webhook(env)

    async def _with_webhook(env: JobEnvelope) -> JobEnvelope:
        if dispatcher is None:
            return env
        delivery = await dispatcher.status(env.job_id)
        return env.model_copy(update={"webhook": delivery}) if delivery is not None else env

    @app.exception_handler(GpuBridgeError)
    async def _gpubridge_error(_request: Request, exc: GpuBridgeError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts, where = [], set()
        for e in exc.errors()[:10]:
            loc = [str(x) for x in e.get("loc", ())]
            if loc[:1] == ["body"] and len(loc) > 1:
                where.add(loc[1])
            shown = ".".join(x for x in loc if x != "body")
            msg = str(e.get("msg"))
            parts.append(f"{shown}: {msg}" if shown else msg)
        text = "Invalid request: " + "; ".join(parts)
        cls: type[GpuBridgeError] = InvalidRequest
        if where == {"workflow"}:
            cls = WorkflowFormatError
        elif where == {"inputs"}:
            cls = WorkflowInputError
        return _error_response(cls(text, provider=backend.provider), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(request)
            message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        elif exc.status_code == 404:
            message = f"No route {request.url.path}"
        else:
            message = str(exc.detail)
        return _envelope(exc.status_code, _REASONS.get(exc.status_code, "HTTPError"), message, headers)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback once this answered; the caller gets the envelope, no internals.
        return _envelope(500, "InternalError", "The server failed on this request (a bug); see its log")

    def _allowed(request: Request) -> str:
        """Every method some route takes at this path (Starlette names only the first route's)."""
        methods: set[str] = set()
        for route in app.router.routes:
            match, _ = route.matches({**request.scope, "method": "GET"})
            if match is not Match.NONE:
                methods |= set(getattr(route, "methods", None) or ())
        return ", ".join(sorted(methods))

    docs_auth = [] if public_docs else [Depends(authorize)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs_auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs_auth)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} - docs")

    Body = RemoteJobRequest.capped(max_timeout)

    def _job_request(body: RemoteJobRequest) -> JobRequest:
        try:
            return body.to_request(templates)
        except ValidationError as exc:  # the wire model let through what JobRequest refuses: still a 422
            raise InvalidRequest(f"Invalid job request: {exc}", provider=backend.provider) from None

    v1 = [Depends(authorize)]

    def _clamp(wait: float, cap: float) -> float:
        return max(0.0, min(wait, cap))

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobEnvelope,
        responses={
            **_SUBMIT_ERRORS,
            200: {"model": JobEnvelope, "description": "The job an earlier submit with this Idempotency-Key "
                  "created", "links": _JOB_LINKS},
            202: {"description": "Accepted", "links": _JOB_LINKS},
        },
        summary="Submit a job",
    )
    async def submit(
        request: Body,  # type: ignore[valid-type]
        scope: Annotated[str, Depends(authorize)],
        idempotency_key: Annotated[
            str | None,
            Header(
                min_length=1,
                max_length=255,
                description="Send a submit again with the same key and body and get the same job back (not "
                "a second one): safe retries after a lost answer. Keys belong to the token that used them; "
                "the same key with another body is a 422. A key is free again once its job's record expired.",
            ),
        ] = None,
    ) -> Response:
        body = request.model_dump(mode="json", exclude={"request_id"})
        await _accept_webhook(request)
        env, created = await backend.submit_idempotent(
            _job_request(request), idempotency_key, scope=scope, fingerprint=fingerprint(body)
        )
        env = await _register_webhook(request, env)
        return _json(env, 202 if created else 200, {"Location": f"/v1/jobs/{env.job_id}"})

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobEnvelope,
        responses=_JOB_ERRORS,
        dependencies=v1,
        summary="Job status and result (long-poll with ?wait)",
        operation_id="get_job",
    )
    async def get_job(
        job_id: str,
        wait: Annotated[
            float,
            Query(ge=0, allow_inf_nan=False, description=f"Seconds to wait for a change (max {max_wait:g})"),
        ] = 0,
        after: Annotated[
            int | None,
            Query(ge=-1, le=2**53, description="Answer once the job's version passes this"),
        ] = None,
    ) -> Response:
        return _json(await _with_webhook(await backend.get(job_id, wait=_clamp(wait, max_wait), after=after)))

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        response_model=JobEnvelope,
        responses=_CANCEL_ERRORS,
        dependencies=v1,
        summary="Cancel a job (dequeue or interrupt); it stays readable",
        operation_id="cancel_job",
    )
    async def cancel_job(job_id: str) -> Response:
        return _json(await backend.cancel(job_id))

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobEnvelope,
        responses={**_CANCEL_ERRORS, **_E409},
        dependencies=v1,
        summary="Cancel a job if it has not ended, then forget it (404 from then on)",
        operation_id="delete_job",
    )
    async def delete_job(job_id: str) -> Response:
        return _json(await backend.forget(job_id))

    @app.post(
        "/v1/run",
        response_model=JobEnvelope,
        responses={
            **_SUBMIT_ERRORS,
            200: {"description": "The job ended", "links": _JOB_LINKS},
            202: {"model": JobEnvelope, "description": "Still running", "links": _JOB_LINKS},
        },
        dependencies=v1,
        summary="Submit and wait (bounded)",
    )
    async def run(
        request: Body,  # type: ignore[valid-type]
        timeout: Annotated[
            float | None,
            Query(gt=0, allow_inf_nan=False, description=f"Seconds to wait (max {sync_timeout:g})"),
        ] = None,
    ) -> Response:
        await _accept_webhook(request)
        env = await _register_webhook(request, await backend.submit(_job_request(request)))
        budget = _clamp(timeout if timeout is not None else sync_timeout, sync_timeout)
        if not env.terminal:
            env = await _with_webhook(await backend.get(env.job_id, wait=budget))
        if env.terminal:
            return _json(env)
        return _json(env, 202, {"Location": f"/v1/jobs/{env.job_id}"})

    @app.get(
        "/v1/capabilities",
        response_model=Capabilities,
        responses=_HEALTH_ERRORS,
        dependencies=v1,
        summary="What this backend can run: ComfyUI's /object_info (node classes, model files), or null",
        operation_id="capabilities",
    )
    async def capabilities() -> Response:
        return _json(Capabilities(object_info=await backend.capabilities()))

    @app.get(
        "/v1/health",
        response_model=HealthReport,
        responses={**_HEALTH_ERRORS, 503: {"model": HealthReport, "description": "Unhealthy"}},
        dependencies=v1,
        summary="ComfyUI, queue, GPU, version and models",
    )
    async def health(
        deep: Annotated[bool, Query(description="Check on a GPU container (may start one)")] = False,
    ) -> Response:
        report = await backend.health(deep=deep)
        return _json(report, 200 if report.ok else 503)

    @app.get(
        "/v1/templates",
        response_model=TemplateList,
        responses=_HEALTH_ERRORS,
        dependencies=v1,
        summary="The workflow templates jobs may name, with each one's parameter JSON Schema",
        operation_id="list_templates",
    )
    async def list_templates() -> Response:
        items = [TemplateInfo.model_validate(t.describe()) for t in (templates or {}).values()]
        return _json(TemplateList(templates=items))

    @app.get(
        "/v1/templates/{name}",
        response_model=TemplateInfo,
        responses={**_E401, 404: _err("Unknown template (TemplateNotFound)"), **_E422, **_E500},
        dependencies=v1,
        summary="One workflow template",
        operation_id="get_template",
    )
    async def get_template(name: str) -> Response:
        from gpubridge.errors import TemplateNotFound

        try:
            tpl = (templates if templates is not None else {})[name]
        except (KeyError, TemplateNotFound):
            return _error_response(TemplateNotFound(f"No template {name!r} on this server", template=name,
                                                    provider=backend.provider), 404)
        return _json(TemplateInfo.model_validate(tpl.describe()))

    if templates:
        _add_template_schemas(app, templates)

    if metrics is not None:
        from .metrics import CONTENT_TYPE_LATEST

        @app.get("/metrics", dependencies=v1, response_class=Response, summary="Prometheus metrics",
                 operation_id="metrics", responses={**_E401, **_E500, 200: {
                     "content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "Prometheus text format"}})
        async def prometheus_metrics() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if runpod_endpoints:
        from .runpod_facade import add_runpod_facade

        async def accept_runpod_webhook(url: str) -> None:
            if dispatcher is None:
                raise InvalidRequest(
                    "This gateway sends no webhooks (it has no webhook configuration); leave out 'webhook'",
                    provider=backend.provider,
                )
            await dispatcher.check(url)

        async def register_runpod_webhook(job_id: str, url: str) -> None:
            if dispatcher is not None:
                await dispatcher.register(job_id, url, fmt="runpod")

        load = add_runpod_facade(
            app, backend, endpoints=list(runpod_endpoints), check_token=check_token,
            accept_webhook=accept_runpod_webhook, register_webhook=register_runpod_webhook,
            max_timeout=max_timeout, sync_wait=min(runpod_sync_wait, sync_timeout), templates=templates,
        )
        if dispatcher is not None:
            dispatcher.loaders["runpod"] = load

    app.add_middleware(_BodyLimit, limit=max_body_bytes, provider=backend.provider)
    return app



def _add_template_schemas(app: FastAPI, templates: Any) -> None:
    """Put each template's ``params`` schema into the OpenAPI document (``components.schemas``:
    ``TemplateParams_<name>``, and ``TemplateParamsByName`` mapping names to them), so generated clients get
    typed parameters for the templates known when they are generated."""
    import re

    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = base()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        by_name: dict[str, Any] = {}
        for name, tpl in templates.items():
            key = "TemplateParams_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
            schema = tpl.json_schema()
            for prop in schema["properties"].values():
                # Generators read a default as "always present" (openapi-typescript makes it required);
                # it is optional for the caller, so the default goes to the words and to x-default.
                if "default" in prop:
                    prop["x-default"] = prop.pop("default")
                    prop["description"] = f"{prop.get('description', '')} (default: {prop['x-default']!r})".strip()
            schemas[key] = {**schema, "title": key, "x-template-version": tpl.version}
            by_name[name] = {"$ref": f"#/components/schemas/{key}"}
        schemas["TemplateParamsByName"] = {
            "title": "TemplateParamsByName",
            "description": "Each template's params, by template name",
            "type": "object",
            "properties": by_name,
            "required": sorted(by_name),
        }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
