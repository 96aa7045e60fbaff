"""gpubridge on Modal: ComfyUI on a GPU class, the job API on a CPU class.

    modal run modal_app/app.py::download_models     # fill the models Volume from models.toml
    modal deploy modal_app/app.py                    # deploy (settings: GPUBRIDGE_APP_*, see config.py)

- ``ComfyUI`` (GPU, fallback list): starts ComfyUI in ``@modal.enter(snap=True)`` (CPU, captured by the
  memory snapshot), moves it to the GPU after restore, and runs one job per input (``run``), reporting
  state and progress in a ``modal.Dict``.
- ``JobAPI`` (CPU): serves :func:`gpubridge.server.create_app` from ``@modal.asgi_app``; it spawns
  ``ComfyUI.run`` and follows the calls, so status polls never wake a GPU.

Importing this module does no network I/O: Modal objects are lazy until deployed or called.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

# `modal deploy modal_app/app.py` imports this file as a script; make the package importable.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import modal  # noqa: I001  (after the sys.path fix-up above)
import modal.experimental

from modal_app.config import load_config
from modal_app.image import ImageSpec, build_image

config = load_config()
image_spec = ImageSpec.load()
# The image builder version fixes the base image; the pin applies unless the environment chose another.
os.environ.setdefault("MODAL_IMAGE_BUILDER_VERSION", image_spec.builder)
image = build_image(config, image_spec)
app = modal.App(config.name, image=image)

models_volume = modal.Volume.from_name(config.models_volume, create_if_missing=True)
jobs_dict = modal.Dict.from_name(config.jobs_dict, create_if_missing=True)

API_TOKEN_ENV = "GPUBRIDGE_API_TOKEN"
_CUDA_AFTER_RESTORE = config.memory_snapshot and not config.gpu_snapshot


def _secrets(*names: str | None) -> list[modal.Secret]:
    return [modal.Secret.from_name(name) for name in names if name]


@app.cls(
    volumes={config.models_mount: models_volume},
    secrets=_secrets(config.hf_secret, config.store_secret),
    **config.gpu_cls_options(),
)
@modal.concurrent(**config.gpu_concurrency())
class ComfyUI:
    """ComfyUI on a GPU; one job per input."""

    @modal.enter(snap=config.memory_snapshot)
    def launch(self) -> None:
        """Start ComfyUI (during the snapshot: on CPU, models linked from the Volume)."""
        from modal_app.runtime import launch_comfy

        self.process = launch_comfy(config)
        self._worker: Any = None
        self._lock: asyncio.Lock | None = None

    @modal.enter(snap=False)
    def restore(self) -> None:
        """After restore: relink (the Volume may have new files) and move ComfyUI onto the GPU."""
        from modal_app.runtime import link_models, set_cuda_device

        link_models(config)
        if _CUDA_AFTER_RESTORE:
            set_cuda_device(config)

    async def worker(self) -> Any:
        """The container's worker, created on the event loop that runs the inputs."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._worker is None:
                from modal_app.runtime import make_worker
                from modal_app.worker import ModalDictStore

                self._worker = make_worker(
                    config, ModalDictStore(jobs_dict), process=self.process, on_dead=_stop_fetching_inputs
                )
        return self._worker

    @modal.method()
    async def run(self, request: dict[str, Any], submitted_at: float) -> dict[str, Any]:
        """Run one job (a JobRequest as JSON); returns its outcome, failures included."""
        from gpubridge.models import JobRequest

        worker = await self.worker()
        job_id = modal.current_function_call_id() or f"local-{id(request)}"
        return await worker.run(job_id, JobRequest.model_validate(request), submitted_at=submitted_at)

    @modal.method()
    async def health(self) -> dict[str, Any]:
        """This container's health report (also stored as the latest heartbeat)."""
        from gpubridge.server.schema import HEALTH_KEY

        worker = await self.worker()
        report = (await worker.health()).model_dump(mode="json")
        await jobs_dict.put.aio(HEALTH_KEY, report)
        return report

    @modal.exit()
    def stop(self) -> None:
        self.process.stop()


async def _stop_fetching_inputs() -> None:
    await modal.experimental.stop_fetching_inputs.aio()


@app.cls(secrets=_secrets(config.api_secret), **config.api_cls_options())
@modal.concurrent(**config.api_concurrency())
class JobAPI:
    """The job API (CPU only)."""

    @modal.asgi_app(requires_proxy_auth=config.proxy_auth)
    def web(self) -> Any:
        from gpubridge.config import WebhookSettings
        from gpubridge.server import create_app
        from modal_app.backends import ModalBackend
        from modal_app.runtime import load_templates
        from modal_app.worker import ModalDictStore

        gpu = ComfyUI()
        backend = ModalBackend(
            spawn=lambda payload, submitted_at: gpu.run.spawn.aio(payload, submitted_at),
            from_id=modal.FunctionCall.from_id,
            store=ModalDictStore(jobs_dict),
            remote_health=lambda: gpu.health.remote.aio(),
            default_timeout=config.default_timeout,
            poll_interval=config.poll_interval,
            health_timeout=config.health_timeout,
        )
        return create_app(
            backend,
            tokens=os.environ.get(API_TOKEN_ENV),
            proxy_auth=config.proxy_auth,
            allow_anonymous=config.allow_anonymous,
            max_body_bytes=config.max_body_bytes,
            max_wait=config.max_wait,
            sync_timeout=config.sync_timeout,
            max_timeout=config.max_timeout,
            public_docs=config.public_docs,
            webhooks=WebhookSettings.load(),
            templates=load_templates(),
        )


@app.function(
    volumes={config.models_mount: models_volume},
    secrets=_secrets(config.hf_secret),
    timeout=4 * 3600,
    cpu=2.0,
)
def download_models(only: str = "", force: bool = False) -> dict[str, Any]:
    """Download this deployment's models (all of the manifest's when it names none) into the Volume
    (``--only a.safetensors,b.safetensors`` for some)."""
    from gpubridge.manifest import download
    from modal_app.runtime import load_manifest

    manifest = load_manifest()
    entries = manifest.select([n for n in only.split(",") if n.strip()] or config.models)
    report = download(entries, config.models_mount, force=force)
    models_volume.commit()
    for line in report.warnings:
        print(f"warning: {line}")
    print(
        f"downloaded {len(report.downloaded)}, present {len(report.present)}, gated {len(report.gated)}, "
        f"failed {len(report.failed)}"
    )
    for name, why in report.failed.items():
        print(f"failed: {name}: {why}")
    if not report.ok:
        raise RuntimeError(f"{len(report.failed)} model downloads failed: {', '.join(report.failed)}")
    return report.to_dict()
