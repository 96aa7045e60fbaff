"""The OpenAPI document of the job API as ``gpubridge serve`` serves it, without serving it.

``python -m gpubridge.server.openapi > clients/typescript/openapi.json`` writes the file the TypeScript
client's types are generated from (with the parameter schemas of the templates in ``./workflows``, or
``--templates DIR``); a test fails when the committed copy is stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gpubridge.models import HealthReport, JobRequest

from .backend import JobBackend
from .schema import JobEnvelope

__all__ = ["document"]


class _SchemaOnly(JobBackend):
    """A backend that runs nothing: the document depends on the routes, not on where jobs run."""

    provider = "gateway"

    async def submit(self, request: JobRequest) -> JobEnvelope:  # pragma: no cover - never served
        raise NotImplementedError

    async def get(self, job_id: str, *, wait: float = 0.0, after: int | None = None) -> JobEnvelope:  # pragma: no cover
        raise NotImplementedError

    async def cancel(self, job_id: str) -> JobEnvelope:  # pragma: no cover
        raise NotImplementedError

    async def health(self, *, deep: bool = False) -> HealthReport:  # pragma: no cover
        raise NotImplementedError


def document(**options: Any) -> dict[str, Any]:
    """The OpenAPI document of ``create_app`` with ``options`` (the gateway's defaults when none)."""
    from .app import create_app

    return create_app(_SchemaOnly(), tokens="unused", **options).openapi()


def main() -> None:
    from pathlib import Path

    from gpubridge.templates import TemplateRegistry

    args = sys.argv[1:]
    folder = Path(args[args.index("--templates") + 1] if "--templates" in args else "workflows")
    templates = TemplateRegistry.load(folder) if folder.is_dir() else None
    json.dump(document(templates=templates), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
