"""The job API's backend interface: what runs the jobs the HTTP layer accepts.

Each deployment brings one: the Modal app (``modal_app.backends``), the in-process ComfyUI backend, and the
gateway's backend over any :class:`~gpubridge.runner.WorkflowRunner`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import Any

from gpubridge.errors import Conflict, GpuBridgeError, InvalidRequest, JobNotFound
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

    async def submit_idempotent(
        self, request: JobRequest, key: str | None, *, scope: str = "", fingerprint: str | None = None
    ) -> tuple[JobEnvelope, bool]:
        """Submit once per ``key`` (the request's ``Idempotency-Key`` header) and caller ``scope`` (a hash
        of its token): a client that lost the answer to a submit sends it again and gets the same job
        back. ``fingerprint`` (a hash of the body) tells a retry from a different request reusing the key:
        that is an InvalidRequest (422). Once the key's job is gone (its record expired), the key is free
        and a new job is created and runs. Returns (envelope, created)."""
        if not key:
            return await self.submit(request), True
        where = idempotency_key(key, scope)
        locks = self.__dict__.setdefault("_idem_locks", {})
        lock = locks.setdefault(where, asyncio.Lock())
        try:
            async with lock:  # one creator per key in this process; put_new settles races across processes
                known = await self.store.get(where)
                if known is not None:
                    existing = await self._idempotent_job(known, fingerprint)
                    if existing is not None:
                        return existing, False
                env = await self.submit(request)
                entry = {"job_id": env.job_id, "fingerprint": fingerprint}
                if known is not None:  # the key's job expired: the key now names the new one
                    await self.store.put(where, entry)
                    self._keyed(env.job_id, where)
                    return env, True
                if await self.store.put_new(where, entry):
                    self._keyed(env.job_id, where)
                    return env, True
                with contextlib.suppress(GpuBridgeError):
                    await self.cancel(env.job_id)  # another API container created it first
                existing = await self._idempotent_job(await self.store.get(where) or entry, fingerprint)
                return (existing, False) if existing is not None else (env, True)
        finally:
            if not lock.locked():
                locks.pop(where, None)

    async def _idempotent_job(self, known: dict[str, Any], fingerprint: str | None) -> JobEnvelope | None:
        """The job an idempotency entry names; None once the job is gone. Raises InvalidRequest when the
        entry was made for another body."""
        if fingerprint is not None and known.get("fingerprint") not in (None, fingerprint):
            raise InvalidRequest(
                "This Idempotency-Key was used with a different request body; send a new key for a new "
                "request",
                provider=self.provider,
            )
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

    async def aclose(self) -> None:
        """Release resources."""
