"""Fakes of the Modal objects the job backend uses, following modal 1.x semantics.

- :class:`FakeCall` is a ``modal.FunctionCall``: ``get.aio(timeout=)`` raises the builtin TimeoutError while
  pending, ``modal.exception.OutputExpiredError`` once expired (or for an id never spawned), and re-raises
  the remote exception of a failed input; ``cancel.aio()`` cancels the input (the container's asyncio task
  is cancelled, as Modal does for async inputs).
- :class:`FakeModal` spawns calls; with a worker it runs each input as a task (the "GPU container").
- :class:`FakeDict` is a ``modal.Dict`` (``get``/``put(skip_if_exists=)`` with ``.aio``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import modal.exception

from gpubridge.models import JobRequest


class _Aio:
    """A Modal method: awaitable through ``.aio(...)``."""

    def __init__(self, fn: Callable[..., Awaitable[Any]]):
        self.aio = fn


class FakeCall:
    def __init__(self, object_id: str, *, expired: bool = False):
        self.object_id = object_id
        self.expired = expired
        self.outcome: Any = None
        self.exc: BaseException | None = None
        self.done = asyncio.Event()
        self.cancels = 0
        self.task: asyncio.Task[Any] | None = None
        self.get = _Aio(self._get)
        self.cancel = _Aio(self._cancel)

    def finish(self, outcome: Any = None, *, exc: BaseException | None = None) -> None:
        self.outcome, self.exc = outcome, exc
        self.done.set()

    async def _get(self, timeout: float | None = None) -> Any:
        if self.expired:
            raise modal.exception.OutputExpiredError()
        if not self.done.is_set() and timeout:
            try:
                await asyncio.wait_for(self.done.wait(), timeout)
            except TimeoutError:
                pass
        if not self.done.is_set():
            raise TimeoutError()  # the builtin, as modal 1.x raises for a pending call
        if self.exc is not None:
            raise self.exc
        return self.outcome

    async def _cancel(self, terminate_containers: bool = False) -> None:
        self.cancels += 1
        if self.task is not None and not self.task.done():
            self.task.cancel()
        elif not self.done.is_set():
            self.finish(exc=modal.exception.RemoteError("Function call was cancelled"))


class FakeModal:
    """``spawn`` and ``from_id`` for the Modal backend. With ``worker``, each input runs ``worker.run``."""

    def __init__(self, worker: Any = None):
        self.worker = worker
        self.calls: dict[str, FakeCall] = {}
        self.spawned: list[tuple[dict[str, Any], float]] = []
        self.spawn_error: BaseException | None = None
        self._ids = itertools.count(1)

    async def spawn(self, payload: dict[str, Any], submitted_at: float) -> FakeCall:
        if self.spawn_error is not None:
            raise self.spawn_error
        call = FakeCall(f"fc-{next(self._ids):06d}")
        self.calls[call.object_id] = call
        self.spawned.append((payload, submitted_at))
        if self.worker is not None:
            call.task = asyncio.create_task(self._run(call, payload, submitted_at))
        return call

    async def _run(self, call: FakeCall, payload: dict[str, Any], submitted_at: float) -> None:
        try:
            out = await self.worker.run(
                call.object_id, JobRequest.model_validate(payload), submitted_at=submitted_at
            )
        except asyncio.CancelledError:
            call.finish(exc=modal.exception.RemoteError("Function call was cancelled"))
            raise
        except BaseException as exc:
            call.finish(exc=exc)
            raise
        call.finish(out)

    def from_id(self, job_id: str) -> FakeCall:
        return self.calls.get(job_id) or FakeCall(job_id, expired=True)


class FakeDict:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.get = _Aio(self._get)
        self.put = _Aio(self._put)
        self.keys = _Aio(self._keys)  # modal.Dict.keys.aio(): an async iterator, unordered
        self.pop = _Aio(self._pop)

    async def _get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    async def _pop(self, key: str, default: Any = None) -> Any:
        return self.data.pop(key, default)

    async def _keys(self) -> Any:
        for key in list(self.data):
            yield key

    async def _put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        if skip_if_exists and key in self.data:
            return False
        self.data[key] = value
        return True
