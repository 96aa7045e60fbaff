"""``gpubridge templates``: list, show, validate, run and propose workflow templates (see
:mod:`gpubridge.templates`).

The folder is ``--dir``, else ``$GPUBRIDGE_TEMPLATES`` (or ``templates`` in the config file), else
``./workflows``. Exit codes as for ``gpubridge run``; a bad template or parameter exits 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import Settings
from .errors import ConfigError, GpuBridgeError, ParamInvalid
from .models import JobRequest, Workflow
from .templates import TemplateRegistry
from .templates.params import Bad
from .templates.propose import propose, to_toml
from .templates.registry import TEMPLATES_ENV, manifest_files, request_fields
from .templates.template import NAME_PATTERN

__all__ = ["templates_app"]

templates_app = typer.Typer(
    help="Workflow templates: named, typed, versioned workflows (list, show, validate, run, new).",
    no_args_is_help=True,
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", "-d", help=f"Template folder (default: ${TEMPLATES_ENV}, config 'templates', "
                 "./workflows)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _folder(folder: Path | None) -> Path:
    if folder is not None:
        return folder
    try:
        return Settings.load().templates
    except ConfigError:
        return Path("workflows")


def _fail(exc: GpuBridgeError, as_json: bool = False) -> typer.Exit:
    if as_json:
        print(json.dumps({"error": exc.to_dict()}, indent=2, default=str))
    else:
        err.print(f"[red]{type(exc).__name__}:[/] {exc.message}", markup=True, highlight=False)
    return typer.Exit(2)


def _load(folder: Path | None, models: Path | None = None, as_json: bool = False) -> TemplateRegistry:
    try:
        return TemplateRegistry.load(_folder(folder), models=models)
    except GpuBridgeError as exc:
        raise _fail(exc, as_json) from None


@templates_app.command("list")
def list_(folder: DirOpt = None, as_json: JsonOpt = False) -> None:
    """The templates in the folder, with their versions and parameters."""
    registry = _load(folder, as_json=as_json)
    if as_json:
        print(json.dumps([t.describe() for t in registry.values()], indent=2))
        return
    table = Table("name", "version", "parameters", "description", title=f"templates in {registry.folder}")
    for t in registry.values():
        table.add_row(t.name, t.version, ", ".join(t.params) or "-", escape(t.description))
    out.print(table)


@templates_app.command()
def show(name: Annotated[str, typer.Argument(help="Template name.")], folder: DirOpt = None,
         as_json: JsonOpt = False) -> None:
    """One template: its parameters (type, default, bounds, binding), models and outputs; --json adds its
    JSON Schema."""
    registry = _load(folder, as_json=as_json)
    try:
        tpl = registry[name]
    except GpuBridgeError as exc:
        raise _fail(exc, as_json) from None
    if as_json:
        print(json.dumps(tpl.describe(), indent=2))
        return
    out.print(f"[bold]{tpl.name}[/] version {tpl.version}" + (f": {escape(tpl.description)}" if tpl.description else ""))
    table = Table("parameter", "type", "default", "bounds", "bound to", "description")
    for p in tpl.params.values():
        bounds = ", ".join(str(c) for c in p.choices) if p.choices else (
            f"{'' if p.min is None else p.min}..{'' if p.max is None else p.max}"
            if (p.min is not None or p.max is not None) else "")
        default = "(required)" if p.required else "" if p.default is None else json.dumps(p.default)
        table.add_row(p.name, p.type, escape(default), escape(bounds), escape(", ".join(p.bind)), escape(p.description))
    out.print(table)
    if tpl.models:
        out.print("models: " + ", ".join(tpl.models))
    if tpl.outputs:
        out.print("outputs: " + ", ".join(f"{o.node} ({o.kind})" for o in tpl.outputs))


@templates_app.command()
def validate(
    folder: DirOpt = None,
    models: Annotated[Path | None, typer.Option("--models", "-m", help="Model manifest the declared models must "
                                                "be in (default: $GPUBRIDGE_MODELS_MANIFEST, ./models.toml, "
                                                "./modal_app/models.toml).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every template: bindings resolve, defaults lie within bounds, declared models are in the model
    manifest. Exits 2 naming each problem."""
    from .cli_models import find_manifest

    if models is None:
        try:
            models = find_manifest()
        except ConfigError:
            models = None
    registry = _load(folder, models, as_json)
    if as_json:
        print(json.dumps({"ok": True, "templates": {t.name: t.version for t in registry.values()},
                          "models_manifest": str(models) if models else None}, indent=2))
        return
    note = f" (models checked against {models})" if models else " (no model manifest: models not checked)"
    out.print(f"{len(registry)} template(s) in {registry.folder} are valid{note}")


