"""Configuration: environment variables over an optional TOML file over defaults, validated by pydantic.

The TOML file is found at ``$GPUBRIDGE_CONFIG``, else ``./gpubridge.toml``, else
``~/.config/gpubridge/config.toml``. Top-level keys are the :class:`Settings` fields; each provider reads
its own table ``[providers.NAME]`` through a :class:`ProviderSettings` subclass, whose fields can also be
set by environment variables with that provider's prefix (``GPUBRIDGE_MODAL_URL``, ...)::

    provider = "modal"
    fallbacks = ["runpod"]
    timeout = 600

    [providers.local]
    comfy_url = "http://127.0.0.1:8188"

    [providers.modal]
    url = "https://ryla--gpubridge-comfyui-api.modal.run"

Precedence, highest first: explicit arguments, environment, TOML, defaults. Secrets are ``SecretStr``:
they print as ``**********`` in reprs, logs and errors.
"""

from __future__ import annotations

import contextvars
import enum
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .errors import ConfigError

__all__ = [
    "Settings",
    "ProviderSettings",
    "Stage",
    "ShadowOptions",
    "ShadowThresholds",
    "default_db_path",
    "find_config_file",
    "load_toml",
    "DEFAULT_COMFY_URL",
    "FetchSettings",
    "WebhookSettings",
]

DEFAULT_COMFY_URL = "http://127.0.0.1:8188"
CONFIG_ENV = "GPUBRIDGE_CONFIG"

S = TypeVar("S", bound="_LayeredSettings")

_FILE_LAYER: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("gpubridge_file_layer", default={})


class ContextSource(PydanticBaseSettingsSource):
    """A settings layer whose values come from a context variable, set around the model's construction: the
    TOML table here (below the environment), a deployment's table in ``modal_app.config``."""

    def __init__(self, settings_cls: type[BaseSettings], var: contextvars.ContextVar[Mapping[str, Any]]):
        super().__init__(settings_cls)
        self.var = var

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.var.get())


