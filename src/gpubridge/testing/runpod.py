"""A RunPod serverless endpoint double: RunPod's documented v2 queue API on loopback.

It serves ``/v2/{endpoint_id}/run``, ``/runsync``, ``/status/{id}``, ``/stream/{id}``, ``/cancel/{id}``,
``/retry/{id}``, ``/health`` and ``/purge-queue`` with the documented shapes (``delayTime`` and
``executionTime`` in ms, ``workerId``, ``error`` strings, 404 for unknown or expired jobs), so both
gpubridge's RunPod provider and ``runpod.Endpoint`` (after ``runpod.endpoint_url_base = double.base_url``)
can talk to it. Jobs wait in a FIFO queue and ``workers`` simulated workers run them through the handler
you give it, wrapped exactly as the runpod SDK wraps it (``runpod.serverless.modules.rp_job.run_job``:
returned ``error``/``refresh_worker`` keys, exceptions as a JSON ``error`` string). Async handlers run
on the double's loop, sync ones in a thread. ``runpod.serverless.progress_update(job, ...)`` calls made by
the handler reach the job's ``output`` while it is IN_PROGRESS, as they do at RunPod.

Knobs (attributes; change them at any time, from any thread):

- ``workers``: how many workers take jobs; ``0`` leaves every job IN_QUEUE (the stuck-queue failure).
- ``cold_start_s``: a worker's boot time before its first job (and after a refresh); it shows up in
  ``delayTime``. ``hold``: workers mark a job IN_PROGRESS, then wait for :meth:`release` before running it.
- ``crash_next`` (a count) / ``crash_rate`` (a probability): the worker dies on the job, which ends FAILED
  with a worker error in the SDK's JSON format (``error_type`` ``WorkerCrashed``), and the worker reboots.
- ``throttle``: the next N requests get HTTP 429 (``throttle_retry_after`` sets a ``Retry-After`` header;
  ``throttle_routes`` limits it to some routes). ``http_errors``/``http_error_status``: the next N
  requests get a 5xx. ``lose_run_answers``: the next N ``/run`` requests are accepted (the job is queued
  and runs) but answered with ``http_error_status``, as a load balancer's 502 after the request arrived: the
  ambiguous submit a client must not resend.
- ``status_sync``: serve ``/status-sync/{id}?wait=MS`` (a long-poll of ``/status``: it answers when the job
  is terminal or after ``wait``, at most 300 s); without it that route is a 404, as on an endpoint that lacks it.
- ``retention_s`` (``/run``, default 30 min) and ``sync_retention_s`` (``/runsync``, 1 min): a finished
  job's result is dropped that long after it finished and ``/status`` answers 404. :meth:`expire` drops
  results now. ``policy.ttl`` is honoured the same way; ``policy.executionTimeout`` ends a job TIMED_OUT.
- ``unhealthy_workers``/``throttled_workers``: reported by ``/health``.
- ``rate_limits``: RunPod's documented per-endpoint limits, enforced when given (``True`` for
  :data:`RUNPOD_RATE_LIMITS`: ``/run`` 1,000, ``/status`` 2,000 and ``/cancel`` 100 requests per 10 s, or
  a ``{route: (requests, seconds)}`` map, e.g. scaled down for a fast test): a sliding window per route,
  HTTP 429 beyond it (counted in ``counters["rate_limited"]`` and ``counters["rate_limited_<route>"]``).
- ``lose_worker_next`` (a count): the worker running a job dies mid-job and RunPod puts the job back in
  the queue (``IN_PROGRESS`` -> ``IN_QUEUE``, ``retries`` + 1); another worker runs it from the start.
- ``api_key``: when set, requests need ``Authorization: Bearer <key>`` (or the raw key), else 401.

Hooks for tests: ``counters`` (requests per route, throttled, crashes, refreshes, cold_starts, ...),
``handler_runs`` / ``completions`` (handler starts / COMPLETED jobs per ``input.gpubridge.request_id``, or
job id: a request that ran twice shows as 2),
:meth:`wait_for` (await a predicate on the double, re-checked at every change), :meth:`wait_status`,
:meth:`snapshot`. Use it as ``async with RunPodEndpointDouble(handler) as rp:`` (on the running loop) or
``with RunPodEndpointDouble(handler) as rp:`` (its own loop in a background thread).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import os
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..server.runpod_shapes import quiet_runpod_sdk_logs

__all__ = ["RunPodEndpointDouble", "WorkerCrashed", "TERMINAL", "RUNPOD_RATE_LIMITS"]

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
MB = 1024 * 1024
RUNPOD_RATE_LIMITS: dict[str, tuple[int, float]] = {
    "run": (1000, 10.0), "runsync": (2000, 10.0), "status": (2000, 10.0), "stream": (2000, 10.0),
    "cancel": (100, 10.0), "purge-queue": (2, 10.0),
}
"""RunPod's documented per-endpoint request limits: route -> (requests, per seconds)."""


