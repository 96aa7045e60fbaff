"""``gpubridge route``: which route a job would take, and why (no job is submitted, no backend called)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from .config import Settings
from .errors import GpuBridgeError
from .models import JobRequest

__all__ = ["register"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{what} takes KEY=VALUE, got {item!r}")
        values[key.strip()] = value
    return values


def explain(settings: Settings, request: JobRequest) -> dict[str, Any]:
    """The route ``request`` takes under ``settings``: name, reason, providers, shadow and stage."""
    from .connect import check_instances, known_providers
    from .plugins import get_registry
    from .routing import match_route, parse_routes

    registry = get_registry()
    check_instances(settings, registry)
    routes = parse_routes(settings.routes, known=known_providers(settings, registry), path=settings.config_file)
    choice = match_route(routes, request)
    if choice.route is not None:
        spec = choice.route.describe()
        providers, shadow = spec["providers"], spec.get("shadow")
        extra = {k: spec[k] for k in ("shadow_rate", "stage", "canary_weight", "queue_timeout") if k in spec}
    else:
        providers, shadow = [settings.provider, *settings.fallbacks], settings.shadow
        extra = {"shadow_rate": settings.shadow_rate} if settings.shadow else {}
    return {
        "route": choice.name,
        "reason": choice.reason,
        "line": choice.route.line if choice.route else None,
        "providers": [{"name": p, "type": settings.provider_type(p)} for p in providers],
        "shadow": shadow,
        **extra,
    }


def register(app: typer.Typer) -> None:
    @app.command()
    def route(
        workflow: Annotated[Path | None, typer.Argument(help="API-format workflow JSON (or --template).")] = None,
        template: Annotated[str | None, typer.Option("--template", help="A workflow template's name.")] = None,
        param: Annotated[list[str], typer.Option("--param", "-P", help="NAME=VALUE for --template.")] = [],  # noqa: B006
        tag: Annotated[list[str], typer.Option("--tag", help="KEY=VALUE: a tag the job carries.")] = [],  # noqa: B006
        config: Annotated[Path | None, typer.Option("--config", help="TOML config file.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    ) -> None:
        """Which route a job would take under the configured [[routes]], and why. Submits nothing."""
        if (workflow is None) == (template is None):
            raise typer.BadParameter("give a WORKFLOW file or --template NAME")
        try:
            settings = Settings.load(config)
            tags = _pairs(tag, "--tag")
            if template is not None:
                from .cli_templates import parse_params
                from .templates import TemplateRegistry

                registry = TemplateRegistry.load(settings.templates)
                values = parse_params(registry[template].params, param, template)
                request = registry.request(template, values, tags=tags)
            else:
                request = JobRequest(workflow=workflow, tags=tags)
            info = explain(settings, request)
        except GpuBridgeError as exc:
            if as_json:
                print(json.dumps({"error": exc.to_dict()}, indent=2))
            else:
                err.print(f"[red]{type(exc).__name__}:[/] {escape(exc.message)}")
            raise typer.Exit(2) from None
        if as_json:
            print(json.dumps(info, indent=2))
            return
        where = f" (line {info['line']})" if info["line"] else ""
        out.print(f"route [bold]{escape(info['route'])}[/]{where}: {escape(info['reason'])}")
        chain = " -> ".join(f"{p['name']} ({p['type']})" if p["type"] != p["name"] else p["name"]
                            for p in info["providers"])
        out.print(f"providers: {escape(chain)}")
        if info["shadow"]:
            out.print(f"shadow: {escape(info['shadow'])}" + (f" at {info['shadow_rate']}" if "shadow_rate" in info else ""))
