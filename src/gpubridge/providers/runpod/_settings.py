"""RunPod provider settings, its API's documented limits and GPU prices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from ...config import ProviderSettings

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
RUN_PAYLOAD_LIMIT = 10 * 1024 * 1024
"""RunPod's documented request limit for ``/run`` (10 MB; ``/runsync`` allows 20 MB)."""

RUNPOD_GPU_PRICES: dict[str, float] = {
    # RunPod serverless "flex" prices in USD per second (runpod.io/pricing, 2025). An estimate: override
    # with GPUBRIDGE_RUNPOD_GPU_PRICE_PER_S or the [pricing] table.
    "AMPERE_16": 0.00016, "A4000": 0.00016, "A4500": 0.00016, "RTX4000": 0.00016,
    "AMPERE_24": 0.00019, "A5000": 0.00019, "L4": 0.00019, "RTX3090": 0.00019,
    "ADA_24": 0.00031, "RTX4090": 0.00031,
    "AMPERE_48": 0.00034, "A6000": 0.00034, "A40": 0.00034,
    "ADA_48_PRO": 0.00053, "L40": 0.00053, "L40S": 0.00053, "RTX6000ADA": 0.00053,
    "AMPERE_80": 0.00076, "A100": 0.00076,
    "ADA_80_PRO": 0.00116, "H100": 0.00116,
    "HOPPER_141": 0.00155, "H200": 0.00155,
}

class RunPodSettings(ProviderSettings):
    """Settings of the RunPod provider (environment prefix ``GPUBRIDGE_RUNPOD_``, TOML ``[providers.runpod]``).

    The API key may also come from ``RUNPOD_API_KEY``.
    """

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_RUNPOD_")
    section = "runpod"

    endpoint_id: str | None = None
    """The serverless endpoint's id (``GPUBRIDGE_RUNPOD_ENDPOINT_ID``)."""
    api_key: SecretStr | None = None
    """The RunPod API key (``GPUBRIDGE_RUNPOD_API_KEY``, else ``RUNPOD_API_KEY``)."""
    base_url: str = DEFAULT_BASE_URL
    """The v2 API root; the endpoint's URL is ``{base_url}/{endpoint_id}``."""
    gpu_type: str | None = None
    """GPU pool or type the endpoint runs on (e.g. ADA_24, L40S, H100), for cost estimates."""
    gpu_price_per_s: float | None = Field(default=None, ge=0)
    """USD per second of execution; overrides the price table."""
    poll_initial: float = Field(default=0.05, gt=0)
    """First status poll interval in seconds (and after every change)."""
    poll_max: float = Field(default=0.5, gt=0)
    """Longest interval between two status polls."""
    poll_backoff: float = Field(default=1.3, ge=1.0)
    """Factor the interval grows by while nothing changes."""
    poll_fast: float = Field(default=0.02, gt=0)
    """Interval around a running job's expected end (learned from this workflow's recent executionTime)."""
    status_rate: float = Field(default=100.0, gt=0)
    """Status polls per second at most, over all jobs (RunPod allows 2000 per 10 s per endpoint)."""
    request_timeout: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    """HTTP attempts per call on 429/5xx/connection errors (1 = no retries)."""
    retry_initial: float = Field(default=0.25, ge=0)
    """First backoff in seconds; doubles per attempt (with jitter) unless Retry-After says otherwise."""
    retry_max_wait: float = Field(default=30.0, ge=0)
    """Longest single wait between two attempts, Retry-After included."""
    retry_budget: float = Field(default=120.0, gt=0)
    """Stop retrying one call after this many seconds."""
    execution_timeout: float | None = Field(default=None, gt=0)
    """policy.executionTimeout in seconds; default: the job's own timeout."""
    ttl_margin: float | None = Field(default=300.0, ge=0)
    """policy.ttl = job timeout + this margin, so an abandoned job dies at RunPod too; unset: no ttl."""
    low_priority: bool = False
    """policy.lowPriority: the job does not trigger worker scaling."""
    webhook: str | None = None
    sync_wait: float = Field(default=0.0, ge=0, le=300)
    """``run()`` without an event callback submits through ``POST /runsync?wait=`` and gets the result the
    moment it is ready (RunPod's server-side wait), polling only if the job outlives this many seconds.
    0 (default): always ``/run`` + polling. Trade-off: until /runsync answers the job id is unknown, so a
    caller cancelled during that wait cannot cancel the job (it runs on; RunPod drops its result)."""
    max_payload_bytes: int = Field(default=RUN_PAYLOAD_LIMIT, gt=0)
    health_resample: float = Field(default=2.0, ge=0)
    """When /health shows queued jobs and no ready worker, look again after this many seconds to see
    whether the queue grows (0: only compare with the previous health() call)."""
    stalled_unhealthy_s: float = Field(default=120.0, ge=0)
    """``health()`` says unhealthy once the endpoint has had jobs queued, no ready worker and no job
    finishing for this long (a stuck endpoint); until then such an endpoint is degraded at most."""
    rate_limits: bool = True
    """Keep to RunPod's per-endpoint limits (/run 1000, /status 2000, /cancel 100 requests per 10 s), one
    limiter per route shared by every runner of the endpoint in this process."""
    cancel_grace: float = Field(default=5.0, gt=0)
    """How long the poller tries to cancel a job at its deadline before reporting it may still run."""
    status_sync: bool | None = None
    """Follow jobs with ``/status-sync/{id}?wait=`` (RunPod holds the request until the job ends or the wait
    passes) instead of polling ``/status``. None (default): try it, and fall back to adaptive polling for good
    when the endpoint answers 404 there."""
    status_sync_wait: float = Field(default=10.0, gt=0, le=300)
    """Longest server-side wait of one ``/status-sync`` request (progress is reported at least this often)."""
    capabilities_ttl: float = Field(default=3600.0, ge=0)
    """How long what the endpoint can run (a capabilities job on the gpubridge worker) is trusted."""
    capabilities_wait: float = Field(default=10.0, gt=0, le=300)
    """How long a capabilities job may wait for a worker that is already up (it is low priority: it never
    starts one, and its ttl ends it at RunPod when none takes it)."""
    worker: Literal["worker-comfyui", "gpubridge"] = "worker-comfyui"
    """What the endpoint runs. A stock worker-comfyui base64-decodes every ``images[].image``, so URL
    inputs are fetched here (through the guarded fetcher) and sent inline, within the size limit; with
    ``gpubridge`` (contrib/runpod_worker) they are passed as URLs and the worker downloads them."""

