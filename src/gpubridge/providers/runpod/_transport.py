"""HTTP to one RunPod endpoint: bounded retries on 429/5xx, typed errors, Retry-After."""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any

import httpx
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_after_delay

from ...errors import (
    AuthError,
    PayloadTooLarge,
    ProtocolError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)

from ...gate import RequestGate
from ._ratelimit import EndpointLimits, route_class

log = logging.getLogger("gpubridge.providers.runpod")

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest response body read from RunPod (a /status body carries the job's base64 outputs)."""

SHORT_CALLS = 100
"""Short requests handed to httpx at once per endpoint client; more wait at the gate (:mod:`gpubridge.gate`)."""
LONG_POLLS = 2000
"""Long-polls (/runsync, /status-sync) at once per endpoint client: one per job being followed."""


class _NotFound(ProviderError):
    """A 404 from the API (translated by each caller: expired job, unknown endpoint...)."""

    retryable = False


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def _jitter() -> float:
    import random

    return random.random()


class Transport:
    """One kept-alive ``httpx.AsyncClient`` to ``{base_url}/{endpoint_id}`` with a bearer key, and bounded
    retries: 429 and 5xx are retried with exponential backoff that honours ``Retry-After``; a request that
    may have been accepted (``resend=False``) is retried only when it cannot have been."""

    def __init__(self, *, name: str, endpoint_id: str, base_url: str, api_key: SecretStr | None,
                 request_timeout: float, max_attempts: int, retry_initial: float, retry_max_wait: float,
                 retry_budget: float, transport: httpx.AsyncBaseTransport | None = None,
                 limits: EndpointLimits | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        self.name = name
        self.limits = limits
        """RunPod's per-route limits for this endpoint (shared with every runner of it), or None."""
        self.max_body_bytes = max_body_bytes
        self.endpoint_id = endpoint_id
        self.base_url = base_url
        self.max_attempts = max_attempts
        self.retry_initial = retry_initial
        self.retry_max_wait = retry_max_wait
        self.retry_budget = retry_budget
        headers = {"Accept": "application/json", "User-Agent": "gpubridge-runpod"}
        if api_key is not None and api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self.http = httpx.AsyncClient(
            base_url=f"{base_url}/{endpoint_id}",
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=min(10.0, request_timeout)),
            # SHORT_CALLS short requests at once (the gate) plus one long-poll per job being followed
            # (/runsync, /status-sync hold their connection while RunPod waits): long-polls never queue short
            # calls behind them, and nothing queues inside httpx's pool.
            limits=httpx.Limits(max_connections=SHORT_CALLS + LONG_POLLS, max_keepalive_connections=SHORT_CALLS),
            transport=transport,
            trust_env=False,
        )
        self.gate = RequestGate(SHORT_CALLS, request_timeout)
        self.stats: collections.Counter[str] = collections.Counter()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, *, content: bytes | None = None, resend: bool = True,
                   timeout: float | None = None, long_poll: bool = False) -> Any:
        """One API call with bounded retries. ``resend=False`` (POST /run): retry only when the request
        cannot have been accepted."""
        route = route_class(path)

        def retry_this(exc: BaseException) -> bool:
            if isinstance(exc, RateLimited):
                return True
            if isinstance(exc, ProviderUnavailable) and exc.retryable:
                return resend or bool(getattr(exc, "_not_sent", False))
            return False

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = getattr(exc, "retry_after", None)
            if after is not None:
                return min(max(0.0, after), self.retry_max_wait)
            base = self.retry_initial * (2 ** (state.attempt_number - 1))
            return min(self.retry_max_wait, base * (0.5 + _jitter()))

        def before_sleep(state: RetryCallState) -> None:
            self.stats["retries"] += 1
            exc = state.outcome.exception() if state.outcome else None
            log.info("RunPod %s %s: %s; retrying (attempt %d)", method, path, exc, state.attempt_number + 1)

        retrying = AsyncRetrying(
            retry=retry_if_exception(retry_this),
            wait=wait,
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.retry_budget),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if self.limits is not None:
                    await self.limits.acquire(route)
                self.stats[route] += 1
                if long_poll:
                    return await self._once(method, path, content, timeout)
                async with self.gate.slot(provider=self.name, what=f"RunPod {method} {route}"):
                    return await self._once(method, path, content, timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_capped(self, resp: httpx.Response, where: str, method: str, path: str) -> bytes:
        """The body, refused (ProtocolError) past ``max_body_bytes`` before it is all in memory."""
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_big(where, method, path, int(declared))
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_big(where, method, path, size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_big(self, where: str, method: str, path: str, size: int) -> ProtocolError:
        return ProtocolError(
            f"{where} answered {method} {path} with a body over {self.max_body_bytes} bytes ({size}+); not read",
            provider=self.name, retryable=True,
        )

    async def _once(self, method: str, path: str, content: bytes | None, timeout: float | None = None) -> Any:
        where = f"RunPod endpoint {self.endpoint_id} ({self.base_url})"
        headers = {"Content-Type": "application/json"} if content is not None else None
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=self.http.timeout.connect)
        try:
            request = self.http.build_request(method, path, content=content, headers=headers, **extra)
            resp = await self.http.send(request, stream=True)
            try:
                raw = await self._read_capped(resp, where, method, path)
            finally:
                await resp.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            err = ProviderUnavailable(f"Cannot reach {where}: {_short(exc)}", provider=self.name)
            err._not_sent = True  # type: ignore[attr-defined]
            raise err from None
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(
                f"{where} did not answer {method} {path} in time ({type(exc).__name__})", provider=self.name
            ) from None
        except httpx.TransportError as exc:
            raise ProviderUnavailable(
                f"{where} dropped {method} {path} ({_short(exc)})", provider=self.name
            ) from None
        code = resp.status_code
        text = raw[:400].decode("utf-8", "replace")
        if code < 300:
            try:
                return json.loads(raw)
            except ValueError:
                raise ProtocolError(
                    f"{where} sent malformed JSON for {method} {path} (HTTP {code}): {text[:120]!r}",
                    provider=self.name,
                    status_code=code,
                ) from None
        if code in (401, 403):
            hint = "" if "Authorization" in self.http.headers else " No API key is configured."
            raise AuthError(
                f"{where} refused the API key (HTTP {code}) for {method} {path}. Check GPUBRIDGE_RUNPOD_API_KEY "
                f"or RUNPOD_API_KEY.{hint}",
                provider=self.name,
            )
        if code == 404:
            raise _NotFound(f"{where} answered 404 to {method} {path}", provider=self.name, status_code=404)
        if code == 413:
            raise PayloadTooLarge(
                f"{where} refused {method} {path} as too large (HTTP 413)", provider=self.name,
                size=len(content) if content else None,
            )
        if code == 429:
            err = RateLimited(
                f"{where} is rate limiting {method} {path} (HTTP 429)",
                provider=self.name,
                retry_after=_retry_after(resp),
                status_code=429,
            )
            err._not_sent = True  # type: ignore[attr-defined]
            raise err
        if code >= 500:
            err = ProviderUnavailable(
                f"{where} answered {code} to {method} {path}: {text[:200]}", provider=self.name,
                status_code=code,
            )
            # Even a 502/503/504 may come from a proxy after RunPod took the request: only a request that
            # never left (connection refused) or a 429 is known not to have been accepted.
            raise err
        raise ProtocolError(
            f"{where} answered {code} to {method} {path}: {text[:200]}",
            provider=self.name,
            status_code=code,
            retryable=False,
        )

