"""The job API's backend interface: what runs the jobs the HTTP layer accepts.

Each deployment brings one: the Modal app (``modal_app.backends``), the in-process ComfyUI backend, and the
gateway's backend over any :class:`~gpubridge.runner.WorkflowRunner`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from typing import Any

from gpubridge.errors import Conflict, InvalidRequest, JobNotFound
from gpubridge.models import HealthReport, JobRequest

from .schema import JobEnvelope, idempotency_key, record_key
from .store import JobStore

__all__ = ["JobBackend"]


class JobBackend(abc.ABC):
    """Runs the API's jobs. Methods raise :mod:`gpubridge.errors` types; the API maps them to HTTP."""

    provider: str = "modal"
    store: JobStore

    @abc.abstractmethod
    async def submit(self, request: JobRequest) -> JobEnvelope:
        """Accept a job and return its envelope (state ``queued`` or later)."""

    #: How long a submit may hold an idempotency key's claim before others treat the claimer as dead.
    claim_ttl: float = 60.0

    async def submit_idempotent(
        self, request: JobRequest, key: str | None, *, scope: str = "", fingerprint: str | None = None
    ) -> tuple[JobEnvelope, bool]:
        """Submit once per ``key`` (the request's ``Idempotency-Key`` header) and caller ``scope`` (a hash
        of its token): a client that lost the answer to a submit sends it again and gets the same job
        back. ``fingerprint`` (a hash of the body) tells a retry from a different request reusing the key:
        that is an InvalidRequest (422). Once the key's job is gone (its record expired), the key is free
        and a new job is created and runs. Returns (envelope, created).

        The key is claimed in the store (``put_new``, atomic across processes and replicas) *before* the
        job is submitted, so the same key sent to two replicas at once runs one job: the loser waits for
        the winner's job id. A claim whose submit failed is released; one left by a process that died
        mid-submit is taken over after ``claim_ttl`` seconds."""
        if not key:
            return await self.submit(request), True
        where = idempotency_key(key, scope)
        locks = self.__dict__.setdefault("_idem_locks", {})
        lock = locks.setdefault(where, asyncio.Lock())
        try:
            async with lock:  # one creator per key in this process; put_new settles races across processes
                return await self._submit_keyed(request, where, fingerprint)
        finally:
            if not lock.locked():
                locks.pop(where, None)

    async def _submit_keyed(
        self, request: JobRequest, where: str, fingerprint: str | None
    ) -> tuple[JobEnvelope, bool]:
        claim = {"pending": True, "fingerprint": fingerprint, "claimed_at": time.time(), "version": 0}
        pace = 0.02
        while True:
            known = await self.store.get(where)
            if known is None:
                if not await self.store.put_new(where, claim):
                    continue  # another process claimed it first: read its claim
                return await self._submit_claimed(request, where, fingerprint), True
            self._check_fingerprint(known, fingerprint)
            if known.get("pending"):
                if time.time() - float(known.get("claimed_at") or 0) > self.claim_ttl:
                    await self.store.delete(where)  # its claimer died mid-submit; take the key over
                    continue
                started = time.monotonic()
                await self.store.wait_changed(where, 0, 1.0)
                if time.monotonic() - started < 0.01:  # a store that cannot notify: pace the polls
                    await asyncio.sleep(pace)
                    pace = min(pace * 2, 0.5)
                continue
            existing = await self._idempotent_job(known, fingerprint)
            if existing is not None:
                return existing, False
            # The key's job expired: the key now names a new one.
            await self.store.put(where, claim)
            return await self._submit_claimed(request, where, fingerprint), True

    async def _submit_claimed(self, request: JobRequest, where: str, fingerprint: str | None) -> JobEnvelope:
        try:
            env = await self.submit(request)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.delete(where)  # nothing was created: free the key for a retry
            raise
        await self.store.put(where, {"job_id": env.job_id, "fingerprint": fingerprint, "version": 1})
        self._keyed(env.job_id, where)
        return env

    def _check_fingerprint(self, known: dict[str, Any], fingerprint: str | None) -> None:
        if fingerprint is not None and known.get("fingerprint") not in (None, fingerprint):
            raise InvalidRequest(
                "This Idempotency-Key was used with a different request body; send a new key for a new "
                "request",
                provider=self.provider,
            )

    async def _idempotent_job(self, known: dict[str, Any], fingerprint: str | None) -> JobEnvelope | None:
        """The job an idempotency entry names; None once the job is gone. Raises InvalidRequest when the
        entry was made for another body."""
        self._check_fingerprint(known, fingerprint)
        try:
            return await self.get(str(known["job_id"]))
        except JobNotFound:  # ResultExpired included: the job's records are gone
            return None

    def _keyed(self, job_id: str, where: str) -> None:
        """Note that the idempotency entry ``where`` names ``job_id`` (to prune them together)."""

    @abc.abstractmethod
    async def get(self, job_id: str, *, wait: float = 0.0, after: int | None = None) -> JobEnvelope:
        """The job's envelope. With ``wait``, answer once the job ended, or (with ``after``) its version
        passed ``after``, or ``wait`` seconds passed. Raises JobNotFound / ResultExpired."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> JobEnvelope:
        """Cancel the job (dequeue or interrupt); idempotent."""

    async def forget(self, job_id: str) -> JobEnvelope:
        """``DELETE``: cancel the job if it has not ended, then forget it (record, result, idempotency
        entry), so that it answers 404 from then on. Returns the job's last envelope. A job whose cancel is
        not confirmed yet is kept (Conflict, 409): forgetting it would lose the only handle on a job that
        may still run."""
        env = await self.cancel(job_id)
        if not env.terminal:
            raise Conflict(
                f"Job {job_id} is still {env.status.state.value}: its cancel is under way; DELETE again once "
                "it has ended",
                provider=self.provider,
            )
        await self._forget(job_id)
        return env

    async def _forget(self, job_id: str) -> None:
        """Drop an ended job's records (the store's ``job:`` record by default)."""
        await self.store.delete(record_key(job_id))

    @abc.abstractmethod
    async def health(self, *, deep: bool = False) -> HealthReport: ...

    async def capabilities(self) -> dict[str, Any] | None:
        """ComfyUI's ``/object_info`` for what this backend runs (node classes, model files), or None when
        it cannot say (``GET /v1/capabilities``)."""
        return None

    async def start(self) -> None:
        """Called once when the server starts (adopt jobs a previous run left, start background work)."""

    async def aclose(self) -> None:
        """Release resources."""