class WorkerCrashed(Exception):
    """The error type a simulated worker crash reports."""


@dataclass
class _Job:
    id: str
    input: Any
    policy: dict[str, Any]
    sync: bool
    submitted: float
    status: str = "IN_QUEUE"
    started: float | None = None
    finished: float | None = None
    delay_ms: int | None = None
    exec_ms: int | None = None
    worker_id: str | None = None
    output: Any = None
    has_output: bool = False
    error: str | None = None
    progress: Any = None
    reserved: bool = False
    task: asyncio.Task[Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stream: list[dict[str, Any]] = field(default_factory=list)
    stream_sent: int = 0
    retries: int = 0

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.delay_ms is not None:
            out["delayTime"] = self.delay_ms
        if self.status in TERMINAL and self.exec_ms is not None:
            out["executionTime"] = self.exec_ms
        if self.worker_id is not None and self.status != "IN_QUEUE":
            out["workerId"] = self.worker_id
        if self.status == "IN_PROGRESS" and self.progress is not None:
            out["output"] = self.progress
        if self.status in TERMINAL:
            if self.has_output:
                out["output"] = self.output
            if self.error is not None:
                out["error"] = self.error
        if self.retries:
            out["retries"] = self.retries
        return out


@dataclass
class _Worker:
    index: int
    id: str
    state: str = "idle"  # idle, initializing, running
    cold: bool = True
    task: asyncio.Task[None] | None = None


# progress_update routing: runpod.serverless.progress_update is replaced while a double runs, and calls
# for jobs a double owns are delivered to it (others go to the SDK's own function).
_LIVE: dict[str, tuple[RunPodEndpointDouble, asyncio.AbstractEventLoop]] = {}
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL_PROGRESS: Callable[..., Any] | None = None


def _routed_progress_update(job: dict[str, Any], progress: Any) -> None:
    owner = _LIVE.get(str(job.get("id"))) if isinstance(job, dict) else None
    if owner is None:
        if _ORIGINAL_PROGRESS is not None:
            _ORIGINAL_PROGRESS(job, progress)
        return
    double, loop = owner
    with contextlib.suppress(RuntimeError):  # loop closed
        loop.call_soon_threadsafe(double._on_progress, str(job["id"]), progress)


def _install_progress_route() -> None:
    global _PATCH_USERS, _ORIGINAL_PROGRESS
    with _PATCH_LOCK:
        _PATCH_USERS += 1
        if _PATCH_USERS > 1:
            return
        quiet_runpod_sdk_logs()  # the SDK's job runner logs each job's whole output at DEBUG
        try:
            import runpod.serverless as rs
            import runpod.serverless.modules.rp_progress as rpp
        except ImportError:
            return
        _ORIGINAL_PROGRESS = rpp.progress_update
        rs.progress_update = _routed_progress_update
        rpp.progress_update = _routed_progress_update


def _remove_progress_route() -> None:
    global _PATCH_USERS, _ORIGINAL_PROGRESS
    with _PATCH_LOCK:
        _PATCH_USERS -= 1
        if _PATCH_USERS > 0 or _ORIGINAL_PROGRESS is None:
            return
        import runpod.serverless as rs
        import runpod.serverless.modules.rp_progress as rpp

        rs.progress_update = _ORIGINAL_PROGRESS
        rpp.progress_update = _ORIGINAL_PROGRESS
        _ORIGINAL_PROGRESS = None


def _sdk_version() -> str:
    try:
        from runpod.version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - runpod missing
        return "unknown"


async def _run_job(handler: Callable[..., Any], job: dict[str, Any]) -> dict[str, Any]:
    """The runpod SDK's ``run_job`` (used when runpod is installed), or a faithful copy of it."""
    try:
        from runpod.serverless.modules.rp_job import run_job
    except ImportError:  # pragma: no cover - exercised only without runpod
        run_job = None
    if run_job is not None:
        return await run_job(handler, job)
    result: dict[str, Any] = {}
    try:
        out = handler(job)
        out = await out if inspect.isawaitable(out) else out
        if isinstance(out, dict):
            error = out.pop("error", None)
            refresh = out.pop("refresh_worker", None)
            result["output"] = out
            if error:
                result["error"] = error
            if refresh:
                result["stopPod"] = True
        else:
            result = {"output": out}
        if result.get("output") == {}:
            result.pop("output")
    except Exception as err:
        result = {"error": json.dumps({
            "error_type": str(type(err)), "error_message": str(err), "error_traceback": traceback.format_exc(),
            "hostname": os.environ.get("RUNPOD_POD_HOSTNAME", "unknown"),
            "worker_id": os.environ.get("RUNPOD_POD_ID", "unknown"), "runpod_version": _sdk_version(),
        })}
    return result


class RunPodEndpointDouble:
    """RunPod's v2 serverless API on 127.0.0.1, running jobs through ``handler``. See the module doc."""

    def __init__(
        self,
        handler: Callable[[dict[str, Any]], Any],
        *,
        endpoint_id: str = "gpubridge-double",
        api_key: str | None = None,
        workers: int = 1,
        cold_start_s: float = 0.0,
        crash_next: int = 0,
        crash_rate: float = 0.0,
        throttle: int = 0,
        throttle_retry_after: float | None = None,
        throttle_routes: Iterable[str] | None = None,
        http_errors: int = 0,
        http_error_status: int = 503,
        lose_run_answers: int = 0,
        status_sync: bool = False,
        retention_s: float = 1800.0,
        sync_retention_s: float = 60.0,
        hold: bool = False,
        unhealthy_workers: int = 0,
        throttled_workers: int = 0,
        rate_limits: bool | dict[str, tuple[int, float]] | None = None,
        lose_worker_next: int = 0,
        return_aggregate_stream: bool = False,
        run_payload_limit: int = 10 * MB,
        runsync_payload_limit: int = 20 * MB,
        default_execution_timeout_s: float = 600.0,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
    ):
        self.handler = handler
        self.endpoint_id = endpoint_id
        self.api_key = api_key
        self.cold_start_s = cold_start_s
        self.crash_next = crash_next
        self.crash_rate = crash_rate
        self.throttle = throttle
        self.throttle_retry_after = throttle_retry_after
        self.throttle_routes = set(throttle_routes) if throttle_routes else None
        self.http_errors = http_errors
        self.http_error_status = http_error_status
        self.lose_run_answers = lose_run_answers
        self.status_sync = status_sync
        self.retention_s = retention_s
        self.sync_retention_s = sync_retention_s
        self.unhealthy_workers = unhealthy_workers
        self.throttled_workers = throttled_workers
        self.rate_limits: dict[str, tuple[int, float]] | None = (
            dict(RUNPOD_RATE_LIMITS) if rate_limits is True else (dict(rate_limits) if rate_limits else None)
        )
        self.lose_worker_next = lose_worker_next
        self.handler_runs: collections.Counter[str] = collections.Counter()
        self.completions: collections.Counter[str] = collections.Counter()
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.return_aggregate_stream = return_aggregate_stream
        self.run_payload_limit = run_payload_limit
        self.runsync_payload_limit = runsync_payload_limit
        self.default_execution_timeout_s = default_execution_timeout_s
        self.host = host
        self.port = port
        self.counters: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request, in order."""
        self._target_workers = workers
        self._hold = hold
        self._rng = random.Random(seed)
        self._jobs: dict[str, _Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._workers: dict[int, _Worker] = {}
        self._worker_seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._released: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._waiters: list[tuple[Callable[[RunPodEndpointDouble], bool], asyncio.AbstractEventLoop,
                                  asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None
        self._started = False

    # ------------------------------------------------------------------------------------------- URLs

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to give ``GPUBRIDGE_RUNPOD_BASE_URL`` or ``runpod.endpoint_url_base``."""
        return f"{self.url}/v2"

    @property
    def endpoint_url(self) -> str:
        return f"{self.base_url}/{self.endpoint_id}"

    # ------------------------------------------------------------------------------------------ knobs

    @property
    def workers(self) -> int:
        return self._target_workers

    @workers.setter
    def workers(self, n: int) -> None:
        self._target_workers = max(0, int(n))
        self._call_in_loop(self._rescale)

    @property
    def hold(self) -> bool:
        return self._hold

    @hold.setter
    def hold(self, value: bool) -> None:
        self._hold = bool(value)
        if not value:
            self.release()

    def release(self) -> None:
        """Let held jobs run (see ``hold``); jobs taken later are held again while ``hold`` is set."""

        def go() -> None:
            if self._released is not None:
                self._released.set()
                self._released = asyncio.Event()

        self._call_in_loop(go)

    def expire(self, job_id: str | None = None) -> None:
        """Drop the result of one finished job (or of every finished job) now, as retention does."""

        def go() -> None:
            for jid, job in list(self._jobs.items()):
                if (job_id is None or jid == job_id) and job.status in TERMINAL:
                    self._drop(jid)
            self._notify()

        self._call_in_loop(go)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    # -------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> RunPodEndpointDouble:
        """Start serving on the running loop."""
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._released = asyncio.Event()
        app = web.Application(client_max_size=max(self.run_payload_limit, self.runsync_payload_limit) * 4)
        app.router.add_route("*", "/v2/{endpoint}/{op}", self._dispatch)
        app.router.add_route("*", "/v2/{endpoint}/{op}/{job_id}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        _install_progress_route()
        self._started = True
        self._rescale()
        return self

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        tasks = [w.task for w in self._workers.values() if w.task is not None]
        tasks += [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for jid in list(self._jobs):
            _LIVE.pop(jid, None)
        _remove_progress_route()
        if self._runner is not None:
            await self._runner.cleanup()
        for _, loop, fut in self._waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_cancel_future, fut)
        self._waiters.clear()

    async def __aenter__(self) -> RunPodEndpointDouble:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # thread mode

    def start_in_thread(self) -> RunPodEndpointDouble:
        """Serve from a background thread with its own event loop (for synchronous callers)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._thread_stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            await self._thread_stop.wait()
            await self.stop()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), name="runpod-double", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop_thread(self) -> None:
        if self._thread is None:
            return
        loop, stop = self._loop, self._thread_stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(30)
        self._thread = None

    def call(self, coro: Any, timeout: float | None = 30.0) -> Any:
        """Thread mode: run a coroutine on the double's loop (e.g. ``rp.call(rp.wait_status(id))``)."""
        assert self._loop is not None and self._thread is not None, "not running in a thread"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> RunPodEndpointDouble:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    # ------------------------------------------------------------------------------------------ hooks

    def _notify(self) -> None:
        """Called on the double's loop after every change: wake workers and test waiters."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()
        still = []
        for pred, loop, fut in self._waiters:
            if fut.done():
                continue
            try:
                ok = pred(self)
            except Exception as exc:  # report a broken predicate to its waiter
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_exception, fut, exc)
                continue
            if ok:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_result, fut)
            else:
                still.append((pred, loop, fut))
        self._waiters = still

    async def wait_for(self, predicate: Callable[[RunPodEndpointDouble], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate(double)`` holds; it is checked now and after every change in the double.
        Works from any loop or thread's loop. Raises TimeoutError after ``timeout`` (a safety net)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def register() -> None:
            try:
                ok = predicate(self)
            except Exception as exc:
                loop.call_soon_threadsafe(_set_exception, fut, exc)
                return
            if ok:
                loop.call_soon_threadsafe(_set_result, fut)
            else:
                self._waiters.append((predicate, loop, fut))

        if self._loop is loop:
            register()
        else:
            assert self._loop is not None, "the double is not running"
            self._loop.call_soon_threadsafe(register)
        await asyncio.wait_for(fut, timeout)

    async def wait_status(self, job_id: str, *statuses: str, timeout: float = 10.0) -> str:
        """Wait until the job is in one of ``statuses`` (any terminal status if none given)."""
        wanted = set(statuses) or set(TERMINAL)

        def check(d: RunPodEndpointDouble) -> bool:
            job = d._jobs.get(job_id)
            return job is not None and job.status in wanted

        await self.wait_for(check, timeout)
        return self._jobs[job_id].status

    def status_of(self, job_id: str) -> str | None:
        job = self._jobs.get(job_id)
        return job.status if job else None

    def snapshot(self, job_id: str) -> dict[str, Any] | None:
        """The job's /status body (without expiring it), or None."""
        job = self._jobs.get(job_id)
        return job.body() if job else None

    @property
    def job_ids(self) -> list[str]:
        return list(self._jobs)

    @property
    def in_queue(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status == "IN_QUEUE")

    @property
    def in_progress(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status == "IN_PROGRESS")

    def last_input(self) -> Any:
        """The ``input`` of the most recently submitted job."""
        return next(reversed(self._jobs.values())).input if self._jobs else None

    # -------------------------------------------------------------------------------------- HTTP API

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        finally:
            self._notify()  # counters are part of what wait_for predicates may look at

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = request.match_info["op"]
        job_id = request.match_info.get("job_id")
        self.counters[op] += 1
        self.requests.append((request.method, request.path))
        self._notify()
        if self.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if auth not in (f"Bearer {self.api_key}", self.api_key):
                self.counters["unauthorized"] += 1
                return _json({"error": "Unauthorized"}, 401)
        limited = self._over_limit(op)
        if limited is not None:
            self.counters["throttled"] += 1
            self.counters["rate_limited"] += 1
            self.counters[f"rate_limited_{op}"] += 1
            return _json({"error": "Too many requests"}, 429, {"Retry-After": f"{limited:.3f}"})
        if self.throttle > 0 and (self.throttle_routes is None or op in self.throttle_routes):
            self.throttle -= 1
            self.counters["throttled"] += 1
            headers = {}
            if self.throttle_retry_after is not None:
                headers["Retry-After"] = f"{self.throttle_retry_after:g}"
            return _json({"error": "Too many requests"}, 429, headers)
        if self.http_errors > 0:
            self.http_errors -= 1
            self.counters["http_errors"] += 1
            return web.Response(status=self.http_error_status, text="upstream error")
        if request.match_info["endpoint"] != self.endpoint_id:
            return _json({"error": "endpoint not found"}, 404)
        routes: dict[tuple[str, bool], Callable[..., Any]] = {
            ("run", False): self._run,
            ("runsync", False): self._runsync,
            ("status", True): self._status,
            ("stream", True): self._stream,
            **({("status-sync", True): self._status_sync} if self.status_sync else {}),
            ("cancel", True): self._cancel,
            ("retry", True): self._retry,
            ("health", False): self._health,
            ("purge-queue", False): self._purge,
        }
        fn = routes.get((op, job_id is not None))
        if fn is None:
            return _json({"error": f"no route {request.method} {request.path}"}, 404)
        allowed = {"run": ("POST",), "runsync": ("POST",), "cancel": ("POST",), "retry": ("POST",),
                   "purge-queue": ("POST",), "health": ("GET",), "status": ("GET", "POST"),
                   "status-sync": ("GET", "POST"),
                   "stream": ("GET", "POST")}[op]
        if request.method not in allowed:
            return _json({"error": "method not allowed"}, 405)
        return await (fn(request, job_id) if job_id is not None else fn(request))

    def _over_limit(self, op: str) -> float | None:
        """RunPod's per-route limit (a sliding window): None if this request is within it, else the
        seconds until the window has room again."""
        limits = self.rate_limits
        if not limits or op not in limits:
            return None
        count, per = limits[op]
        now = time.monotonic()
        window = self._windows[op]
        while window and window[0] <= now - per:
            window.popleft()
        if len(window) >= count:
            return max(0.0, window[0] + per - now)
        window.append(now)
        return None

    async def _read_job(self, request: web.Request, limit: int, sync: bool) -> _Job | web.Response:
        raw = await request.read()
        if len(raw) > limit:
            self.counters["too_large"] += 1
            return _json({"error": f"Request payload too large: {len(raw)} bytes (max {limit // MB} MB)"}, 413)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return _json({"error": "Invalid JSON body"}, 400)
        if not isinstance(body, dict) or "input" not in body:
            return _json({"error": "The request body needs an 'input' field"}, 400)
        policy = body.get("policy") if isinstance(body.get("policy"), dict) else {}
        suffix = uuid.uuid4()
        job = _Job(id=f"sync-{suffix}-e1" if sync else f"{suffix}-e1", input=body["input"], policy=policy,
                   sync=sync, submitted=time.monotonic())
        self._jobs[job.id] = job
        _LIVE[job.id] = (self, self._loop)  # type: ignore[assignment]
        self._queue.append(job.id)
        self.counters["submitted"] += 1
        self._notify()
        return job

    async def _run(self, request: web.Request) -> web.Response:
        job = await self._read_job(request, self.run_payload_limit, sync=False)
        if isinstance(job, web.Response):
            return job
        if self.lose_run_answers > 0:
            self.lose_run_answers -= 1
            self.counters["lost_run_answers"] += 1
            return web.Response(status=self.http_error_status, text="upstream error")
        return _json({"id": job.id, "status": job.status})

    async def _runsync(self, request: web.Request) -> web.Response:
        try:
            wait_ms = int(request.query.get("wait", "90000"))
        except ValueError:
            wait_ms = 90000
        wait_s = min(300.0, max(1.0, wait_ms / 1000))
        job = await self._read_job(request, self.runsync_payload_limit, sync=True)
        if isinstance(job, web.Response):
            return job
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), wait_s)
        live = self._lookup(job.id)
        if live is None:
            return _json({"error": "request does not exist"}, 404)
        return _json(live.body())

    async def _status_sync(self, request: web.Request, job_id: str) -> web.Response:
        try:
            wait_s = min(300.0, max(0.0, int(request.query.get("wait", "90000")) / 1000))
        except ValueError:
            wait_s = 90.0
        job = self._lookup(job_id)
        if job is None:
            return _json({"error": "request does not exist"}, 404)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), wait_s)
        live = self._lookup(job_id)
        if live is None:
            return _json({"error": "request does not exist"}, 404)
        return _json(live.body())

    def _lookup(self, job_id: str) -> _Job | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        now = time.monotonic()
        if job.status in TERMINAL and job.finished is not None:
            keep = self.sync_retention_s if job.sync else self.retention_s
            if now - job.finished >= keep:
                self._drop(job_id)
                return None
        ttl = job.policy.get("ttl")
        if isinstance(ttl, (int, float)) and job.status not in TERMINAL and now - job.submitted >= ttl / 1000:
            if job.task is not None:
                job.task.cancel()
            self._drop(job_id)
            return None
        return job

    def _drop(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        _LIVE.pop(job_id, None)
        if job is not None:
            self.counters["expired"] += 1
            with contextlib.suppress(ValueError):
                self._queue.remove(job_id)

    async def _status(self, request: web.Request, job_id: str) -> web.Response:
        job = self._lookup(job_id)
        if job is None:
            return _json({"error": "request does not exist"}, 404)
        return _json(job.body())

    async def _stream(self, request: web.Request, job_id: str) -> web.Response:
        job = self._lookup(job_id)
        if job is None:
            return _json({"error": "request does not exist"}, 404)
        chunks = job.stream[job.stream_sent:]
        job.stream_sent = len(job.stream)
        return _json({"status": job.status, "stream": chunks})

    async def _cancel(self, request: web.Request, job_id: str) -> web.Response:
        job = self._lookup(job_id)
        if job is None:
            return _json({"error": "request does not exist"}, 404)
        if job.status not in TERMINAL:
            self._end(job, "CANCELLED")
            if job.task is not None and not job.task.done():
                job.task.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(job_id)
            self.counters["cancelled"] += 1
            self._notify()
        return _json({"id": job.id, "status": job.status})

    async def _retry(self, request: web.Request, job_id: str) -> web.Response:
        job = self._lookup(job_id)
        if job is None:
            return _json({"error": "request does not exist"}, 404)
        if job.status not in ("FAILED", "TIMED_OUT"):
            return _json({"error": f"job is {job.status}; only FAILED or TIMED_OUT jobs can be retried"}, 400)
        job.status, job.error, job.output, job.has_output = "IN_QUEUE", None, None, False
        job.started = job.finished = job.delay_ms = job.exec_ms = None
        job.worker_id, job.progress, job.reserved, job.retries = None, None, False, job.retries + 1
        job.done = asyncio.Event()
        job.submitted = time.monotonic()
        self._queue.append(job.id)
        self.counters["retried"] += 1
        self._notify()
        return _json({"id": job.id, "status": job.status})

    async def _health(self, request: web.Request) -> web.Response:
        states = collections.Counter(w.state for w in self._workers.values())
        totals = collections.Counter(j.status for j in self._jobs.values())
        return _json({
            "jobs": {
                "completed": self.counters["completed"],
                "failed": self.counters["failed"],
                "inProgress": totals["IN_PROGRESS"],
                "inQueue": totals["IN_QUEUE"],
                "retried": self.counters["retried"],
            },
            "workers": {
                "idle": states["idle"],
                "initializing": states["initializing"],
                "ready": states["idle"],
                "running": states["running"],
                "throttled": self.throttled_workers,
                "unhealthy": self.unhealthy_workers,
            },
        })

    async def _purge(self, request: web.Request) -> web.Response:
        removed = 0
        for jid in list(self._queue):
            job = self._jobs.get(jid)
            if job is not None and job.status == "IN_QUEUE" and not job.reserved:
                self._queue.remove(jid)
                self._jobs.pop(jid, None)
                _LIVE.pop(jid, None)
                removed += 1
        self.counters["purged"] += removed
        self._notify()
        return _json({"removed": removed, "status": "completed"})

    # ---------------------------------------------------------------------------------------- workers

    def _rescale(self) -> None:
        if not self._started:
            return
        for index in range(self._target_workers):
            if index not in self._workers:
                self._worker_seq += 1
                worker = _Worker(index=index, id=f"double-worker-{self._worker_seq}")
                self._workers[index] = worker
                worker.task = asyncio.ensure_future(self._work(worker))
        self._notify()

    def _take(self, worker: _Worker) -> _Job | None:
        while self._queue:
            jid = self._queue.popleft()
            job = self._lookup(jid)
            if job is not None and job.status == "IN_QUEUE":
                job.reserved = True
                return job
        return None

    async def _work(self, worker: _Worker) -> None:
        try:
            while True:
                while True:
                    changed = self._changed
                    assert changed is not None
                    if worker.index >= self._target_workers:
                        return
                    job = self._take(worker)
                    if job is not None:
                        break
                    await changed.wait()
                await self._execute(worker, job)
        finally:
            if self._workers.get(worker.index) is worker:
                del self._workers[worker.index]
            if self._started:
                self._notify()

    async def _execute(self, worker: _Worker, job: _Job) -> None:
        if worker.cold:
            worker.state = "initializing"
            self.counters["cold_starts"] += 1
            self._notify()
            if self.cold_start_s > 0:
                await asyncio.sleep(self.cold_start_s)  # simulated boot time
            worker.cold = False
        if job.status != "IN_QUEUE":  # cancelled or purged while the worker booted
            worker.state = "idle"
            self._notify()
            return
        worker.state = "running"
        job.status = "IN_PROGRESS"
        job.started = time.monotonic()
        job.delay_ms = int(round((job.started - job.submitted) * 1000))
        job.worker_id = worker.id
        self._notify()
        try:
            if self._hold:
                assert self._released is not None
                released = asyncio.ensure_future(self._released.wait())
                ended = asyncio.ensure_future(job.done.wait())
                try:
                    await asyncio.wait({released, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    released.cancel()
                    ended.cancel()
                if job.status != "IN_PROGRESS":
                    return
            if self.lose_worker_next > 0:
                self.lose_worker_next -= 1
                self._lose_worker(worker, job)
                return
            if self.crash_next > 0 or (self.crash_rate > 0 and self._rng.random() < self.crash_rate):
                if self.crash_next > 0:
                    self.crash_next -= 1
                self._crash(worker, job)
                return
            await self._run_handler(worker, job)
        finally:
            worker.state = "idle"
            self._notify()

    def _lose_worker(self, worker: _Worker, job: _Job) -> None:
        """The worker died mid-job: RunPod puts the job back in the queue for another worker."""
        self.counters["workers_lost"] += 1
        worker.cold = True
        job.status, job.started, job.delay_ms, job.worker_id, job.progress = "IN_QUEUE", None, None, None, None
        job.reserved = False
        job.retries += 1
        self._queue.appendleft(job.id)
        self.counters["requeued"] += 1
        self._notify()

    def _count_run(self, job: _Job, counter: collections.Counter[str] | None = None) -> None:
        meta = job.input.get("gpubridge") if isinstance(job.input, dict) else None
        key = meta.get("request_id") if isinstance(meta, dict) and meta.get("request_id") else job.id
        (self.handler_runs if counter is None else counter)[str(key)] += 1

    def _crash(self, worker: _Worker, job: _Job) -> None:
        self.counters["crashes"] += 1
        worker.cold = True  # the worker restarts
        job.error = json.dumps({
            "error_type": str(WorkerCrashed),
            "error_message": "worker exited unexpectedly (exit code 137) while running the job",
            "error_traceback": "",
            "hostname": f"{worker.id}-host",
            "worker_id": worker.id,
            "runpod_version": _sdk_version(),
        })
        self._end(job, "FAILED")
        self.counters["failed"] += 1

    async def _run_handler(self, worker: _Worker, job: _Job) -> None:
        self._count_run(job)
        payload = {"id": job.id, "input": job.input}
        handler = self.handler
        if inspect.isasyncgenfunction(handler) or inspect.isgeneratorfunction(handler):
            coro = self._run_generator(job, payload)
        elif inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None)):
            coro = _run_job(handler, payload)
        else:
            async def threaded(j: dict[str, Any]) -> Any:
                return await asyncio.to_thread(handler, j)

            coro = _run_job(threaded, payload)
        task = asyncio.ensure_future(coro)
        job.task = task
        limit_ms = job.policy.get("executionTimeout")
        limit = limit_ms / 1000 if isinstance(limit_ms, (int, float)) else self.default_execution_timeout_s
        done, _ = await asyncio.wait({task}, timeout=limit)
        if job.status != "IN_PROGRESS":  # cancelled (or dropped) meanwhile
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            self._end(job, "TIMED_OUT")
            self.counters["timed_out"] += 1
            return
        try:
            result = task.result()
        except BaseException as exc:  # noqa: BLE001 - a handler that escaped run_job (BaseException)
            result = {"error": json.dumps({"error_type": str(type(exc)), "error_message": str(exc),
                                           "error_traceback": "", "hostname": "unknown",
                                           "worker_id": worker.id, "runpod_version": _sdk_version()})}
        if not isinstance(result, dict):
            result = {"output": result}
        if "output" in result:
            job.output, job.has_output = result["output"], True
        if result.get("stopPod"):
            worker.cold = True
            self.counters["refreshes"] += 1
        if result.get("error"):
            job.error = str(result["error"])
            self._end(job, "FAILED")
            self.counters["failed"] += 1
        else:
            self._end(job, "COMPLETED")
            self.counters["completed"] += 1
            self._count_run(job, self.completions)

    async def _run_generator(self, job: _Job, payload: dict[str, Any]) -> dict[str, Any]:
        handler = self.handler
        parts: list[Any] = []
        try:
            gen = handler(payload)
            if inspect.isasyncgen(gen):
                async for part in gen:
                    parts.append(part)
                    job.stream.append({"output": part})
            else:
                sentinel = object()
                while (part := await asyncio.to_thread(next, gen, sentinel)) is not sentinel:
                    parts.append(part)
                    job.stream.append({"output": part})
        except Exception as err:
            return {"error": f"handler: {err} \ntraceback: {traceback.format_exc()}"}
        return {"output": parts if self.return_aggregate_stream else []}

    def _end(self, job: _Job, status: str) -> None:
        job.status = status
        job.finished = time.monotonic()
        if job.started is not None:
            job.exec_ms = int(round((job.finished - job.started) * 1000))
        job.done.set()
        self._notify()

    def _on_progress(self, job_id: str, progress: Any) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.status == "IN_PROGRESS":
            job.progress = progress
            self.counters["progress_updates"] += 1
            self._notify()

    def __repr__(self) -> str:
        return f"<RunPodEndpointDouble {self.endpoint_url} workers={self._target_workers}>"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _cancel_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.cancel()
