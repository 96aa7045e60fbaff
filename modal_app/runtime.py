"""Container-side steps of the Modal app, kept out of ``app.py`` so they can be tested without Modal.

- :func:`link_models`: symlink the manifest's files from the models Volume into ComfyUI's folders.
- :func:`launch_comfy`: link, then start ComfyUI with :class:`~gpubridge.comfy.ComfyProcess`.
- :func:`set_cuda_device`: after a CPU memory-snapshot restore, let ComfyUI find the GPU.
- :func:`make_worker`: the per-container :class:`~modal_app.worker.ComfyWorker`.
- :func:`load_templates`: the workflow templates the job API accepts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from gpubridge.comfy import ComfyClient, ComfyProcess, ComfyStartError, JobFiles
from gpubridge.manifest import LinkReport, Manifest, link
from gpubridge.templates import TemplateRegistry

from .config import MODAL_APP_DIR, REMOTE_TEMPLATES_DIR, TEMPLATES_DIR, AppConfig
from gpubridge.server.store import JobStore
from gpubridge.storage import ArtifactStore

from .worker import ComfyWorker

__all__ = [
    "MANIFEST_FILE", "launch_comfy", "link_models", "load_manifest", "load_templates", "make_worker",
    "set_cuda_device",
]

log = logging.getLogger("gpubridge.modal_app")

MANIFEST_FILE = MODAL_APP_DIR / "models.toml"


def load_manifest(path: str | Path = MANIFEST_FILE) -> Manifest:
    return Manifest.load(path)


def load_templates(folder: str | Path | None = None) -> TemplateRegistry | None:
    """The workflow templates the job API accepts: ``folder``, else $GPUBRIDGE_TEMPLATES, else the copy
    shipped in the image (/root/workflows), else the repository's workflows/; None when there is none.
    A bad template, or one declaring a model models.toml lacks, raises ConfigError, so a broken deploy fails
    at start, not per job."""
    for candidate in (folder, os.environ.get("GPUBRIDGE_TEMPLATES"), REMOTE_TEMPLATES_DIR, TEMPLATES_DIR):
        if candidate and Path(candidate).is_dir():
            # the models they declare must be in the manifest this app ships (models.toml beside this file)
            return TemplateRegistry.load(candidate, models=MANIFEST_FILE if MANIFEST_FILE.is_file() else None)
    return None


def link_models(config: AppConfig, manifest: Manifest | None = None) -> LinkReport:
    """Symlink the deployment's models (``config.models``, else every manifest model) present on the Volume
    into ``<comfy>/models``; report the rest."""
    manifest = manifest or load_manifest()
    entries = manifest.select(config.models)  # this deployment's model set (all when unset)
    report = link(entries, config.models_mount, config.comfy_models_dir)
    if report.missing:
        log.warning(
            "%d manifest models are not on the Volume %r: %s "
            "(run download_models or `gpubridge models sync`)",
            len(report.missing),
            config.models_volume,
            ", ".join(report.missing),
        )
    print(
        f"[gpubridge] linked {len(report.linked)} models, kept {len(report.kept)}, "
        f"missing {len(report.missing)}"
    )
    return report


def launch_comfy(config: AppConfig, manifest: Manifest | None = None) -> ComfyProcess:
    """Link the models and start ComfyUI; returns once it answers ``/system_stats``."""
    link_models(config, manifest)
    process = ComfyProcess(path=config.comfy_path, port=config.comfy_port, args=config.comfy_args, echo=True)
    process.start()
    return process


def set_cuda_device(config: AppConfig, *, timeout: float = 30.0) -> None:
    """Tell the ComfyUI restored from a CPU snapshot to use the GPU (the memory_snapshot_helper route)."""
    url = f"http://127.0.0.1:{config.comfy_port}/cuda/set_device"
    try:
        resp = httpx.post(url, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise ComfyStartError(f"ComfyUI did not answer {url} after the snapshot restore: {exc}") from None
    if resp.status_code != 200:
        raise ComfyStartError(
            f"ComfyUI answered {resp.status_code} to {url} after the snapshot restore; is the "
            "memory_snapshot_helper node installed?"
        )


def make_worker(
    config: AppConfig,
    store: JobStore,
    *,
    process: ComfyProcess | None = None,
    on_dead: Callable[[], Awaitable[None]] | None = None,
    manifest: Manifest | None = None,
) -> ComfyWorker:
    """The container's worker: one ComfyClient for every job it runs."""
    url = process.url if process is not None else f"http://127.0.0.1:{config.comfy_port}"
    client = ComfyClient(url, provider="modal")
    return ComfyWorker(
        client,
        store,
        provider="modal",
        process=process,
        price=config.price,
        default_timeout=config.default_timeout,
        progress_interval=0.5,
        on_dead=on_dead,
        manifest=manifest if manifest is not None else load_manifest(),
        models_dir=config.comfy_models_dir,
        files=None if os.environ.get("GPUBRIDGE_KEEP_JOB_FILES") else JobFiles(
            Path(config.comfy_path) / "output", Path(config.comfy_path) / "input"),
        artifacts=ArtifactStore.from_env(),  # from the store_secret, when configured
    )
