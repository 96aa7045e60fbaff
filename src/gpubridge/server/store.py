"""Where the job API keeps its records: a key-value store of JSON-safe dicts with change notification.

A backend writes one record per job (``job:{id}``, a :class:`~gpubridge.server.schema.JobRecord`) and one
entry per idempotency key. :class:`MemoryStore` keeps them in a dict; deployments bring their own (a
``modal.Dict`` on Modal).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from collections.abc import Mapping, Sequence
from typing import Any

from gpubridge.models import JobState

from .schema import JobRecord, record_key

__all__ = ["JobStore", "MemoryStore", "ChangeSignal", "is_terminal_value"]



class JobStore(abc.ABC):
    """Where job records live. Values are JSON-safe dicts."""

    @abc.abstractmethod
    async def get(self, key: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def put(self, key: str, value: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def put_new(self, key: str, value: dict[str, Any]) -> bool:
        """Store ``value`` unless ``key`` exists; return whether it was stored."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error when it is absent)."""

    async def keys(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix`` (stores that cannot list raise NotImplementedError)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its keys")

    async def wait_changed(self, key: str, version: int, timeout: float) -> None:
        """Return when the record at ``key`` passes ``version``, or after ``timeout`` seconds.

        Stores that cannot notify return at once; callers then pace themselves.
        """

    async def aclose(self) -> None:
        """Release connections (the default store holds none)."""

    async def apply(self, puts: Mapping[str, dict[str, Any]], deletes: Sequence[str] = ()) -> None:
        """Write ``puts`` and remove ``deletes``; stores that can do it in one transaction (one round trip)
        override this, so a job's end (record, result, lease) is written all at once."""
        for key, value in puts.items():
            await self.put(key, value)
        for key in deletes:
            await self.delete(key)

    async def record(self, job_id: str) -> JobRecord | None:
        raw = await self.get(record_key(job_id))
        return JobRecord.model_validate(raw) if raw is not None else None

    async def save(self, record: JobRecord) -> None:
        await self.put(record_key(record.job_id), record.dump())


class MemoryStore(JobStore):
    """Records in a dict, with change notification (the in-process backend)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value
        cond = self._cond()
        async with cond:
            cond.notify_all()

    async def put_new(self, key: str, value: dict[str, Any]) -> bool:
        if key in self.data:
            return False
        await self.put(key, value)
        return True

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data if k.startswith(prefix)]

    async def wait_changed(self, key: str, version: int, timeout: float) -> None:
        def passed() -> bool:
            value = self.data.get(key)
            return value is None or value.get("version", 0) > version or is_terminal_value(value)

        cond = self._cond()
        async with cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cond.wait_for(passed), timeout)


def is_terminal_value(value: Mapping[str, Any]) -> bool:
    try:
        return JobState(value.get("state")).is_terminal
    except ValueError:
        return False


class ChangeSignal:
    """Wakes a store's :meth:`JobStore.wait_changed` callers on every change the store learns of (its own
    writes, or a notice from another process). A waiter re-reads the value after each wake and at least every
    ``poll_interval`` seconds, so a change no notice reports is still seen within that interval; the counter
    means a change between the read and the wait is never missed."""

    def __init__(self) -> None:
        self.count = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def fire(self) -> None:
        self.count += 1
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def wait_changed(self, get: Callable[[str], Awaitable[dict[str, Any] | None]], key: str, version: int,
                           timeout: float, poll_interval: float) -> None:
        end = time.monotonic() + timeout
        cond = self._condition()
        while True:
            seen = self.count
            value = await get(key)
            if value is None or value.get("version", 0) > version or is_terminal_value(value):
                return
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            async with cond:
                if self.count == seen:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cond.wait(), min(remaining, poll_interval))
