"""The artifact store: job outputs (and inputs too large for a request body) in S3-compatible object storage
(AWS S3, Cloudflare R2, MinIO, GCS interop), handed around as presigned GET URLs.

    GPUBRIDGE_STORE_URL=s3://bucket/prefix          # where objects go
    GPUBRIDGE_STORE_ENDPOINT_URL=https://...        # R2, MinIO and the like (unset: AWS)
    GPUBRIDGE_STORE_REGION, _ACCESS_KEY_ID, _SECRET_ACCESS_KEY (else boto3's chain: AWS_ACCESS_KEY_ID, ...)
    GPUBRIDGE_STORE_URL_EXPIRY=3600                 # seconds a presigned URL lives
    GPUBRIDGE_STORE_THRESHOLD=5MB                   # artifacts above it are uploaded; "all" or "none"

Uploads and presigning come from boto3 (never hand-signed). :meth:`ArtifactStore.offload` turns a result's
large artifacts into URL artifacts (``url``, ``url_expires_at``, ``sha256``, ``size``; no bytes); the Modal
and RunPod workers call it next to ComfyUI, the gateway for providers that return bytes. A request may pick a
prefix *within* the configured bucket and prefix (:meth:`ArtifactStore.key`), never another bucket or other
credentials.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError, ProviderUnavailable, WorkflowInputError
from .models import Artifact, ArtifactKind, JobResult, store_prefix_problem

__all__ = ["ArtifactStore", "StoreSettings", "Stored", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"5MB"`` -> 5000000, ``"1MiB"`` -> 1048576, ``4096`` -> 4096."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 5MB, 512KiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class StoreSettings(BaseSettings):
    """Settings of the artifact store (environment prefix ``GPUBRIDGE_STORE_``)."""

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_STORE_", env_ignore_empty=True, extra="ignore")

    url: str | None = None
    """``s3://bucket/prefix``; unset: no store (artifacts stay inline)."""
    endpoint_url: str | None = None
    """The S3 API endpoint for R2, MinIO, GCS interop...; unset: AWS."""
    region: str | None = None
    access_key_id: SecretStr | None = None
    """Unset: boto3's own chain (AWS_ACCESS_KEY_ID, a profile, an instance role)."""
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    url_expiry: int = Field(default=3600, ge=1, le=604800)
    """Seconds a presigned GET URL stays valid (S3 allows at most 7 days)."""
    threshold: str = "5MB"
    """Artifacts larger than this are uploaded and returned as URLs; ``all`` or ``none``."""

    @field_validator("url")
    @classmethod
    def _s3(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"GPUBRIDGE_STORE_URL must be s3://bucket[/prefix], got {value!r}")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: str) -> str:
        if value.strip().lower() not in ("all", "none"):
            parse_size(value)
        return value

    @property
    def configured(self) -> bool:
        return self.url is not None

    def threshold_bytes(self) -> int | None:
        """Upload artifacts of more than this many bytes; 0: all; None: none."""
        value = self.threshold.strip().lower()
        return 0 if value == "all" else None if value == "none" else parse_size(value)


@dataclass(frozen=True)
class Stored:
    key: str
    url: str
    expires_at: float
    size: int
    sha256: str


