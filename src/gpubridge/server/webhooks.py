"""Job webhooks: when a job ends, POST its envelope to the URL its caller gave, signed per Standard Webhooks.

- **Signed**: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` from the ``standardwebhooks``
  package with the deployment's secret. The id stays the same across the retries of one delivery, so a
  receiver dedupes on it; the timestamp and signature are made afresh for each attempt.
- **Retried** on anything but a 2xx (a 410 Gone stops it), with exponential backoff and jitter, at most
  ``attempts`` times within ``window`` seconds of the first (:class:`RetrySchedule`, a pure object).
- **Never in the job's way**: delivery runs in its own tasks with a bounded timeout per attempt; a receiver
  that is down, slow or failing changes the delivery record and nothing else.
- **Durable**: each delivery is a record in the job store (``webhook:{job_id}``), written when the job is
  accepted; a restarted server picks up every delivery still waiting or pending (:meth:`start`).
- **Guarded**: target URLs pass the URL guard of inputs (:class:`~gpubridge.fetch.UrlFetcher`): http(s)
  only, no credentials, no loopback, private, link-local or metadata address unless configured.
- **Visible**: the delivery's state (attempts, last status, delivered at) is part of the job's envelope.

Optional progress webhooks (``webhook_events=["progress"]``) are best effort: one attempt each, at most one
per ``progress_interval`` seconds per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from gpubridge.config import WebhookSettings
from gpubridge.errors import (
    ConfigError,
    GpuBridgeError,
    InputUnavailable,
    InvalidRequest,
    JobNotFound,
    WorkflowInputError,
)
from gpubridge.fetch import UrlFetcher, show_url

from .schema import WebhookDelivery

__all__ = ["RetrySchedule", "WebhookDelivery", "WebhookDispatcher", "webhook_key"]

log = logging.getLogger("gpubridge.server.webhooks")

_PREFIX = "webhook:"


def webhook_key(job_id: str) -> str:
    return f"{_PREFIX}{job_id}"


@dataclass(frozen=True)
class RetrySchedule:
    """When to try a failed delivery again: a pure decision (no clock, no randomness of its own).

    Attempt ``n`` (1-based) failed at ``now``; the next waits ``first * factor**(n-1)`` seconds, capped at
    ``max_delay`` and jittered by ±``jitter``; there is none after ``attempts`` attempts or when it would
    start more than ``window`` seconds after the first. The defaults make 8 attempts over about 10 minutes.
    """

    attempts: int = 8
    first: float = 5.0
    factor: float = 2.0
    max_delay: float = 300.0
    window: float = 900.0
    jitter: float = 0.25

    @classmethod
    def from_settings(cls, s: WebhookSettings) -> RetrySchedule:
        return cls(attempts=s.attempts, first=s.first_delay, max_delay=s.max_delay, window=s.window)

    def next_at(self, attempts_made: int, first_at: float, now: float, rnd: float) -> float | None:
        """The time of the next attempt, or None when there is to be none. ``rnd`` is uniform in [0, 1)."""
        if attempts_made >= self.attempts:
            return None
        delay = min(self.first * self.factor ** max(0, attempts_made - 1), self.max_delay)
        delay *= 1.0 - self.jitter + 2.0 * self.jitter * rnd
        at = now + delay
        return at if at - first_at <= self.window else None


Loader = Callable[[str], Awaitable[tuple[bytes, bool]]]
"""``job_id`` -> (the payload, whether the job has ended). Raises JobNotFound once the job is gone."""


class WebhookDispatcher:
    """Delivers the webhooks of one server's jobs. ``load`` gives a job's payload (its envelope as JSON, or
    the RunPod facade's status body) and whether it ended; ``wait`` blocks until the job changes or ends
    (``job_id, after_version, seconds``). ``clock`` is wall time (timestamps are signed), ``rng`` the
    jitter's source; both are injectable for tests."""

    def __init__(
        self,
        store: Any,
        settings: WebhookSettings,
        *,
        loaders: dict[str, Loader],
        wait: Callable[[str, int | None, float], Awaitable[int]],
        fetcher: UrlFetcher | None = None,
        schedule: RetrySchedule | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        on_attempt: Callable[[str], None] | None = None,
        provider: str = "gateway",
    ):
        self.store = store
        self.settings = settings
        self.loaders = loaders
        self._wait = wait
        self.fetcher = fetcher or UrlFetcher(allow=settings.allow, timeout=settings.timeout)
        self.schedule = schedule or RetrySchedule.from_settings(settings)
        self.clock = clock
        self.rng = rng
        self.on_attempt = on_attempt
        self.provider = provider
        self._signer: Any = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    # -- accepting

    async def check(self, url: str) -> str:
        """Refuse a webhook URL a job may not use (422 naming the rule); returns it. A name that cannot be
        resolved right now passes: resolution is retried at delivery."""
        if self.settings.secret is None or not self.settings.secret.get_secret_value():
            raise InvalidRequest(
                "This server has no webhook secret (GPUBRIDGE_WEBHOOK_SECRET), so it sends no webhooks",
                provider=self.provider,
            )
        try:
            u = self.fetcher.parse(url, "webhook")
            if u.userinfo:
                raise WorkflowInputError("webhook: a URL with credentials is refused; sign with the webhook secret")
            await self.fetcher.vet(u, "webhook")
        except InputUnavailable:
            pass
        except WorkflowInputError as exc:
            raise InvalidRequest(str(exc), provider=self.provider) from None
        return url

    async def register(self, job_id: str, url: str, *, events: Sequence[str] = (), fmt: str = "v1") -> None:
        """Record that ``job_id`` reports to ``url`` (idempotent: a resubmitted job keeps its delivery) and
        start following the job."""
        record = {
            "job_id": job_id,
            "url": url,
            "state": "waiting",
            "webhook_id": f"msg_{uuid.uuid4().hex}",
            "attempts": 0,
            "events": list(events),
            "format": fmt,
            "version": 0,
        }
        await self.store.put_new(webhook_key(job_id), record)
        self._follow(job_id)

    async def status(self, job_id: str) -> WebhookDelivery | None:
        raw = await self.store.get(webhook_key(job_id))
        return self._public(raw) if raw else None

    # -- running

    async def start(self) -> None:
        """Resume every delivery a previous run of this server left waiting or pending."""
        try:
            keys = await self.store.keys(_PREFIX)
        except NotImplementedError:
            log.warning("%s cannot list its records: webhooks pending at the last stop are not resumed",
                        type(self.store).__name__)
            return
        for key in keys:
            raw = await self.store.get(key)
            if raw and raw.get("state") in ("waiting", "pending"):
                self._follow(str(raw["job_id"]))

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _follow(self, job_id: str) -> None:
        if self._closed or job_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(job_id), name=f"webhook {job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))

    async def _deliver(self, job_id: str) -> None:
        try:
            record = await self.store.get(webhook_key(job_id))
            if not record:
                return
            if record["state"] == "waiting":
                record = await self._await_end(job_id, record)
            while record is not None and record["state"] == "pending":
                due = record.get("next_attempt_at") or 0.0
                if due > self.clock():
                    await asyncio.sleep(due - self.clock())  # the retry's backoff
                record = await self._attempt(job_id, record)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not touch the job path; the record stays for the next start
            log.exception("webhook delivery for %s failed unexpectedly", job_id)

    async def _await_end(self, job_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
        progress = "progress" in record.get("events", ())
        version: int | None = None
        last_progress = 0.0
        backoff = 0.5
        while True:
            try:
                version = await self._wait(job_id, version if progress else None, 30.0)
                body, ended = await self.loaders[record.get("format", "v1")](job_id)
            except JobNotFound:
                return await self._give_up(job_id, record, "the job was gone before it could be reported")
            except GpuBridgeError:  # the backend is away for a moment: the job has not ended for that
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            if ended:
                record = {**record, "state": "pending", "next_attempt_at": None, "first_at": None}
                await self.store.put(webhook_key(job_id), record)
                return record
            if progress and self.clock() - last_progress >= self.settings.progress_interval:
                last_progress = self.clock()
                asyncio.get_running_loop().create_task(self._progress(job_id, record, body, version))

    async def _progress(self, job_id: str, record: dict[str, Any], body: bytes, version: int | None) -> None:
        with contextlib.suppress(GpuBridgeError):
            await self._send(record["url"], f"{record['webhook_id']}_p{version}", body)

    async def _attempt(self, job_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
        try:
            body, _ended = await self.loaders[record.get("format", "v1")](job_id)
        except JobNotFound:
            return await self._give_up(job_id, record, "the job's result expired before it could be delivered")
        except GpuBridgeError as exc:
            status, error = None, f"could not load the job: {exc}"
        else:
            status, error = None, None
            try:
                status = await self._send(record["url"], record["webhook_id"], body)
            except WorkflowInputError as exc:  # refused now (a name that resolves to a private address)
                return await self._give_up(job_id, {**record, "attempts": record["attempts"] + 1}, str(exc))
            except GpuBridgeError as exc:
                error = str(exc)
        now = self.clock()
        first_at = record.get("first_at") or now
        attempts = record["attempts"] + 1
        if status is not None and 200 <= status < 300:
            self._count("delivered")
            record = {**record, "state": "delivered", "attempts": attempts, "last_status": status,
                      "last_error": None, "delivered_at": now, "next_attempt_at": None, "first_at": first_at}
            await self.store.put(webhook_key(job_id), record)
            return record
        self._count("failed_attempt")
        error = error or f"the receiver answered {status}"
        nxt = None if status == 410 else self.schedule.next_at(attempts, first_at, now, self.rng())
        record = {**record, "attempts": attempts, "last_status": status, "last_error": error,
                  "first_at": first_at, "next_attempt_at": nxt, "state": "pending" if nxt else "failed"}
        await self.store.put(webhook_key(job_id), record)
        if nxt is None:
            self._count("gave_up")
            log.warning("webhook for %s: gave up after %d attempts (%s)", job_id, attempts, error)
            return None
        return record

    async def _give_up(self, job_id: str, record: dict[str, Any], why: str) -> None:
        self._count("gave_up")
        await self.store.put(webhook_key(job_id), {**record, "state": "failed", "last_error": why,
                                                   "next_attempt_at": None})
        return None

    async def _send(self, url: str, webhook_id: str, body: bytes) -> int:
        now = self.clock()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "gpubridge-webhooks",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": self._sign(webhook_id, now, body),
        }
        return await self.fetcher.post(url, body, headers, what="webhook", timeout=self.settings.timeout)

    def _sign(self, webhook_id: str, now: float, body: bytes) -> str:
        if self._signer is None:
            from standardwebhooks import Webhook

            secret = self.settings.secret
            if secret is None:
                raise ConfigError("GPUBRIDGE_WEBHOOK_SECRET is not set")
            self._signer = Webhook(secret.get_secret_value())
        return self._signer.sign(webhook_id, datetime.fromtimestamp(now, tz=timezone.utc), body.decode())

    def _count(self, outcome: str) -> None:
        if self.on_attempt is not None:
            with contextlib.suppress(Exception):
                self.on_attempt(outcome)

    @staticmethod
    def _public(raw: dict[str, Any]) -> WebhookDelivery:
        return WebhookDelivery(
            url=show_url(raw["url"]),
            state=raw["state"],
            webhook_id=raw["webhook_id"],
            attempts=raw.get("attempts", 0),
            last_status=raw.get("last_status"),
            last_error=raw.get("last_error"),
            delivered_at=raw.get("delivered_at"),
            next_attempt_at=raw.get("next_attempt_at"),
            events=raw.get("events", []),
        )