def parse_params(tpl_params: dict[str, Any], items: list[str], name: str) -> dict[str, Any]:
    """``--param NAME=VALUE`` items as the template's typed values (``templates run``, ``route``);
    ParamInvalid naming every bad or unknown one."""
    values: dict[str, Any] = {}
    bad: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(f"--param takes NAME=VALUE, got {item!r}")
        p = tpl_params.get(key)
        if p is None:
            import difflib

            hint = difflib.get_close_matches(key, list(tpl_params), n=1)
            bad[key] = f"unknown parameter (did you mean {hint[0]!r}?)" if hint else "unknown parameter"
            continue
        try:
            values[key] = p.parse_text(text)
        except Bad as exc:
            bad[key] = str(exc)
    if bad:
        raise ParamInvalid(name, bad)
    return values


@templates_app.command()
def run(
    name: Annotated[str, typer.Argument(help="Template name.")],
    param: Annotated[list[str], typer.Option("--param", "-P", help="NAME=VALUE, repeatable: 7, 0.5, true, an "
                                             "enum choice, an image path or URL, lora.safetensors:0.8.")] = [],  # noqa: B006
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Write artifacts to this folder.")] = None,
    provider: Annotated[str | None, typer.Option("--provider", "-p", help="Provider name (default: "
                                                 "GPUBRIDGE_PROVIDER or 'local').")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", "-t", help="Job deadline in seconds.",
                                                  min=0.001)] = None,
    folder: DirOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config file.")] = None,
    url: Annotated[str | None, typer.Option("--url", help="Override the provider's URL.")] = None,
) -> None:
    """Run a template with parameters and wait for its outputs; a bad parameter exits 2 before anything
    is submitted."""
    from .cli import run_job

    registry = _load(folder, as_json=as_json)

    def build() -> JobRequest:
        tpl = registry[name]
        values = parse_params(tpl.params, param, tpl.name)
        return JobRequest(**request_fields(registry, name, values, {"timeout": timeout}))

    run_job(build, provider=provider, out_dir=out_dir, as_json=as_json, quiet=quiet, config=config, url=url)


@templates_app.command()
def new(
    name: Annotated[str, typer.Argument(help="The new template's name.")],
    from_: Annotated[Path, typer.Option("--from", help="API-format workflow JSON to make it from.")],
    folder: DirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing template of that name.")] = False,
    dry_run: Annotated[bool, typer.Option("--print", help="Print the proposed manifest; write nothing.")] = False,
) -> None:
    """Propose a manifest for a workflow (prompt, seed, steps, size, images, LoRAs, models, outputs found by
    node class) and write NAME.json + NAME.toml into the template folder. Edit the manifest, then
    `gpubridge templates validate`."""
    from .cli_models import find_manifest
    from .manifest import Manifest

    if not NAME_PATTERN.match(name):
        raise typer.BadParameter(f"{name!r}: use letters, digits, '_', '-' and '.'")
    try:
        wf = Workflow.load(from_)
        try:
            known = {e.name for e in Manifest.load(find_manifest())}
        except ConfigError:
            known = None
        text = to_toml(propose(wf, known_models=known))
    except GpuBridgeError as exc:
        raise _fail(exc) from None
    if dry_run:
        print(text, end="")
        return
    root = _folder(folder)
    manifest_path, wf_path = root / f"{name}.toml", root / f"{name}.json"
    if not force and (manifest_path.exists() or wf_path.exists()):
        raise _fail(ConfigError(f"Template {name!r} exists in {root} (use --force to overwrite)"))
    root.mkdir(parents=True, exist_ok=True)
    if from_.resolve() != wf_path.resolve():
        shutil.copyfile(from_, wf_path)
    manifest_path.write_text(f"# Proposed by gpubridge templates new from {from_.name}: review it.\n" + text)
    print(text, end="")
    err.print(f"wrote {wf_path} and {manifest_path}; check with: gpubridge templates validate --dir {root}")
    others = [p for p in manifest_files(root) if p != manifest_path]
    if others:
        err.print(f"({len(others)} other template(s) in {root})")