class _LayeredSettings(BaseSettings):
    model_config = SettingsConfigDict(env_ignore_empty=True, extra="forbid", validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, ContextSource(settings_cls, _FILE_LAYER))

    @classmethod
    def _build(cls: type[S], file_values: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> S:
        token = _FILE_LAYER.set(file_values)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(f"Invalid configuration{where}: {_describe(exc)}") from None
        finally:
            _FILE_LAYER.reset(token)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def find_config_file() -> Path | None:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV} points at {path}, which is not a file.")
        return path
    for candidate in (Path.cwd() / "gpubridge.toml", Path.home() / ".config" / "gpubridge" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Cannot parse {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Cannot parse {path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from None


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# ----------------------------------------------------------------- migration stages (see gpubridge.shadow)
class Stage(str, enum.Enum):
    """Where a migration stands: ``off`` (control only), ``shadow``, ``canary``, or ``cutover`` (candidate
    only)."""

    OFF = "off"
    SHADOW = "shadow"
    CANARY = "canary"
    CUTOVER = "cutover"

    def __str__(self) -> str:
        return self.value


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/gpubridge/shadow.sqlite3``, else ``~/.local/share/gpubridge/shadow.sqlite3``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "gpubridge" / "shadow.sqlite3"


class ShadowThresholds(BaseModel):
    """The go/no-go thresholds of ``gpubridge shadow report``. A ``None`` threshold is not checked."""

    model_config = ConfigDict(extra="forbid")

    min_samples: int = Field(default=100, ge=1)
    """Fewer shadow pairs than this (overall) gives the verdict ``insufficient-data``."""
    max_success_rate_drop: float | None = Field(default=0.01, ge=0.0, le=1.0)
    """Candidate success rate may trail the control's by at most this (0.01 = one point)."""
    max_mismatch_rate: float | None = Field(default=0.05, ge=0.0, le=1.0)
    """Share of pairs (both succeeded) whose outputs differ beyond the noise floor."""
    max_p95_latency_ratio: float | None = Field(default=1.5, gt=0.0)
    """Candidate p95 total latency over the control's."""
    max_cost_per_image_ratio: float | None = Field(default=None, gt=0.0)
    """Candidate cost per image over the control's."""
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    """Error rate of each criterion's verdict over all looks (see docs/shadow.md: alpha spending)."""
    first_look: int = Field(default=5, ge=1)
    """Pairs at the first look; later looks at twice as many each (5, 10, 20, ...)."""


class ShadowOptions(BaseModel):
    """How the shadow and canary runners behave, and where records go (TOML ``[shadow_options]``)."""

    model_config = ConfigDict(extra="forbid")

    timeout: float | None = Field(default=None, gt=0)
    """Candidate deadline in seconds (default: the request's ``timeout``, else 600)."""
    max_inflight: int = Field(default=16, ge=1)
    """Shadows running at once; a sampled job beyond this is dropped and counted."""
    noise_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    """After warm-up, share of shadowed jobs whose control also runs a second time (noise floor)."""
    noise_warmup: int = Field(default=10, ge=0)
    """Per workflow, the first this many shadowed jobs always get a control-vs-control pair."""
    noise_refresh_s: float | None = Field(default=86400.0, gt=0)
    """Take a noise pair when a workflow's last one is older than this."""
    noise_margin: float = Field(default=2.0, ge=0.0)
    """Bits of perceptual-hash distance allowed above the noise floor before a pair is a mismatch."""
    min_noise_pairs: int = Field(default=5, ge=1)
    """Noise pairs a workflow needs before its measured floor is used instead of ``default_floor``."""
    default_floor: float = Field(default=8.0, ge=0.0)
    """Floor (pHash bits, of 64) for workflows without enough noise pairs."""
    drain_timeout: float = Field(default=10.0, ge=0)
    """On close, how long to let running shadows finish before cancelling them."""
    db: Path | None = None
    """SQLite file for shadow records (default: :func:`default_db_path`)."""
    seed: int | None = None
    """Seed the sampling RNG (reproducible sampling, for tests and benchmarks)."""
    compare_workers: int = Field(default=2, ge=1)
    """Threads of the shadow's own comparison executor (never the event loop's default pool)."""
    thresholds: ShadowThresholds = Field(default_factory=ShadowThresholds)

    def db_path(self) -> Path:
        return Path(self.db).expanduser() if self.db else default_db_path()


class Settings(_LayeredSettings):
    """gpubridge's top-level settings (environment prefix ``GPUBRIDGE_``)."""

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_")

    provider: str = "local"
    """Which provider runs jobs: local, modal, runpod, or any plugin's name."""
    fallbacks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Providers tried in order when the primary fails (comma-separated in the environment)."""
    timeout: float = Field(default=600.0, gt=0)
    """Default job deadline in seconds (queue time included)."""
    queue_timeout: float | None = Field(default=None, gt=0)
    """Reroute a job that waited longer than this for a worker (used by failover)."""
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-provider tables from the TOML file (``[providers.NAME]``)."""
    resilience: dict[str, Any] = Field(default_factory=dict)
    shadow: str | None = None
    """Mirror a sample of traffic to this provider (see gpubridge.shadow)."""
    shadow_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of jobs mirrored to ``shadow`` (``GPUBRIDGE_SHADOW_RATE``)."""
    shadow_options: ShadowOptions = Field(default_factory=ShadowOptions)
    """Shadow/canary tuning, record storage and go/no-go thresholds (TOML ``[shadow_options]``)."""
    stage: Stage | None = None
    """Migration stage from ``provider`` to ``shadow``: off, shadow, canary or cutover. Unset: shadow when
    ``shadow`` is set and ``shadow_rate`` > 0, else off."""
    canary_weight: float = Field(default=0.1, ge=0.0, le=1.0)
    """In the canary stage, the share of jobs routed to ``shadow`` (``GPUBRIDGE_CANARY_WEIGHT``)."""
    database_url: SecretStr | None = None
    """``postgresql://...`` (``GPUBRIDGE_DATABASE_URL``): the gateway's jobs and the shadow records live
    there, shared by every replica, instead of in local SQLite files."""
    pricing: dict[str, float] = Field(default_factory=dict)
    """GPU price table in USD per second, overriding the built-in one (e.g. ``L40S = 0.000542``)."""
    fetch: dict[str, Any] = Field(default_factory=dict)
    """The ``[fetch]`` table: how caller-supplied URLs are fetched (read by :class:`FetchSettings`)."""
    routes: list[dict[str, Any]] = Field(default_factory=list)
    """``[[routes]]``: rules sending jobs to their own provider chains (see :mod:`gpubridge.routing`)."""
    templates: Path = Path("workflows")
    """The folder of workflow templates (``GPUBRIDGE_TEMPLATES``; see :mod:`gpubridge.templates`)."""

    config_file: Path | None = Field(default=None, exclude=True)

    @field_validator("fallbacks", mode="before")
    @classmethod
    def _normalise_fallbacks(cls, value: Any) -> Any:
        return _split_list(value)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Read the TOML file (explicit path, or found by :func:`find_config_file`), then the environment."""
        path = Path(config_file).expanduser() if config_file else find_config_file()
        data: dict[str, Any] = load_toml(path) if path else {}
        if path:
            data["config_file"] = path
        where = f" in {path}" if path else ""
        return cls._build(data, overrides, where)

    def provider_section(self, name: str) -> dict[str, Any]:
        """The ``[providers.NAME]`` table, without its ``type``."""
        return {k: v for k, v in self.providers.get(name, {}).items() if k != "type"}

    def provider_type(self, name: str) -> str:
        """The provider type of instance ``name``: its table's ``type``, else the name itself."""
        kind = self.providers.get(name, {}).get("type")
        return kind if isinstance(kind, str) and kind else name


class ProviderSettings(_LayeredSettings):
    """Base class for a provider's settings.

    Subclasses set ``model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_<NAME>_")`` and
    ``section = "<name>"``; :meth:`from_settings` layers environment over ``[providers.<name>]``.
    """

    section: ClassVar[str] = ""

    @classmethod
    def from_settings(cls: type[S], settings: Settings | None = None, **overrides: Any) -> S:
        """Environment over ``[providers.<section>]``; while a named instance of this type is being built
        (``[providers.NAME] type = "<section>"``), its own table under ``GPUBRIDGE_<NAME>_*`` instead, so
        two RunPod endpoints never share one endpoint id through the environment."""
        settings = settings or Settings.load()
        name = getattr(cls, "section", "")
        instance = BUILDING_INSTANCE.get()
        target = cls
        if instance and instance != name:
            target = _instance_settings(cls, instance)
            name = instance
        where = f" for provider {name!r}" + (f" ({settings.config_file})" if settings.config_file else "")
        return target._build(settings.provider_section(name), overrides, where)


BUILDING_INSTANCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpubridge_instance", default=None)
"""The provider instance whose settings are being read (set by the plugin registry while it builds one)."""


def instance_env_prefix(instance: str) -> str:
    """``GPUBRIDGE_RUNPOD_FACESWAP_`` for instance ``runpod-faceswap``."""
    return "GPUBRIDGE_" + re.sub(r"[^A-Za-z0-9]", "_", instance).upper() + "_"


_INSTANCE_CLASSES: dict[tuple[type, str], type] = {}


def _instance_settings(cls: type[S], instance: str) -> type[S]:
    key = (cls, instance)
    if key not in _INSTANCE_CLASSES:
        _INSTANCE_CLASSES[key] = type(
            cls.__name__, (cls,),
            {"model_config": SettingsConfigDict(env_prefix=instance_env_prefix(instance)), "__module__": cls.__module__},
        )
    return _INSTANCE_CLASSES[key]  # type: ignore[return-value]


class FetchSettings(_LayeredSettings):
    """How caller-supplied URLs are fetched (see :mod:`gpubridge.fetch`): environment ``GPUBRIDGE_FETCH_*``
    over the TOML table ``[fetch]``. Loopback, private, link-local and metadata addresses are refused unless
    ``allow`` names them."""

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_FETCH_")

    allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Host names and CIDR ranges reachable even though private (``127.0.0.1,10.2.0.0/16,bucket.internal``)."""
    max_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    """Largest body one URL input may have (refused while streaming, never buffered past it)."""
    timeout: float = Field(default=60.0, gt=0)
    """Total seconds for one fetch, redirects and body included."""
    max_redirects: int = Field(default=5, ge=0)
    content_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["image/", "video/", "audio/", "application/octet-stream", "binary/octet-stream"]
    )
    """Allowed Content-Type prefixes (a body with no Content-Type is allowed)."""

    @field_validator("allow", "content_types", mode="before")
    @classmethod
    def _normalise_lists(cls, value: Any) -> Any:
        return _split_list(value)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> FetchSettings:
        """The ``[fetch]`` table of the config file (explicit, or found by :func:`find_config_file`), then the
        environment. Only that table is read, so the rest of the file cannot break a fetch."""
        path = Path(config_file).expanduser() if config_file else find_config_file()
        table = load_toml(path).get("fetch", {}) if path else {}
        if not isinstance(table, Mapping):
            raise ConfigError(f"[fetch] in {path} must be a table")
        return cls._build(table, overrides, f" for [fetch] in {path}" if path else " for GPUBRIDGE_FETCH_*")


class WebhookSettings(_LayeredSettings):
    """How job webhooks are delivered (see :mod:`gpubridge.server.webhooks`): environment
    ``GPUBRIDGE_WEBHOOK_*`` over the TOML table ``[webhook]``.

    Deliveries are signed per the Standard Webhooks spec with ``secret`` (``whsec_`` + base64, as the spec's
    libraries generate); without one, jobs that ask for a webhook are refused (422), never sent unsigned.
    A failed delivery is retried with exponential backoff and jitter, ``attempts`` times at most within
    ``window`` seconds of the first. Target URLs pass the guard of URL inputs: loopback, private, link-local
    and metadata addresses are refused unless ``allow`` names them.
    """

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_WEBHOOK_")

    secret: SecretStr | None = None
    attempts: int = Field(default=8, ge=1, le=100)
    first_delay: float = Field(default=5.0, gt=0)
    """Seconds before the first retry; each later one waits twice as long (jittered), up to ``max_delay``."""
    max_delay: float = Field(default=300.0, gt=0)
    window: float = Field(default=900.0, gt=0)
    """No attempt starts later than this many seconds after the first."""
    timeout: float = Field(default=10.0, gt=0)
    """Seconds a receiver has to answer one delivery."""
    allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Host names and CIDR ranges a webhook may target even though private (``127.0.0.1`` in tests)."""
    progress_interval: float = Field(default=2.0, gt=0)
    """At most one progress webhook per job per this many seconds."""

    @field_validator("allow", mode="before")
    @classmethod
    def _normalise_lists(cls, value: Any) -> Any:
        return _split_list(value)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> WebhookSettings:
        """The ``[webhook]`` table of the config file, then the environment."""
        path = Path(config_file).expanduser() if config_file else find_config_file()
        table = load_toml(path).get("webhook", {}) if path else {}
        if not isinstance(table, Mapping):
            raise ConfigError(f"[webhook] in {path} must be a table")
        return cls._build(table, overrides, f" for [webhook] in {path}" if path else " for GPUBRIDGE_WEBHOOK_*")
