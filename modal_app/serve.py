"""Serve the job API with uvicorn, in front of a ComfyUI you run (the in-process backend)::

    python -m modal_app.serve --comfy-url http://127.0.0.1:8188 --port 8000 --token s3cret
    GPUBRIDGE_MODAL_URL=http://127.0.0.1:8000 GPUBRIDGE_MODAL_TOKEN=s3cret gpubridge run -p modal wf.json

The API is the one the Modal deployment serves; only the backend differs.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from gpubridge.config import WebhookSettings
from gpubridge.server import create_app
from gpubridge.storage import ArtifactStore
from .backends import InProcessBackend
from .config import DEFAULT_PRICES


def build_app(
    comfy_url: str,
    *,
    token: str | None = None,
    allow_anonymous: bool = False,
    gpu: str | None = None,
    default_timeout: float = 600.0,
    backend_options: dict[str, Any] | None = None,
    **api_options: Any,
) -> Any:
    """The API over an in-process backend for the ComfyUI at ``comfy_url``. ``backend_options`` go to
    :class:`InProcessBackend` (``retention``, ``max_active``, ``result_dir``, ``max_result_bytes``)."""
    backend = InProcessBackend.for_url(
        comfy_url,
        worker_options={"gpu": gpu, "prices": DEFAULT_PRICES, "default_timeout": default_timeout,
                        "artifacts": ArtifactStore.from_env()},  # GPUBRIDGE_STORE_*: outputs as URLs
        **(backend_options or {}),
    )
    return create_app(backend, tokens=token, allow_anonymous=allow_anonymous, **api_options)


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """``python -m modal_app.serve``'s options; each help names its default (never a token's value)."""
    parser = argparse.ArgumentParser(
        prog="python -m modal_app.serve",
        description="Serve the job API (the one the Modal deployment serves) with uvicorn, in front of a "
        "ComfyUI you run (the in-process backend).",
    )
    add = parser.add_argument
    add("--comfy-url", default=None,
        help="the ComfyUI to run jobs on (default: $GPUBRIDGE_COMFY_URL, else http://127.0.0.1:8188)")
    add("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    add("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    add("--token", default=None, help="bearer token(s), comma-separated (default: $GPUBRIDGE_API_TOKEN)")
    add("--allow-anonymous", action="store_true", help="serve without auth (loopback only!)")
    add("--gpu", default=None, help="GPU type for cost estimates, e.g. L40S (default: none, no cost)")
    add("--retention", type=_positive, default=3600.0,
        help="seconds a finished job's result is kept (default: 3600)")
    add("--max-active", type=int, default=None,
        help="queued + running jobs at once, then 429 (default: no limit)")
    add("--result-dir", default=None, help="where finished results wait to be fetched (default: a temp dir)")
    add("--max-result-mb", type=_positive, default=2048.0,
        help="MB of results kept on disk; the oldest go first (default: 2048)")
    add("--max-timeout", type=_positive, default=None,
        help="longest timeout a job may ask for, in s (default: 86400)")
    add("--public-docs", action="store_true", help="serve /docs and /openapi.json without auth")
    add("--templates", default=None,
        help="workflow template folder (default: $GPUBRIDGE_TEMPLATES, else the repository's workflows/)")
    return parser


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    args.comfy_url = args.comfy_url or os.environ.get("GPUBRIDGE_COMFY_URL", "http://127.0.0.1:8188")
    args.token = args.token or os.environ.get("GPUBRIDGE_API_TOKEN")
    backend_options: dict[str, Any] = {
        "retention": args.retention,
        "max_active": args.max_active,
        "result_dir": args.result_dir,
        "max_result_bytes": int(args.max_result_mb * 1024 * 1024),
    }
    from .runtime import load_templates

    extra: dict[str, Any] = {"public_docs": args.public_docs, "webhooks": WebhookSettings.load(),
                             "templates": load_templates(args.templates)}
    if args.max_timeout is not None:
        extra["max_timeout"] = args.max_timeout
    app = build_app(
        args.comfy_url,
        token=args.token,
        allow_anonymous=args.allow_anonymous,
        gpu=args.gpu,
        backend_options=backend_options,
        **extra,
    )
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
