"""The Modal app's configuration: environment variables ``GPUBRIDGE_APP_*`` over defaults.

It is read when ``modal deploy`` imports the app, and baked into the image's environment (:meth:`to_env`),
so the containers see the same values. One codebase deploys several apps: ``GPUBRIDGE_APP_DEPLOYMENT=NAME``
takes the ``[deployments.NAME]`` table of ``modal_app/deployments.toml`` as the defaults (its app name, GPU
list, model set, concurrency, ...), under the environment. ``python -m modal_app.deployments`` lists and
checks them (the deploy workflow deploys each). Decorator settings come from :meth:`AppConfig.gpu_cls_options`
and friends, so tests assert on this object as well as on Modal's own view of the app::

    GPUBRIDGE_APP_GPUS="L40S,A100-40GB" GPUBRIDGE_APP_MIN_CONTAINERS=1 modal deploy modal_app/app.py
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from gpubridge.config import ContextSource
from gpubridge.errors import ConfigError

__all__ = ["DEFAULT_PRICES", "DEPLOYMENTS_FILE", "ENV_PREFIX", "MODAL_APP_DIR", "AppConfig", "gpu_from_device",
           "load_config", "load_deployments"]

ENV_PREFIX = "GPUBRIDGE_APP_"
MODAL_APP_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = MODAL_APP_DIR.parent / "workflows"
"""The repository's workflow templates, shipped into the image at :data:`REMOTE_TEMPLATES_DIR`."""
REMOTE_TEMPLATES_DIR = "/root/workflows"
DEPLOYMENTS_FILE = MODAL_APP_DIR / "deployments.toml"
"""One ``[deployments.NAME]`` table per Modal app this codebase deploys (see the module docstring)."""

_DEPLOYMENT_LAYER: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("gpubridge_app_deployment",
                                                                                       default={})
"""The selected deployment's table, set by :func:`load_config`: below the environment, above the defaults."""


