"""``gpubridge serve``: the job API over the runner that ``connect()`` builds (the gateway).

Provider, fallbacks, shadow, canary and stage come from the same configuration as every other command
(``GPUBRIDGE_*``, ``--config``). Jobs and idempotency keys live in SQLite in ``--data-dir`` (or in
PostgreSQL with ``GPUBRIDGE_DATABASE_URL``), so a restarted gateway still answers for its jobs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register", "build_gateway"]


def _loopback(host: str) -> bool:
    from .fetch import is_loopback_host

    return is_loopback_host(host)


def _owner_id(data_dir: Path) -> str:
    """This gateway's identity in job leases, kept in its data dir: a restart adopts its own jobs at once."""
    import uuid

    path = data_dir / "gateway-id"
    try:
        return path.read_text().strip() or ""
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        owner = f"gw-{uuid.uuid4().hex[:12]}"
        path.write_text(owner)
        return owner


def build_gateway(
    *,
    config: Path | None = None,
    data_dir: Path | None = None,
    tokens: str | None = None,
    allow_anonymous: bool = False,
    retention: float = 3600.0,
    max_active: int | None = None,
    max_body_mb: float = 64.0,
    accept_wait: float = 5.0,
    drain: float = 30.0,
    lease: float = 15.0,
    public_docs: bool = False,
    runpod_endpoints: list[str] | None = None,
    runner: Any = None,
    templates: Any = None,
) -> Any:
    """The gateway's ASGI app: ``create_app`` over a :class:`RunnerBackend` around ``connect()``. Jobs may
    name the templates in ``templates`` (a registry), else in the configured folder (``templates``,
    ``$GPUBRIDGE_TEMPLATES``, ./workflows) when it exists, checked at start (their declared models against the
    model manifest, ``$GPUBRIDGE_MODELS_MANIFEST`` or ./models.toml or ./modal_app/models.toml, when found)."""
    from gpubridge.config import Settings, WebhookSettings
    from gpubridge.connect import connect
    from gpubridge.server import create_app
    from gpubridge.server.runner_backend import RunnerBackend
    from gpubridge.server.stores import default_data_dir, open_store
    from gpubridge.storage import ArtifactStore

    settings = Settings.load(config)
    if templates is None:
        from gpubridge.errors import ConfigError
        from gpubridge.templates import TEMPLATES_ENV, TemplateRegistry

        if settings.templates.is_dir():
            from gpubridge.cli_models import find_manifest

            try:  # declared models must be in the model manifest, when there is one to check against
                models = find_manifest()
            except ConfigError:
                models = None
            templates = TemplateRegistry.load(settings.templates, models=models)
        elif os.environ.get(TEMPLATES_ENV):
            raise ConfigError(f"{TEMPLATES_ENV}={settings.templates} is not a folder")
    data = Path(data_dir or os.environ.get("GPUBRIDGE_DATA_DIR") or default_data_dir())
    database_url = os.environ.get("GPUBRIDGE_DATABASE_URL") or None
    store = open_store(data, database_url)
    backend = RunnerBackend(
        runner if runner is not None else connect(settings=settings),
        store,
        retention=retention,
        max_active=max_active,
        default_timeout=settings.timeout,
        accept_wait=accept_wait,
        lease=lease,
        owner=None if database_url else _owner_id(data),
        drain=drain,
        close_store=True,
        artifacts=ArtifactStore.from_env(),  # GPUBRIDGE_STORE_*: large outputs as presigned URLs
    )
    from gpubridge.server.metrics import GatewayMetrics

    metrics = GatewayMetrics(backend.runner, active=backend._active)
    backend.on_finish = metrics.job_finished
    return create_app(
        backend,
        tokens=tokens,
        allow_anonymous=allow_anonymous,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        public_docs=public_docs,
        title="gpubridge gateway",
        webhooks=WebhookSettings.load(config),
        runpod_endpoints=runpod_endpoints or None,
        metrics=metrics,
        templates=templates,
    )


def serve(
    host: Annotated[str, typer.Option(help="Address to bind (a non-loopback one needs GPUBRIDGE_API_TOKEN).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8787,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config file (default: GPUBRIDGE_CONFIG).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Where job records live (default: $GPUBRIDGE_DATA_DIR or ~/.local/share/gpubridge).")] = None,
    retention: Annotated[float, typer.Option(min=1, help="Seconds a finished job's result is kept (then 404).")] = 3600.0,
    max_active: Annotated[int | None, typer.Option(min=1, help="Jobs queued or running at once (then 429).")] = None,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body (then 413).")] = 64.0,
    accept_wait: Annotated[float, typer.Option(min=0, help="Seconds a submit waits for the backend to accept the job.")] = 5.0,
    drain: Annotated[float, typer.Option(min=0, help="On SIGTERM, seconds to let jobs in flight end before stopping.")] = 30.0,
    lease: Annotated[float, typer.Option(min=0.1, help="Seconds a replica's claim on a job lasts without renewal.")] = 15.0,
    runpod_endpoint: Annotated[list[str] | None, typer.Option("--runpod-endpoint", help="Serve RunPod's /v2/{ID}/ API for this endpoint id (repeatable).")] = None,
    public_docs: Annotated[bool, typer.Option(help="Serve /docs and /openapi.json without auth.")] = False,
) -> None:
    """Serve the job API (and a RunPod-compatible facade) over the configured runner: the gateway."""
    import uvicorn

    tokens = os.environ.get("GPUBRIDGE_API_TOKEN") or None
    if not tokens and not _loopback(host):
        print(f"error: refusing to serve on {host} without GPUBRIDGE_API_TOKEN (anyone could run jobs); "
              "set a token or bind 127.0.0.1", file=sys.stderr)
        raise typer.Exit(2)
    if not tokens:
        print("warning: no GPUBRIDGE_API_TOKEN: serving without auth on loopback", file=sys.stderr)
    from gpubridge.errors import GpuBridgeError

    try:
        app = build_gateway(
            config=config, data_dir=data_dir, tokens=tokens, allow_anonymous=not tokens, retention=retention,
            max_active=max_active, max_body_mb=max_body_mb, accept_wait=accept_wait, drain=drain, lease=lease,
            public_docs=public_docs, runpod_endpoints=runpod_endpoint or None,
        )
    except GpuBridgeError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    # uvicorn stops accepting on SIGTERM, finishes requests in flight, then the app's shutdown lets jobs
    # in flight end for up to --drain seconds; what is left is adopted by the next start.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=max(1, int(drain)) + 5)


def register(cli: typer.Typer) -> None:
    cli.command("serve")(serve)