class ArtifactStore:
    """One bucket and prefix, reached through a boto3 client (thread-safe; calls run in worker threads)."""

    def __init__(self, settings: StoreSettings | None = None, **overrides: Any):
        self.settings = settings or StoreSettings(**overrides)
        if not self.settings.configured:
            raise ConfigError("No artifact store: set GPUBRIDGE_STORE_URL=s3://bucket/prefix")
        parsed = urlparse(str(self.settings.url))
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> ArtifactStore | None:
        """The store the environment configures, or None."""
        settings = StoreSettings()
        return cls(settings) if settings.configured else None

    def __repr__(self) -> str:  # no credentials, ever
        return f"<ArtifactStore s3://{self.bucket}/{self.prefix} at {self.settings.endpoint_url or 'AWS'}>"

    @property
    def endpoint_host(self) -> str | None:
        """The host presigned URLs point at (workers allow it for URL inputs); None for AWS's own."""
        return urlparse(self.settings.endpoint_url).hostname if self.settings.endpoint_url else None

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise ConfigError("The artifact store needs boto3: pip install 'gpubridge[store]'") from None

                s = self.settings
                secret = (lambda v: v.get_secret_value() if v is not None else None)  # noqa: E731
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=s.endpoint_url, region_name=s.region,
                    aws_access_key_id=secret(s.access_key_id), aws_secret_access_key=secret(s.secret_access_key),
                    aws_session_token=secret(s.session_token),
                    config=Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"},
                                  s3={"addressing_style": "path"} if s.endpoint_url else None),
                )
            return self._client

    def key(self, filename: str, *, job_id: str | None = None, prefix: str | None = None) -> str:
        """``<configured prefix>/<request prefix>/<job id>/<uuid>-<file name>``. A request prefix is a relative
        path of plain segments; anything else (``..``, a leading ``/``, another bucket) is refused."""
        parts = [self.prefix] if self.prefix else []
        if prefix:
            problem = store_prefix_problem(prefix)
            if problem:
                raise WorkflowInputError(problem)
            parts.append(prefix.strip("/"))
        if job_id:
            parts.append(re.sub(r"[^A-Za-z0-9._\-]", "_", job_id)[:100])
        name = re.sub(r"[^A-Za-z0-9._\-]", "_", PurePosixPath(filename or "file").name)[-120:] or "file"
        parts.append(f"{uuid.uuid4().hex[:12]}-{name}")
        return "/".join(parts)

    def presign(self, key: str) -> tuple[str, float]:
        expiry = self.settings.url_expiry
        url = self.client().generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                   ExpiresIn=expiry)
        return url, time.time() + expiry

    def put_bytes(self, data: bytes, key: str, content_type: str | None = None) -> Stored:
        """Upload ``data`` under ``key`` (blocking; see :meth:`put`)."""
        digest = hashlib.sha256(data).hexdigest()
        extra: dict[str, Any] = {"Metadata": {"sha256": digest}}
        if content_type:
            extra["ContentType"] = content_type
        try:
            self.client().put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
        except Exception as exc:  # botocore's errors: the store, not the job, failed
            raise ProviderUnavailable(f"Could not upload {key} to {self!r}: {_short(exc)}") from None
        url, expires = self.presign(key)
        return Stored(key=key, url=url, expires_at=expires, size=len(data), sha256=digest)

    async def put(self, data: bytes, filename: str, *, content_type: str | None = None, job_id: str | None = None,
                  prefix: str | None = None) -> Stored:
        return await asyncio.to_thread(self.put_bytes, data, self.key(filename, job_id=job_id, prefix=prefix),
                                       content_type)

    def should_upload(self, size: int) -> bool:
        limit = self.settings.threshold_bytes()
        return limit is not None and size > limit

    async def offload_artifact(self, art: Artifact, *, job_id: str | None = None, prefix: str | None = None,
                               force: bool = False) -> Artifact:
        """``art`` as a URL artifact when its bytes are over the threshold (or ``force``); else unchanged."""
        if art.data is None or art.kind is ArtifactKind.TEXT or not (force or self.should_upload(len(art.data))):
            return art
        stored = await self.put(art.data, art.filename or f"node{art.node_id}.bin", content_type=art.mime_type,
                                job_id=job_id, prefix=prefix)
        return art.model_copy(update={"data": None, "url": stored.url, "url_expires_at": stored.expires_at,
                                      "sha256": stored.sha256, "size": stored.size})

    async def offload(self, result: JobResult, *, prefix: str | None = None) -> JobResult:
        """``result`` with every artifact over the threshold uploaded and returned as a presigned URL."""
        if not any(a.data is not None and self.should_upload(len(a.data)) for a in result.artifacts):
            return result
        artifacts = [await self.offload_artifact(a, job_id=result.job_id, prefix=prefix) for a in result.artifacts]
        return result.model_copy(update={"artifacts": artifacts})


def _short(exc: BaseException) -> str:
    text = str(exc)
    return (text[:300] + "...") if len(text) > 300 else text