def load_deployments(path: Path = DEPLOYMENTS_FILE) -> dict[str, dict[str, Any]]:
    """The ``[deployments.NAME]`` tables (empty without the file)."""
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from None
    tables = data.get("deployments", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{path}: expected [deployments.NAME] tables")
    return tables

# On-demand GPU prices in USD per second (https://modal.com/pricing, checked 2026-07). Override with
# GPUBRIDGE_APP_PRICES='{"L40S": 0.000542}' or "L40S=0.000542,H100=0.001097".
DEFAULT_PRICES: dict[str, float] = {
    "T4": 0.000164,
    "L4": 0.000222,
    "A10": 0.000306,
    "A10G": 0.000306,
    "L40S": 0.000542,
    "A100-40GB": 0.000583,
    "A100-80GB": 0.000694,
    "RTX-PRO-6000": 0.000842,
    "H100": 0.001097,
    "H200": 0.001261,
    "B200": 0.001736,
}


def _split(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


class AppConfig(BaseSettings):
    """Everything the deployment can be tuned with. Field ``x`` is set by ``GPUBRIDGE_APP_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    name: str = "gpubridge"
    """The Modal app name (``modal deploy`` creates or updates it)."""
    deployment: str | None = None
    """Which ``[deployments.NAME]`` of ``deployments.toml`` this app is (its table gives the defaults)."""
    models: Annotated[list[str] | None, NoDecode] = None
    """The model files (names from models.toml) this app links and downloads; unset: all of them."""

    # -- the GPU class
    gpus: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["L40S", "A100-40GB"])
    """GPU types in order of preference; Modal falls back along the list."""
    max_inputs: int = Field(default=2, ge=1)
    """Jobs one GPU container takes at once (ComfyUI queues them and runs one at a time)."""
    min_containers: int = Field(default=0, ge=0)
    max_containers: int | None = Field(default=10, ge=1)
    buffer_containers: int | None = Field(default=None, ge=0)
    scaledown_window: int = Field(default=300, ge=2)
    """Seconds an idle GPU container stays up (it is billed while up)."""
    timeout: int = Field(default=3600, ge=10)
    """Hard limit for one job input on Modal; jobs have their own, shorter, deadline."""
    startup_timeout: int = Field(default=900, ge=10)
    """Container start-up (image, snapshot restore, ComfyUI start) limit."""
    memory_snapshot: bool = True
    """Snapshot the container after ComfyUI started on CPU; restore then moves it to the GPU."""
    gpu_snapshot: bool = False
    """Modal's alpha GPU snapshots (experimental_options.enable_gpu_snapshot)."""
    cpu: float | None = None
    memory: int | None = None

    # -- ComfyUI inside the container
    comfy_path: str = "/root/comfy/ComfyUI"
    comfy_port: int = 8188
    comfy_args: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["--disable-auto-launch"])

    # -- storage and secrets
    models_volume: str = "gpubridge-models"
    models_mount: str = "/models"
    jobs_dict: str = "gpubridge-jobs"
    """The modal.Dict holding job state and progress (queued/running/terminal)."""
    hf_secret: str | None = "huggingface"
    """Modal Secret with HF_TOKEN, for gated models (empty: none)."""
    api_secret: str | None = "gpubridge-api"
    """Modal Secret with GPUBRIDGE_API_TOKEN (one or more comma-separated bearer tokens; empty: none)."""
    store_secret: str | None = None
    """Modal Secret with the artifact store's GPUBRIDGE_STORE_* settings (URL, endpoint, credentials): the GPU
    containers upload outputs over its threshold and return presigned URLs (empty: outputs stay inline)."""
    proxy_auth: bool = False
    """Also require Modal proxy auth (Modal-Key/Modal-Secret headers) on the web endpoint."""
    allow_anonymous: bool = False
    """Serve without any auth (only for private testing)."""
    public_docs: bool = False
    """Serve ``/openapi.json`` and ``/docs`` without auth (by default they take the API's auth)."""
    max_timeout: float = Field(default=24 * 3600.0, ge=1, le=7 * 24 * 3600.0)
    """The longest ``timeout`` a job may ask for (seconds; a longer one is a 422)."""

    # -- the web API
    api_min_containers: int = Field(default=0, ge=0)
    api_max_inputs: int = Field(default=100, ge=1)
    api_scaledown_window: int = Field(default=300, ge=2)
    default_timeout: float = Field(default=600.0, gt=0)
    """Deadline of a job that does not set one (seconds from submission, queue time included)."""
    max_wait: float = Field(default=50.0, gt=0, le=120)
    """Longest long-poll (``GET /v1/jobs/{id}?wait=``); Modal cuts web requests at 150 s."""
    sync_timeout: float = Field(default=110.0, gt=0, le=130)
    """Longest ``POST /v1/run`` before it answers 202 with the job still running."""
    max_body_mb: float = Field(default=64.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)
    health_timeout: float = Field(default=20.0, gt=0)

    # -- cost
    prices: Annotated[dict[str, float], NoDecode] = Field(default_factory=lambda: dict(DEFAULT_PRICES))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, ContextSource(settings_cls, _DEPLOYMENT_LAYER))

    @field_validator("gpus", "comfy_args", "models", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("hf_secret", "api_secret", "store_secret", mode="before")
    @classmethod
    def _optional_name(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none", "-") else value

    @field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                parsed = json.loads(text)
            else:
                parsed = {}
                for item in text.split(","):
                    key, sep, price = item.partition("=")
                    if not sep:
                        raise ValueError(f"expected GPU=USD_PER_SECOND, got {item!r}")
                    parsed[key.strip()] = float(price)
            return {**DEFAULT_PRICES, **parsed}
        return value

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        if not self.gpus:
            raise ValueError("gpus must name at least one GPU type")
        if not self.models_mount.startswith("/"):
            raise ValueError("models_mount must be an absolute path")
        return self

    # ------------------------------------------------------------------------------------------ views

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def comfy_models_dir(self) -> str:
        return f"{self.comfy_path}/models"

    def gpu_cls_options(self) -> dict[str, Any]:
        """Keyword arguments of ``@app.cls`` for the ComfyUI class (volumes, secrets and image aside)."""
        opts: dict[str, Any] = {
            "gpu": list(self.gpus),
            "min_containers": self.min_containers,
            "max_containers": self.max_containers,
            "buffer_containers": self.buffer_containers,
            "scaledown_window": self.scaledown_window,
            "timeout": self.timeout,
            "startup_timeout": self.startup_timeout,
            "enable_memory_snapshot": self.memory_snapshot,
        }
        if self.memory_snapshot and self.gpu_snapshot:
            opts["experimental_options"] = {"enable_gpu_snapshot": True}
        if self.cpu is not None:
            opts["cpu"] = self.cpu
        if self.memory is not None:
            opts["memory"] = self.memory
        return opts

    def gpu_concurrency(self) -> dict[str, Any]:
        """Keyword arguments of ``@modal.concurrent`` for the ComfyUI class."""
        return {"max_inputs": self.max_inputs}

    def api_cls_options(self) -> dict[str, Any]:
        """Keyword arguments of ``@app.cls`` for the (CPU-only) web API class."""
        return {
            "min_containers": self.api_min_containers,
            "scaledown_window": self.api_scaledown_window,
            "timeout": int(max(self.sync_timeout, self.max_wait) + 30),
        }

    def api_concurrency(self) -> dict[str, Any]:
        return {"max_inputs": self.api_max_inputs}

    def price(self, gpu: str | None) -> float | None:
        """USD per second for ``gpu`` (``"L40S"``, ``"H100:2"``), or None when unknown."""
        if not gpu:
            return None
        base, _, count = gpu.partition(":")
        rate = self.prices.get(base) or self.prices.get(base.upper())
        if rate is None:
            return None
        return rate * (int(count) if count.isdigit() else 1)

    def to_env(self) -> dict[str, str]:
        """The non-default settings as ``GPUBRIDGE_APP_*`` variables (baked into the image)."""
        defaults = AppConfig.model_construct()
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value == getattr(defaults, name, object()):
                continue
            key = ENV_PREFIX + name.upper()
            if value is None:
                out[key] = "none" if name in ("hf_secret", "api_secret") else ""
            elif isinstance(value, (list, dict)):
                out[key] = json.dumps(value)
            else:
                out[key] = str(value)
        return {k: v for k, v in out.items() if v != ""}


def load_config(*, deployments: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> AppConfig:
    """The config from the environment over the selected deployment's table (``deployment`` here, else
    ``GPUBRIDGE_APP_DEPLOYMENT``), with ``overrides`` on top; errors become ConfigError."""
    name = overrides.get("deployment") or os.environ.get(ENV_PREFIX + "DEPLOYMENT") or None
    table: dict[str, Any] = {}
    if name:
        tables = load_deployments() if deployments is None else deployments
        if name not in tables:
            raise ConfigError(f"No deployment {name!r} in {DEPLOYMENTS_FILE.name} "
                              f"(known: {', '.join(sorted(tables)) or 'none'})")
        unknown = set(tables[name]) - set(AppConfig.model_fields)
        if unknown:
            raise ConfigError(f"[deployments.{name}] in {DEPLOYMENTS_FILE.name}: unknown setting(s) "
                              f"{', '.join(sorted(unknown))}")
        table = {**tables[name], "deployment": name}
    token = _DEPLOYMENT_LAYER.set(table)
    try:
        return AppConfig(**overrides)
    except (ValidationError, ValueError) as exc:
        where = f"deployment {name!r} / " if name else ""
        raise ConfigError(f"Invalid Modal app configuration ({where}{ENV_PREFIX}*): {exc}") from None
    finally:
        _DEPLOYMENT_LAYER.reset(token)


_GPU_PATTERNS: tuple[tuple[str, str], ...] = (
    ("B200", "B200"),
    ("H200", "H200"),
    ("H100", "H100"),
    ("RTX PRO 6000", "RTX-PRO-6000"),
    ("L40S", "L40S"),
    ("A10G", "A10G"),
    ("A10", "A10"),
    ("L4", "L4"),
    ("T4", "T4"),
)


def gpu_from_device(name: str | None, vram_total: int | None = None) -> str | None:
    """Modal's GPU type for a device as ComfyUI's ``/system_stats`` names it.

    ``"cuda:0 NVIDIA L40S : cudaMallocAsync"`` is ``"L40S"``; an A100 is told apart by its memory.
    """
    if not name:
        return None
    upper = name.upper()
    if "A100" in upper:
        if vram_total is not None:
            return "A100-80GB" if vram_total > 48 * 1024**3 else "A100-40GB"
        return "A100-80GB" if "80GB" in upper else "A100-40GB"
    for needle, gpu in _GPU_PATTERNS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(needle)}(?![A-Z0-9])", upper):
            return gpu
    return None
