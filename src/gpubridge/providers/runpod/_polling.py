"""The polling policy: intervals while nothing changes, and what the poller knows about one job."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

from ...errors import GpuBridgeError, ProviderUnavailable, RateLimited
from ...models import JobResult, JobState, JobStatus
from ...runner import EventStream



def poll_delays(initial: float, maximum: float, backoff: float):
    """The polling intervals while nothing changes: initial, initial*backoff, ... capped at maximum."""
    delay = min(initial, maximum)
    while True:
        yield delay
        delay = min(maximum, delay * backoff)


def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections: they say nothing about the job, so they never end it."""
    return isinstance(exc, RateLimited) or (isinstance(exc, ProviderUnavailable) and exc.retryable)


def transient_delay(failures: int, retry_after: float | None, initial: float, cap: float) -> float:
    """How long to wait before asking again after ``failures`` transient errors in a row: exponential from
    ``initial`` up to ``cap``, with jitter, and never less than the server's Retry-After."""
    base = min(cap, initial * (2 ** max(0, failures - 1)))
    delay = base * (0.5 + random.random() / 2)
    return max(delay, retry_after or 0.0)


class _Outcome:
    """What the poller learned about one job."""

    __slots__ = ("job_id", "ours", "stream", "done", "body", "error", "state", "seen_running", "deadline",
                 "submitted_at", "finished_at", "task", "wake", "progress", "request_id", "tags", "polls",
                 "last_status", "workflow_key", "expected_done", "final", "result")

    def __init__(self, job_id: str, *, ours: bool, deadline: float | None, submitted_at: float | None,
                 request_id: str | None = None, tags: Mapping[str, str] | None = None):
        self.job_id = job_id
        self.ours = ours
        self.stream = EventStream()
        self.done = asyncio.Event()
        self.body: dict[str, Any] | None = None
        self.error: GpuBridgeError | None = None
        self.state = JobState.QUEUED
        self.seen_running = False
        self.deadline = deadline  # loop time
        self.submitted_at = submitted_at
        self.finished_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.progress: tuple[Any, ...] | None = None
        self.request_id = request_id
        self.tags = dict(tags or {})
        self.polls = 0
        self.last_status: JobStatus | None = None
        self.workflow_key: str | None = None
        self.final = False  # the end is RunPod's own word (not a deadline with an unconfirmed cancel)
        self.result: JobResult | None = None
        self.expected_done: float | None = None  # loop time, once running and the workflow's length is known

