"""Provider ``runpod``: a RunPod serverless endpoint running the gpubridge worker (or worker-comfyui).

It speaks RunPod's v2 queue API (``{base_url}/{endpoint_id}/run``, ``/status/{id}``, ``/cancel/{id}``,
``/health``, ``/purge-queue``) with one kept-alive ``httpx.AsyncClient`` and a bearer key, and does what the
``runpod`` SDK does not:

- Adaptive polling: a job is polled fast at first (``poll_initial`` 50 ms), the interval growing by
  ``poll_backoff`` (1.3) per poll up to ``poll_max`` (0.5 s), and reset when the job's state changes
  (queued -> running); progress reports do not reset it. Short jobs are seen done well under the SDK's
  fixed 1 s polling floor. One poller per job feeds ``wait``, ``status`` and ``events``.
- Optionally (``sync_wait``), ``run()`` goes through ``POST /runsync?wait=``: RunPod answers the moment the
  job is done, and polling takes over only if it outlives the wait.
- No error is lost: a FAILED job's ``error`` (a JSON string for worker exceptions), the worker's
  ``output.details`` and worker-comfyui's ``details`` become a :class:`~gpubridge.errors.JobFailed` with
  the node, exception type and traceback. Failures of the *worker* (crash, dead ComfyUI, out of memory)
  are ``retryable``; failures of the workflow are not.
- 429 and 5xx are retried with exponential backoff that honours ``Retry-After``, bounded in attempts and
  time. ``POST /run`` is retried only where the request cannot have been accepted (429, 502/503/504,
  connection refused), so a retry never starts a job twice. A transient error never ends a job: the
  poller keeps asking until RunPod reports a terminal state or the deadline passes, and ``status()`` /
  ``cancel()`` ask RunPod again unless RunPod's own word ended the job.
- RunPod's per-endpoint limits (``/run`` 1,000, ``/status`` 2,000, ``/cancel`` 100 requests per 10 s) are
  kept client-side: one token bucket per route, shared by every runner of the endpoint in the process.
- Every body is read in one place per shape: anything unexpected is a retryable ``ProtocolError``; bodies
  over 64 MiB are refused unread.
- ``delayTime``/``executionTime`` become :class:`~gpubridge.models.Timings` and an estimated cost.
- The request is checked against RunPod's 10 MB ``/run`` limit before it is sent.
- A 404 for a job this runner submitted means RunPod dropped it (results are kept 30 min after
  completion; a job's TTL is a hard limit): :class:`~gpubridge.errors.ResultExpired`.
- The job's deadline (which covers ``/runsync``'s wait too) cancels it at RunPod (``POST /cancel``) and
  raises ``JobTimeout(cancelled=True)`` once RunPod confirms it, else ``cancelled=False``.

Modules: ``_transport`` (HTTP, retries, typed errors), ``_polling`` (intervals, transient backoff, the
per-job outcome), ``_shapes`` (RunPod and worker bodies), ``_ratelimit``, ``_health``, ``_settings``,
``_runner`` (RunPodRunner).

The API key is a ``SecretStr``; it is only ever put in the Authorization header.
"""

from __future__ import annotations

from typing import Any

from ...plugins import ProviderSpec, hookimpl
from ._polling import poll_delays
from ._ratelimit import _RateLimiter  # noqa: F401 - tests use it
from ._runner import RunPodRunner
from ._settings import DEFAULT_BASE_URL, RUN_PAYLOAD_LIMIT, RUNPOD_GPU_PRICES, RunPodSettings
from ._shapes import parse_failure

__all__ = [
    "RunPodRunner",
    "RunPodSettings",
    "RUNPOD_GPU_PRICES",
    "DEFAULT_BASE_URL",
    "RUN_PAYLOAD_LIMIT",
    "poll_delays",
    "parse_failure",
]


@hookimpl
def register_providers(register: Any) -> None:
    register(
        ProviderSpec(
            name="runpod",
            factory=RunPodRunner.from_settings,
            description="A RunPod serverless endpoint running the gpubridge worker or worker-comfyui "
            "(GPUBRIDGE_RUNPOD_ENDPOINT_ID, GPUBRIDGE_RUNPOD_API_KEY)",
            settings=RunPodSettings,
        )
    )

