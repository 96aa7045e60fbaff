"""``gpubridge models``: list, validate, plan and sync a model manifest (see :mod:`gpubridge.manifest`).

The manifest is ``--manifest PATH``, else ``$GPUBRIDGE_MODELS_MANIFEST``, else ``./models.toml``, else
``./modal_app/models.toml``. ``list``, ``validate`` and ``plan`` without a store work offline; ``plan`` and
``sync`` take a directory store (``--dir``) or a Modal Volume (``--volume``)::

    gpubridge models validate
    gpubridge models plan --volume gpubridge-models
    gpubridge models sync --volume gpubridge-models --only flux1-schnell.safetensors
    gpubridge models sync --dir /runpod-volume/models
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import AuthError, ConfigError, GpuBridgeError, ProviderError, ProviderUnavailable
from .manifest import Manifest, Plan, SyncReport, download, plan

__all__ = ["find_manifest", "models_app"]

models_app = typer.Typer(
    help="Model manifests: list, validate, plan and sync (a Modal Volume or a directory).",
    no_args_is_help=True,
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

MANIFEST_ENV = "GPUBRIDGE_MODELS_MANIFEST"

ManifestOpt = Annotated[
    Path | None,
    typer.Option(
        "--manifest",
        "-m",
        help=f"Manifest TOML (default: ${MANIFEST_ENV}, ./models.toml, ./modal_app/models.toml).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
DirOpt = Annotated[
    Path | None, typer.Option("--dir", help="A directory store (e.g. a mounted network volume).")
]
VolumeOpt = Annotated[
    str | None, typer.Option("--volume", help="A Modal Volume name (needs Modal credentials).")
]
EnvOpt = Annotated[str | None, typer.Option("--env", "-e", help="Modal environment of the Volume.")]
OnlyOpt = Annotated[
    list[str], typer.Option("--only", help="Only this model (name or folder/name); repeatable.")
]


def find_manifest(path: Path | None = None) -> Path:
    """The manifest to use (see the module docstring); ConfigError when there is none."""
    if path is not None:
        return path
    explicit = os.environ.get(MANIFEST_ENV)
    if explicit:
        return Path(explicit)
    for candidate in (Path("models.toml"), Path("modal_app") / "models.toml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"No model manifest: pass --manifest, set {MANIFEST_ENV}, or run where models.toml is.")


def _exit_code(exc: GpuBridgeError) -> int:
    if isinstance(exc, (ProviderError, AuthError)):
        return 3
    if isinstance(exc, ConfigError):
        return 2
    return 1


def _fail(exc: GpuBridgeError, as_json: bool) -> typer.Exit:
    if as_json:
        print(json.dumps({"error": exc.to_dict()}))
    else:
        err.print(f"[bold red]error[/]: {type(exc).__name__}: {exc}", markup=True, highlight=False)
    return typer.Exit(_exit_code(exc))


def _load(path: Path | None) -> Manifest:
    return Manifest.load(find_manifest(path))


def _source(entry: Any) -> str:
    return entry.source + (" (gated)" if entry.gated else "")


@models_app.command("list")
def list_models(manifest: ManifestOpt = None, as_json: JsonOpt = False) -> None:
    """List the manifest's models and where they come from."""
    try:
        m = _load(manifest)
    except GpuBridgeError as exc:
        raise _fail(exc, as_json) from None
    if as_json:
        print(
            json.dumps(
                {
                    "manifest": str(m.path),
                    "models": [
                        {
                            "name": e.name,
                            "folder": e.folder,
                            "target": str(e.target),
                            "source": e.source,
                            "sha256": e.sha256,
                            "gated": e.gated,
                        }
                        for e in m
                    ],
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"models in {m.path}", title_justify="left")
    for col in ("name", "folder", "source", "sha256"):
        table.add_column(col)
    for e in m:
        table.add_row(e.name, e.folder, _source(e), "yes" if e.sha256 else "")
    out.print(table)


@models_app.command()
def validate(manifest: ManifestOpt = None, as_json: JsonOpt = False) -> None:
    """Check the manifest (offline): sources, folders, hashes, duplicates."""
    try:
        m = _load(manifest)
    except GpuBridgeError as exc:
        raise _fail(exc, as_json) from None
    if as_json:
        print(
            json.dumps(
                {"ok": True, "manifest": str(m.path), "models": len(m), "warnings": m.warnings}, indent=2
            )
        )
        return
    for w in m.warnings:
        err.print(f"[yellow]warning[/]: {w}", markup=True, highlight=False)
    out.print(f"{m.path}: {len(m)} models, valid")


def _volume_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a Modal Volume operation, turning Modal's errors into gpubridge's."""
    try:
        return fn(*args, **kwargs)
    except GpuBridgeError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        if name == "AuthError":
            raise AuthError(
                f"Modal refused our credentials: {exc} (run `modal token new`, or set "
                "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET)"
            ) from None
        if type(exc).__module__.startswith(("modal", "grpclib")) or isinstance(exc, OSError):
            raise ProviderUnavailable(f"Modal Volume operation failed: {name}: {exc}") from None
        raise


def _print_plan(p: Plan, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "store": p.store,
                    "items": [
                        {
                            "name": i.entry.name,
                            "target": str(i.entry.target),
                            "source": i.entry.source,
                            "action": i.action,
                            "path": i.path,
                            "reason": i.reason,
                        }
                        for i in p.items
                    ],
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"plan against {p.store}", title_justify="left")
    for col in ("name", "folder", "source", "action", "where"):
        table.add_column(col)
    colour = {"present": "green", "download": "yellow", "unknown": "dim"}
    for i in p.items:
        table.add_row(
            i.entry.name,
            i.entry.folder,
            _source(i.entry),
            f"[{colour[i.action]}]{i.action}[/]",
            i.path or i.reason,
        )
    out.print(table)
    todo = len(p.to_download)
    out.print(
        f"{len(p.present)} present, {todo} to download"
        if p.store != "offline"
        else f"{todo} models; no store given (--dir or --volume), so nothing was checked"
    )


@models_app.command("plan")
def plan_models(
    manifest: ManifestOpt = None,
    dir: DirOpt = None,
    volume: VolumeOpt = None,
    env: EnvOpt = None,
    only: OnlyOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Show which models a store holds and which a sync would download."""
    if dir is not None and volume is not None:
        raise typer.BadParameter("Give --dir or --volume, not both.")
    try:
        m = _load(manifest)
        entries = m.select(only)
        if volume is not None:
            from .providers.modal import plan_volume

            p = _volume_call(plan_volume, entries, volume, environment=env)
        elif dir is not None:
            p = plan(entries, root=dir)
        else:
            p = plan(entries)
    except GpuBridgeError as exc:
        raise _fail(exc, as_json) from None
    _print_plan(p, as_json)


def _print_report(report: SyncReport, where: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"store": where, **report.to_dict()}, indent=2))
        return
    for w in report.warnings:
        err.print(f"[yellow]warning[/]: {w}", markup=True, highlight=False)
    for name, why in report.failed.items():
        err.print(f"[red]failed[/]: {name}: {why}", markup=True, highlight=False)
    out.print(
        f"{where}: {len(report.downloaded)} downloaded, {len(report.present)} already present, "
        f"{len(report.gated)} gated (skipped), {len(report.failed)} failed"
    )


@models_app.command()
def sync(
    manifest: ManifestOpt = None,
    dir: DirOpt = None,
    volume: VolumeOpt = None,
    env: EnvOpt = None,
    only: OnlyOpt = [],  # noqa: B006
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Local store for --volume downloads (default: ~/.cache/gpubridge/models)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Download and upload even what is present.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download missing models into a directory, or upload them into a Modal Volume (batch_upload).

    Hugging Face downloads use HF_TOKEN; gated models without access are skipped with a warning.
    """
    if (dir is None) == (volume is None):
        raise typer.BadParameter("Give exactly one store: --dir DIR or --volume NAME.")
    try:
        m = _load(manifest)
        entries = m.select(only)
        if volume is not None:
            from .providers.modal import sync_volume

            cache = cache_dir or Path.home() / ".cache" / "gpubridge" / "models"
            report = _volume_call(sync_volume, entries, volume, cache_dir=cache, force=force, environment=env)
            where = f"Modal Volume {volume}"
        else:
            assert dir is not None
            report = download(entries, dir, force=force)
            where = str(dir)
    except GpuBridgeError as exc:
        raise _fail(exc, as_json) from None
    _print_report(report, where, as_json)
    if not report.ok:
        raise typer.Exit(1)
