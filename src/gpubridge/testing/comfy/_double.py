"""The ComfyUI test double: a real aiohttp server on loopback that behaves like ComfyUI 0.3.64.

See :class:`ComfyDouble`. The protocol details it reproduces are the ones recorded from a real server
in ``tests/fixtures/comfyui-contract`` (README.md there); ``tests/testing/test_comfy_contract*.py``
replays those recordings against the double.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import os
import random
import shutil
import string
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ...comfy.validate import PromptValidator, split_annotated_name
from . import _media
from ._faults import Faults
from ._nodes import FILE_KEYED, NEVER_CACHED, Ctx, format_value, run_node, sampler_steps
from ._objectinfo import build_object_info, normalize_model_files, with_input_files

__all__ = ["ComfyDouble", "DoubleEvent", "Job", "Stats", "ThreadedComfyDouble"]

MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
FEATURE_FLAGS = {"supports_preview_metadata": True, "max_upload_size": 104857600}
TERMINAL_STATES = frozenset({"success", "error", "interrupted", "deleted", "lost"})
CRASH_EXIT_STATUS = 70

OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you "
    "might have accidentally set the batch_size to a large number."
)

BINARY_PREVIEW_IMAGE = 1
BINARY_TEXT = 3
BINARY_PREVIEW_IMAGE_WITH_METADATA = 4


def _now_ms() -> int:
    return int(time.time() * 1000)


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _ws_frame(payload: str | bytes) -> bytes:
    """One unmasked, unfragmented server frame (RFC 6455): text for str, binary for bytes."""
    if isinstance(payload, str):
        data, first = payload.encode(), 0x81
    else:
        data, first = payload, 0x82
    size = len(data)
    if size < 126:
        header = bytes((first, size))
    elif size < 65536:
        header = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + size.to_bytes(8, "big")
    return header + data


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


# ------------------------------------------------------------------------------------------ records


@dataclass
class Stats:
    """Counters for tests (cumulative over the double's life, restarts included)."""

    prompts_received: int = 0  # POST /prompt requests, whatever the outcome
    prompts_arrived: int = 0  # POST /prompt bodies read (counted before hold_prompts, unlike prompts_received)
    prompts_accepted: int = 0
    prompts_rejected: int = 0  # 400 and 500 answers
    interrupts: int = 0  # POST /interrupt requests
    deletes: int = 0  # pending jobs removed by POST /queue {"delete": [...]}
    queue_clears: int = 0  # POST /queue {"clear": true}
    uploads: int = 0  # successful POST /upload/image
    frees: int = 0  # POST /free
    history_posts: int = 0  # POST /history
    views: int = 0  # GET /view answered 200
    queue_reads: int = 0  # GET /queue answered
    ws_connections: int = 0
    ws_dropped: int = 0  # sockets aborted by the drop_ws fault or drop_sockets()
    jobs_started: int = 0
    jobs_finished: int = 0
    frames_sent: int = 0


@dataclass
class Job:
    """One accepted prompt as the double tracks it (``comfy.jobs[prompt_id]``).

    ``state``: ``pending`` -> ``running`` -> ``success`` | ``error`` | ``interrupted``; or ``deleted``
    (removed from the queue before it ran) or ``lost`` (the server crashed before it finished). A
    job is in a final state only once its history entry is written. ``node``: the node executing now.
    ``history``: the history entry once written. ``error``: the ``execution_error`` or
    ``execution_interrupted`` data, if any.
    """

    prompt_id: str
    number: float | int
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    client_id: str | None
    state: str = "pending"
    node: str | None = None
    history: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    _pnginfo: list[tuple[str, str]] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def wire(self) -> list[Any]:
        """The queue item as ComfyUI shows it: ``[number, prompt_id, prompt, extra_data, outputs]``."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    def pnginfo(self) -> list[tuple[str, str]]:
        """The PNG tEXt chunks ComfyUI writes: ``prompt``, then one per ``extra_pnginfo`` key."""
        if self._pnginfo is None:
            texts = [("prompt", json.dumps(self.prompt))]
            extra = self.extra_data.get("extra_pnginfo") if isinstance(self.extra_data, dict) else None
            if isinstance(extra, Mapping):
                texts += [(str(k), json.dumps(v)) for k, v in extra.items()]
            self._pnginfo = texts
        return self._pnginfo


@dataclass(frozen=True)
class DoubleEvent:
    """An internal event, for :meth:`ComfyDouble.subscribe`.

    ``kind``: ``prompt`` (a POST /prompt was answered; ``data["status"]``), ``queued``, ``started``,
    ``node`` (``data["node"]`` started), ``finished`` (``data["state"]``), ``deleted``, ``interrupt``,
    ``upload``, ``ws_open``/``ws_close``/``ws_dropped`` (``data["sid"]``), ``crash``.
    """

    kind: str
    prompt_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class _Interrupted(Exception):
    pass


class _Crashed(Exception):
    pass


class _NodeFailed(Exception):
    def __init__(self, details: dict[str, Any]):
        super().__init__(details.get("exception_message"))
        self.details = details


class _Socket:
    __slots__ = ("ws", "transport", "sid", "flags", "sent")

    def __init__(self, ws: web.WebSocketResponse, transport: Any, sid: str):
        self.ws = ws
        self.transport = transport
        self.sid = sid
        self.flags: dict[str, Any] = {}
        self.sent: dict[str, int] = {}


# ------------------------------------------------------------------------------------------ files


_FILLER = random.Random(0).randbytes(1 << 20)


class _Store:
    """The double's folders (input/ output/ temp/) and ComfyUI's file naming."""

    def __init__(self, root: str, faults: Any = None):
        self.root = os.path.realpath(root)
        self.faults = faults
        self.input_dir = os.path.join(self.root, "input")
        self.output_dir = os.path.join(self.root, "output")
        self.temp_dir = os.path.join(self.root, "temp")
        self._counters: dict[tuple[str, str], int] = {}
        self._prefixes: dict[tuple[str, str], str] = {}

    def directory(self, kind: str | None) -> str | None:
        return {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}.get(kind or "")

    def annotated(self, name: str, default: str = "input") -> str:
        relative, folder = split_annotated_name(name)
        return os.path.join(self.directory(folder or default) or self.input_dir, relative)

    def input_path(self, name: Any) -> str:
        return self.annotated(name)

    def exists(self, name: Any) -> bool:
        """The validator's ``file_exists``: ComfyUI's exists_annotated_filepath."""
        return os.path.exists(self.annotated(name))

    def input_files(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.input_dir) if e.is_file())
        except FileNotFoundError:
            return []

    def save_path(self, prefix: str, kind: str, width: int = 0, height: int = 0) -> tuple[str, str, int, str]:
        """ComfyUI's get_save_image_path: (full folder, file name stem, next counter, subfolder)."""
        base = self.directory(kind) or self.output_dir
        if "%" in prefix:
            now = time.localtime()
            for token, value in (
                ("%width%", str(width)),
                ("%height%", str(height)),
                ("%year%", str(now.tm_year)),
                ("%month%", f"{now.tm_mon:02}"),
                ("%day%", f"{now.tm_mday:02}"),
                ("%hour%", f"{now.tm_hour:02}"),
                ("%minute%", f"{now.tm_min:02}"),
                ("%second%", f"{now.tm_sec:02}"),
            ):
                prefix = prefix.replace(token, value)
        normalized = os.path.normpath(prefix)
        subfolder, filename = os.path.dirname(normalized), os.path.basename(normalized)
        full = os.path.join(base, subfolder)
        common = os.path.commonpath((base, os.path.abspath(full)))
        if common != base:
            raise Exception(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(full)}\n         output_dir: {base}"
                f"\n         commonpath: {common}"
            )
        key = (os.path.abspath(full), os.path.normcase(filename))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._scan(full, filename)
            self._counters[key] = counter
        return full, filename, counter, subfolder

    @staticmethod
    def _scan(folder: str, filename: str) -> int:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            return 1
        best = 0
        size = len(filename)
        wanted = os.path.normcase(filename)
        for name in names:
            if os.path.normcase(name[:size]) != wanted or name[size : size + 1] != "_":
                continue
            try:
                best = max(best, int(name[size + 1 :].split("_")[0].split(".")[0]))
            except ValueError:
                continue
        return best + 1

    def advance(self, folder: str, filename: str, counter: int) -> None:
        key = (os.path.abspath(folder), os.path.normcase(filename))
        if self._counters.get(key, 0) < counter:
            self._counters[key] = counter

    def write(self, path: str, data: bytes) -> None:
        pad = (self.faults.output_size if self.faults is not None else 0) - len(data)
        with open(path, "wb") as fh:
            fh.write(data)
            while pad > 0:  # incompressible filler, written in chunks (a 200 MB file never sits in memory)
                chunk = _FILLER[: min(pad, len(_FILLER))]
                fh.write(chunk)
                pad -= len(chunk)

    def preview_prefix(self, node_id: str, class_type: str) -> str:
        key = (node_id, class_type)
        prefix = self._prefixes.get(key)
        if prefix is None:
            suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
            prefix = self._prefixes[key] = "ComfyUI_temp_" + suffix
        return prefix

    def keep_prefixes(self, keys: Iterable[tuple[str, str]]) -> None:
        keep = set(keys)
        for key in [k for k in self._prefixes if k not in keep]:
            del self._prefixes[key]


# ------------------------------------------------------------------------------------------ progress


class _Progress:
    """ComfyUI's progress registry for one job: ``progress_state`` frames with every non-pending node."""

    __slots__ = ("double", "prompt_id", "sid", "entries", "fragments")

    def __init__(self, double: ComfyDouble, prompt_id: str, sid: str | None):
        self.double = double
        self.prompt_id = prompt_id
        self.sid = sid
        self.entries: dict[str, list[Any]] = {}
        self.fragments: dict[str, str] = {}

    def _set(self, node_id: str, state: str, value: Any, maximum: Any) -> None:
        self.entries[node_id] = [state, value, maximum]
        if not self.double._has_receivers(self.sid):
            self.fragments.pop(node_id, None)
            return
        entry = {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node_id,
            "prompt_id": self.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        self.fragments[node_id] = f"{json.dumps(node_id)}: {json.dumps(entry)}"
        if len(self.fragments) != len(self.entries):  # a socket appeared: rebuild what was skipped
            for other, (st, val, mx) in self.entries.items():
                if other not in self.fragments:
                    e = {
                        "value": val,
                        "max": mx,
                        "state": st,
                        "node_id": other,
                        "prompt_id": self.prompt_id,
                        "display_node_id": other,
                        "parent_node_id": None,
                        "real_node_id": other,
                    }
                    self.fragments[other] = f"{json.dumps(other)}: {json.dumps(e)}"
        nodes = ", ".join(self.fragments[n] for n in self.entries)
        payload = (
            '{"type": "progress_state", "data": {"prompt_id": '
            + json.dumps(self.prompt_id)
            + ', "nodes": {'
            + nodes
            + "}}}"
        )
        self.double._enqueue(self.sid, payload, "progress_state", node_id)

    def start(self, node_id: str) -> None:
        self._set(node_id, "running", 0.0, 1.0)

    def update(self, node_id: str, value: Any, maximum: Any) -> None:
        self._set(node_id, "running", value, maximum)

    def finish(self, node_id: str) -> None:
        entry = self.entries.get(node_id)
        maximum = entry[2] if entry is not None else 1
        self._set(node_id, "finished", maximum, maximum)


# ------------------------------------------------------------------------------------------ double


class ComfyDouble:
    """A ComfyUI stand-in serving ComfyUI's HTTP + websocket API on a real loopback socket.

    ::

        async with ComfyDouble(root=tmp_path) as comfy:      # port 0: the OS picks one
            ... comfy.url, comfy.ws_url ...
            await comfy.wait_for_state(prompt_id, "success")

        with ComfyDouble().run_in_thread() as comfy:        # for synchronous tests
            comfy.url

    ``root`` holds ``input/``, ``output/`` and ``temp/`` (default: a temporary directory, removed on
    stop). ``model_files`` fills the model COMBO lists, per model folder (``{"checkpoints": [...],
    "diffusion_models": [...], "text_encoders": [...], "vae": [...], "loras": [...]}``), merged over
    :data:`~gpubridge.testing.comfy.DEFAULT_MODEL_FILES`. ``faults``: see :class:`Faults`; also settable
    at ``comfy.faults`` and over HTTP (``POST /gpubridge/faults``). ``cache=False`` disables ComfyUI's
    node output cache (like ``--cache-none``). ``previews=True`` sends a binary preview image with each
    sampler step (ComfyUI's default preview method is "none": off). ``exit_on_crash`` makes the crash
    fault end the process (``os._exit(70)``), as ``python -m gpubridge.testing.comfy`` does.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_files: Mapping[str, Sequence[str]] | None = None,
        object_info: Mapping[str, Any] | None = None,
        faults: Faults | None = None,
        cache: bool = True,
        previews: bool = False,
        example_image: bool = True,
        clear_temp: bool = True,
        exit_on_crash: bool = False,
        extra_nodes: bool = True,
    ):
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self._own_root = root is None
        self._root_arg = root
        self.store: _Store | None = None
        self.model_files = normalize_model_files(model_files)
        self._base_object_info = object_info
        self._extra_nodes = extra_nodes
        self.object_info: dict[str, Any] = build_object_info(
            self.model_files, base=object_info, extra_nodes=extra_nodes
        )
        self.faults = faults if faults is not None else Faults()
        self.cache = cache
        self.previews = previews
        self.example_image = example_image
        self.clear_temp = clear_temp
        self.exit_on_crash = exit_on_crash
        self.system_stats: dict[str, Any] | None = None  # set to override GET /system_stats
        self.stats = Stats()
        self.jobs: dict[str, Job] = {}
        self.crashed = False
        self._crash_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._subscribers: list[asyncio.Queue[DoubleEvent]] = []
        self._served_info: tuple[Any, bytes] | None = None
        self._reset_state()

    # ------------------------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self.number = 0
        self._queue: list[tuple[Any, str, int, Job]] = []
        self._seq = itertools.count()
        self._volatile = itertools.count()
        self._running: dict[int, Job] = {}
        self._task_counter = 0
        self.history: dict[str, dict[str, Any]] = {}
        self._sockets: dict[str, _Socket] = {}
        self._all_sockets: set[_Socket] = set()
        self._outbox: asyncio.Queue[tuple[str | None, Any, str, str | None]] | None = None
        self._interrupt = False
        self._exec_client: str | None = None
        self._last_node: str | None = None
        self._flags: dict[str, Any] = {}
        self._outputs_cache: dict[Any, tuple[Any, ...]] = {}
        self._ui_cache: dict[Any, dict[str, Any]] = {}
        self._work = asyncio.Event() if self._loop is not None else None
        self._validator = PromptValidator(self.object_info, file_exists=self._file_exists)

    def _file_exists(self, name: str) -> bool:
        assert self.store is not None
        return self.store.exists(name)

    # ------------------------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self.port is None:
            raise RuntimeError("the ComfyUI double is not running")
        return f"http://{self._netloc}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:<port>/ws`` (add ``?clientId=...``)."""
        return f"ws://{self._netloc}/ws"

    @property
    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def root(self) -> str:
        assert self.store is not None, "not started"
        return self.store.root

    @property
    def input_dir(self) -> str:
        assert self.store is not None, "not started"
        return self.store.input_dir

    @property
    def output_dir(self) -> str:
        assert self.store is not None, "not started"
        return self.store.output_dir

    @property
    def temp_dir(self) -> str:
        assert self.store is not None, "not started"
        return self.store.temp_dir

    @property
    def queue_pending(self) -> list[str]:
        """Prompt ids waiting in the queue, in queue order."""
        return [entry[1] for entry in sorted(self._queue)]

    @property
    def queue_running(self) -> list[str]:
        return [job.prompt_id for job in self._running.values()]

    @property
    def queue_remaining(self) -> int:
        return len(self._queue) + len(self._running)

    def set_model_files(self, model_files: Mapping[str, Sequence[str]]) -> None:
        """Replace the model files (merged over the defaults) and rebuild object_info."""
        self.model_files = normalize_model_files(model_files)
        self.object_info = build_object_info(
            self.model_files, base=self._base_object_info, extra_nodes=self._extra_nodes
        )
        self._validator = PromptValidator(self.object_info, file_exists=self._file_exists)
        self._served_info = None

    # ------------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ComfyDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> ComfyDouble:
        """Bind, start the worker, and return once the server answers."""
        from ._http import build_app

        self._loop = asyncio.get_running_loop()
        if self.store is None:
            root = tempfile.mkdtemp(prefix="comfy-double-") if self._own_root else os.fspath(self._root_arg)
            self.store = _Store(root, self.faults)
        for folder in (
            self.store.input_dir,
            self.store.output_dir,
            self.store.temp_dir,
            os.path.join(self.store.input_dir, "3d"),
        ):  # ComfyUI's Load3D nodes create input/3d
            os.makedirs(folder, exist_ok=True)
        if self.clear_temp:
            for entry in os.scandir(self.store.temp_dir):
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)
        example = os.path.join(self.store.input_dir, "example.png")
        if self.example_image and not os.path.exists(example):
            self.store.write(example, _media.png(768, 768, (128, 128, 128)))
        self.crashed = False
        self._reset_state()
        self._work = asyncio.Event()
        self._outbox = asyncio.Queue()
        self.faults._listener = self._on_faults_changed
        app = build_app(self)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port if self.port is None else self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._tasks = [
            asyncio.create_task(self._worker(), name="comfy-double-worker"),
            asyncio.create_task(self._publisher(), name="comfy-double-publisher"),
        ]
        return self

    async def stop(self) -> None:
        """Stop serving (close sockets with 1001 Going Away) and remove a temporary root."""
        await self._shutdown(graceful=True)
        if self._own_root and self.store is not None:
            shutil.rmtree(self.store.root, ignore_errors=True)
            self.store = None

    async def restart(self) -> None:
        """Come back on the same port like a restarted ComfyUI: empty queue, history and caches.

        Files in ``root`` stay; :attr:`stats` keep counting. Also the way back from :meth:`crash`.
        """
        await self._shutdown(graceful=True)
        await self.start()

    async def _shutdown(self, graceful: bool) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._tasks = []
        sockets = list(self._all_sockets)
        self._all_sockets.clear()
        self._sockets.clear()
        if graceful and sockets:
            closing = [
                asyncio.ensure_future(sock.ws.close(code=1001, message=b"Server shutdown"))
                for sock in sockets
            ]
            await asyncio.wait(closing, timeout=1.0)
            for task in closing:
                task.cancel()
        for sock in sockets:
            with contextlib.suppress(Exception):
                if not graceful or not sock.ws.closed:
                    sock.transport.abort()
        for waiter in self._waiters:
            if not waiter[1].done():
                waiter[1].set_exception(RuntimeError("the ComfyUI double stopped"))
        self._waiters.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            if not graceful and runner.server is not None:
                for handler in runner.server.connections:
                    with contextlib.suppress(Exception):
                        if handler.transport is not None:
                            handler.transport.abort()
            with contextlib.suppress(Exception):
                await runner.cleanup()

    async def crash(self) -> None:
        """Die like a crashed ComfyUI: every connection aborted, the port closed, jobs lost.

        With ``exit_on_crash`` the process exits with status 70 instead. :meth:`restart` brings the
        double back.
        """
        if self.crashed:
            return
        self.crashed = True
        self._publish(DoubleEvent("crash"))
        if self.exit_on_crash:
            os._exit(CRASH_EXIT_STATUS)
        for job in [*self._running.values(), *(entry[3] for entry in self._queue)]:
            job.state = "lost"
            job.finished_at = time.monotonic()
        self._notify()  # waiters for those jobs see "lost"; the others fail when the server goes
        await self._shutdown(graceful=False)

    async def drop_sockets(self, client_id: str | None = None) -> int:
        """Abort websocket connections abruptly (all, or the ones of ``client_id``); returns how many."""
        dropped = 0
        for sock in list(self._all_sockets):
            if client_id is None or sock.sid == client_id:
                self._drop(sock)
                dropped += 1
        return dropped

    def _drop(self, sock: _Socket) -> None:
        with contextlib.suppress(Exception):
            sock.transport.abort()
        self.stats.ws_dropped += 1
        self._publish(DoubleEvent("ws_dropped", data={"sid": sock.sid}))

    def pause(self) -> None:
        """Stuck queue: the worker takes no new job until :meth:`resume` (same as ``faults.paused``)."""
        self.faults.paused = True

    def resume(self) -> None:
        self.faults.paused = False

    def interrupt(self) -> None:
        """What ``POST /interrupt`` does: interrupt the running job at its next node or step."""
        self._interrupt = True

    def _on_faults_changed(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._kick()
        else:
            loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        if self._work is not None:
            self._work.set()
        self._notify()  # waiters on a fault (hold_prompts) re-check

    # ------------------------------------------------------------------------------------ hooks

    def _notify(self) -> None:
        if not self._waiters:
            return
        keep = []
        for predicate, future in self._waiters:
            if future.done():
                continue
            try:
                ready = predicate()
            except Exception as exc:  # a broken predicate fails its waiter
                future.set_exception(exc)
                continue
            if ready:
                future.set_result(None)
            else:
                keep.append((predicate, future))
        self._waiters = keep

    def _publish(self, event: DoubleEvent) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = 10.0) -> None:
        """Return once ``predicate()`` is true; it is re-checked after every change in the double."""
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            if not future.done():
                future.cancel()

    async def wait_for_state(self, prompt_id: str, *states: str, timeout: float | None = 10.0) -> Job:
        """Wait until job ``prompt_id`` is in one of ``states`` (default: finished, i.e. ``success``,
        ``error``, ``interrupted``, ``deleted`` or ``lost``; ``"done"`` means the same). Also waits for
        the job to be submitted at all. Returns the :class:`Job`."""
        wanted = set(states or ("done",))
        if "done" in wanted or "finished" in wanted:
            wanted |= TERMINAL_STATES

        def ready() -> bool:
            job = self.jobs.get(prompt_id)
            return job is not None and job.state in wanted

        await self.wait_until(ready, timeout)
        return self.jobs[prompt_id]

    async def wait_for_prompts(self, count: int, timeout: float | None = 10.0) -> None:
        """Wait until ``count`` POST /prompt requests have been answered (any outcome)."""
        await self.wait_until(lambda: self.stats.prompts_received >= count, timeout)

    async def wait_for_idle(self, timeout: float | None = 10.0) -> None:
        """Wait until nothing is queued or running."""
        await self.wait_until(lambda: not self._queue and not self._running, timeout)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[DoubleEvent]]:
        """``async with comfy.subscribe() as events: event = await events.get()`` (:class:`DoubleEvent`)."""
        queue: asyncio.Queue[DoubleEvent] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            yield queue
        finally:
            self._subscribers.remove(queue)

    def run_in_thread(self) -> ThreadedComfyDouble:
        """Run the double on its own event loop in a background thread (for synchronous tests)."""
        return ThreadedComfyDouble(self)

    # ------------------------------------------------------------------------------------ websocket

    def _has_receivers(self, sid: str | None) -> bool:
        return bool(self._sockets) if sid is None else sid in self._sockets

    def _enqueue(self, sid: str | None, payload: str | bytes, event: str, node: str | None = None) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait((sid, payload, event, node))

    def send(self, event: str, data: Any, sid: str | None = None, node: str | None = None) -> None:
        """Queue a JSON frame ``{"type": event, "data": data}`` for ``sid`` (``None``: every socket)."""
        if self._has_receivers(sid):
            self._enqueue(sid, json.dumps({"type": event, "data": data}), event, node)

    def send_bytes(
        self, event_type: int, body: bytes, sid: str | None = None, node: str | None = None
    ) -> None:
        """Queue a binary frame: big-endian uint32 ``event_type`` then ``body``."""
        if self._has_receivers(sid):
            self._enqueue(sid, event_type.to_bytes(4, "big") + body, "binary", node)

    def _status_frame(self) -> None:
        self.send("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining}}})

    async def _publisher(self) -> None:
        """Send queued frames in order. Whatever is queued at once goes out as one write per socket."""
        assert self._outbox is not None
        outbox = self._outbox
        while True:
            batch = [await outbox.get()]
            while not outbox.empty():
                batch.append(outbox.get_nowait())
            pending: dict[_Socket, list[bytes]] = {}
            dropping: list[_Socket] = []
            for sid, payload, event, node in batch:
                if sid is None:
                    targets = list(self._sockets.values())
                else:
                    sock = self._sockets.get(sid)
                    targets = [sock] if sock is not None else []
                if not targets:
                    continue
                frame = _ws_frame(payload)
                for sock in targets:
                    if sock in dropping:
                        continue
                    pending.setdefault(sock, []).append(frame)
                    drop = self.faults.drop_ws
                    if drop is not None and self._drop_matches(drop, sock, event, node):
                        dropping.append(sock)
                        if drop.times is not None:
                            drop.times -= 1
                            if drop.times <= 0:
                                self.faults.drop_ws = None
            for sock, frames in pending.items():
                transport = sock.transport
                if transport is None or transport.is_closing() or sock.ws.closed:
                    continue
                try:
                    transport.write(b"".join(frames))
                except Exception:  # ComfyUI logs send errors and goes on
                    continue
                self.stats.frames_sent += len(frames)
            for sock in dropping:
                self._drop(sock)

    @staticmethod
    def _drop_matches(drop: Any, sock: _Socket, event: str, node: str | None) -> bool:
        if drop.client_id is not None and drop.client_id != sock.sid:
            return False
        if drop.after not in ("any", event):
            return False
        if drop.node_id is not None and str(drop.node_id) != str(node):
            return False
        sock.sent[drop.after] = sock.sent.get(drop.after, 0) + 1
        return sock.sent[drop.after] >= max(1, drop.count)

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId", "")
        if sid:
            self._sockets.pop(sid, None)  # ComfyUI replaces the older socket of that client id
        else:
            sid = uuid.uuid4().hex
        sock = _Socket(ws, request.transport, sid)
        self._sockets[sid] = sock
        self._all_sockets.add(sock)
        self.stats.ws_connections += 1
        self._publish(DoubleEvent("ws_open", data={"sid": sid}))
        try:
            status = {"status": {"exec_info": {"queue_remaining": self.queue_remaining}}, "sid": sid}
            await ws.send_str(json.dumps({"type": "status", "data": status}))
            if self._exec_client == sid and self._last_node is not None:
                await ws.send_str(json.dumps({"type": "executing", "data": {"node": self._last_node}}))
            first_message = True
            async for msg in ws:
                if msg.type != web.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                try:
                    if first_message and data.get("type") == "feature_flags":
                        flags = data.get("data", {})
                        sock.flags = flags if isinstance(flags, dict) else {}
                        await ws.send_str(json.dumps({"type": "feature_flags", "data": dict(FEATURE_FLAGS)}))
                    first_message = False
                except Exception:  # ComfyUI logs "Error processing WebSocket message"
                    pass
        finally:
            # As in ComfyUI: this removes whatever socket is registered under sid now, even a newer one.
            self._sockets.pop(sid, None)
            self._all_sockets.discard(sock)
            self._publish(DoubleEvent("ws_close", data={"sid": sid}))
        return ws

    @property
    def client_ids(self) -> list[str]:
        """The client ids with a registered websocket now (what ComfyUI's ``self.sockets`` holds)."""
        return list(self._sockets)

    @property
    def open_sockets(self) -> int:
        """Websocket handlers still running (registered or not)."""
        return len(self._all_sockets)

    def _supports_metadata(self, sid: str | None) -> bool:
        sock = self._sockets.get(sid) if sid is not None else None
        return bool(sock is not None and sock.flags.get("supports_preview_metadata", False))

    # ------------------------------------------------------------------------------------ queue

    def submit(self, body: Any) -> tuple[int, Any]:
        """``POST /prompt``: returns (status, JSON body); raises where ComfyUI answers 500."""
        self.stats.prompts_received += 1
        try:
            status, answer = self._submit(body)
        except Exception:
            self.stats.prompts_rejected += 1
            self._publish(DoubleEvent("prompt", data={"status": 500}))
            raise
        if status == 200:
            self.stats.prompts_accepted += 1
        else:
            self.stats.prompts_rejected += 1
        self._publish(
            DoubleEvent("prompt", answer.get("prompt_id") if status == 200 else None, {"status": status})
        )
        return status, answer

    def note_unreadable_prompt(self) -> None:
        """Count a POST /prompt whose body is not JSON (answered 500 before submit() is reached)."""
        self.stats.prompts_received += 1
        self.stats.prompts_rejected += 1
        self._publish(DoubleEvent("prompt", data={"status": 500}))

    def _submit(self, body: Any) -> tuple[int, Any]:
        if "number" in body:
            number: float | int = float(body["number"])
        else:
            number = self.number
            if "front" in body and body["front"]:
                number = -number
            self.number += 1
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return 400, {"error": error, "node_errors": {}}
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        partial = body.get("partial_execution_targets") if "partial_execution_targets" in body else None
        result = self._validator.validate(prompt, partial_execution_targets=partial)
        extra_data = body["extra_data"] if "extra_data" in body else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            return 400, {"error": result.error, "node_errors": result.node_errors}
        for node_id, values in result.coerced.items():
            prompt[node_id]["inputs"].update(values)
        client_id = extra_data.get("client_id") if isinstance(extra_data, dict) else None
        job = Job(prompt_id, number, prompt, extra_data, list(result.outputs), client_id)
        self.jobs[prompt_id] = job
        heapq.heappush(self._queue, (number, prompt_id, next(self._seq), job))
        self._status_frame()
        self._publish(DoubleEvent("queued", prompt_id))
        self._kick()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}

    def delete_pending(self, prompt_id: Any) -> bool:
        """Remove the first pending job with ``prompt_id`` (``POST /queue {"delete": [...]}``)."""
        for index, entry in enumerate(self._queue):
            if entry[1] == prompt_id:
                if len(self._queue) == 1:  # ComfyUI wipes the queue here, which sends a status of its own
                    self._queue = []
                    self._status_frame()
                else:
                    self._queue.pop(index)
                    heapq.heapify(self._queue)
                job = entry[3]
                job.state = "deleted"
                job.finished_at = time.monotonic()
                self.stats.deletes += 1
                self._status_frame()
                self._publish(DoubleEvent("deleted", job.prompt_id))
                return True
        return False

    def clear_pending(self) -> None:
        """``POST /queue {"clear": true}``: drop every pending job; the running one goes on."""
        dropped, self._queue = self._queue, []
        for entry in dropped:
            entry[3].state = "deleted"
            entry[3].finished_at = time.monotonic()
            self._publish(DoubleEvent("deleted", entry[3].prompt_id))
        self.stats.queue_clears += 1
        self._status_frame()
        self._notify()

    def request_interrupt(self, prompt_id: Any = None) -> None:
        """``POST /interrupt``: without ``prompt_id`` always; with it only if that job is running."""
        if prompt_id:
            if any(job.prompt_id == prompt_id for job in self._running.values()):
                self._interrupt = True
        else:
            self._interrupt = True
        self._publish(DoubleEvent("interrupt", prompt_id if prompt_id else None))

    def set_flag(self, name: str, value: Any) -> None:
        self._flags[name] = value
        if not self._running:
            self._apply_flags()

    def _apply_flags(self) -> None:
        flags, self._flags = self._flags, {}
        if flags.get("free_memory"):
            self._outputs_cache.clear()
            self._ui_cache.clear()
            if self.store is not None:
                self.store.keep_prefixes(())

    # ------------------------------------------------------------------------------------ worker

    async def _worker(self) -> None:
        assert self._work is not None
        try:
            while True:
                while not self._queue or self.faults.paused:
                    self._work.clear()
                    if self._queue and not self.faults.paused:
                        break
                    await self._work.wait()
                _, _, _, job = heapq.heappop(self._queue)
                item_id = self._task_counter
                self._task_counter += 1
                self._running[item_id] = job
                job.state = "running"
                job.started_at = time.monotonic()
                self.stats.jobs_started += 1
                self._status_frame()
                self._publish(DoubleEvent("started", job.prompt_id))
                try:
                    outcome, status_str, completed, messages, outputs, meta = await self._execute(job)
                finally:
                    self._exec_client = None
                    self._last_node = None
                await self._history_window(job)
                del self._running[item_id]
                extra = job.extra_data
                if isinstance(extra, dict) and any(k in extra for k in SENSITIVE_EXTRA_DATA_KEYS):
                    extra = {k: v for k, v in extra.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
                if len(self.history) > MAXIMUM_HISTORY_SIZE:
                    self.history.pop(next(iter(self.history)))
                entry = {
                    "prompt": [job.number, job.prompt_id, job.prompt, extra, job.outputs],
                    "outputs": outputs,
                    "status": {"status_str": status_str, "completed": completed, "messages": messages},
                    "meta": meta,
                }
                self.history[job.prompt_id] = entry
                job.history = entry
                job.node = None
                job.state = outcome  # terminal only once the history entry exists
                job.finished_at = time.monotonic()
                self._status_frame()
                if job.client_id is not None:
                    self.send("executing", {"node": None, "prompt_id": job.prompt_id}, job.client_id)
                self.stats.jobs_finished += 1
                self._publish(DoubleEvent("finished", job.prompt_id, {"state": job.state}))
                if self._flags:
                    self._apply_flags()
        except _Crashed:
            return

    async def _history_window(self, job: Job) -> None:
        """ComfyUI sends execution_success, then writes history: the window where /history says {}."""
        faults = self.faults
        if faults.history_delay > 0:
            await asyncio.sleep(faults.history_delay)
        else:
            await asyncio.sleep(0)
        while self.faults.hold_history:
            assert self._work is not None
            self._work.clear()
            if not self.faults.hold_history:
                break
            await self._work.wait()

    def _signatures(self, prompt: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
        """Per node: a content key and a cache key, both from its class and inputs, recursively.

        The content key is stable across processes (it seeds the placeholder colours). The cache key also
        covers what ComfyUI's IS_CHANGED adds, for the node and its ancestors: the input file's state for
        the image loaders, a new value every time for SaveImageWebsocket (never cached).
        """
        keys: dict[str, int] = {}
        cache_keys: dict[str, int] = {}
        store = self.store

        def visit(node_id: str, depth: int = 0) -> None:
            if node_id in keys:
                return
            node = prompt[node_id]
            class_type = node["class_type"]
            inputs = node.get("inputs") or {}
            parts: list[Any] = [class_type]
            upstream: list[int] = []
            for name in sorted(inputs):
                value = inputs[name]
                if _is_link(value) and value[0] in prompt and depth < 500:
                    visit(value[0], depth + 1)
                    parts.append((name, "@", keys[value[0]], value[1]))
                    upstream.append(cache_keys[value[0]])
                else:
                    parts.append((name, value))
            digest = hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=8).digest()
            key = keys[node_id] = int.from_bytes(digest, "big")
            extra: Any = None
            if class_type in NEVER_CACHED:
                extra = ("volatile", next(self._volatile))
            elif class_type in FILE_KEYED and store is not None:
                try:
                    st = os.stat(store.annotated(inputs.get(FILE_KEYED[class_type])))
                    extra = (st.st_mtime_ns, st.st_size)
                except Exception:  # ComfyUI: IS_CHANGED raised -> NaN -> never equal
                    extra = ("volatile", next(self._volatile))
            cache_keys[node_id] = hash((key, extra, *upstream))

        for node_id in prompt:
            visit(node_id)
        return keys, cache_keys

    async def _execute(self, job: Job) -> tuple[str, str, bool, list[Any], dict[str, Any], dict[str, Any]]:
        prompt = job.prompt
        prompt_id = job.prompt_id
        client = job.client_id
        self._interrupt = False  # ComfyUI clears the flag when a job starts
        self._exec_client = client
        messages: list[Any] = []

        def add_message(event: str, data: dict[str, Any], broadcast: bool) -> None:
            data = {**data, "timestamp": _now_ms()}
            messages.append([event, data])
            if client is not None or broadcast:
                self.send(event, data, client)

        add_message("execution_start", {"prompt_id": prompt_id}, False)
        keys, cache_keys = self._signatures(prompt)
        if self.cache:
            wanted = set(cache_keys.values())
            for cache in (self._outputs_cache, self._ui_cache):
                for stale in [k for k in cache if k not in wanted]:
                    del cache[stale]
        else:
            self._outputs_cache.clear()
            self._ui_cache.clear()
        assert self.store is not None
        self.store.keep_prefixes((nid, prompt[nid]["class_type"]) for nid in prompt)
        outputs_cache = self._outputs_cache
        cached_nodes = [nid for nid in prompt if cache_keys[nid] in outputs_cache]
        add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, False)

        progress = _Progress(self, prompt_id, client)
        order = _ExecutionList(prompt, self.object_info, lambda nid: cache_keys[nid] in outputs_cache)
        for output_id in job.outputs:
            order.add_node(output_id)
        executed: list[str] = []
        visited: list[str] = []
        results: dict[str, tuple[Any, ...]] = {}
        status_str, completed = "success", True
        try:
            while not order.is_empty():
                node_id = order.pick()
                class_type = prompt[node_id]["class_type"]
                cache_key = cache_keys[node_id]
                cached = outputs_cache.get(cache_key)
                if cached is not None:
                    results[node_id] = cached
                    if client is not None:
                        ui = self._ui_cache.get(cache_key) or {}
                        self.send(
                            "executed",
                            {
                                "node": node_id,
                                "display_node": node_id,
                                "output": ui.get("output"),
                                "prompt_id": prompt_id,
                            },
                            client,
                            node_id,
                        )
                    progress.finish(node_id)
                    visited.append(node_id)
                    order.complete(node_id)
                    continue
                job.node = node_id
                progress.start(node_id)
                if client is not None:
                    self._last_node = node_id
                    self.send(
                        "executing",
                        {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                        client,
                        node_id,
                    )
                self._publish(DoubleEvent("node", prompt_id, {"node": node_id, "class_type": class_type}))
                await self._run_node(job, node_id, class_type, keys[node_id], cache_keys, results, progress)
                visited.append(node_id)
                executed.append(node_id)
                order.complete(node_id)
        except _Interrupted as stop:
            node_id = str(stop.args[0])
            mes = {
                "prompt_id": prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"],
                "executed": list(executed),
            }
            add_message("execution_interrupted", mes, True)
            job.error = messages[-1][1]
            outcome = "interrupted"
            status_str, completed = "error", False
        except _NodeFailed as failure:
            details = failure.details
            node_id = details["node_id"]
            mes = {
                "prompt_id": prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"],
                "executed": list(executed),
                "exception_message": details["exception_message"],
                "exception_type": details["exception_type"],
                "traceback": details["traceback"],
                "current_inputs": details["current_inputs"],
                "current_outputs": list(prompt),
            }
            add_message("execution_error", mes, False)
            job.error = messages[-1][1]
            outcome = "error"
            status_str, completed = "error", False
        else:
            add_message("execution_success", {"prompt_id": prompt_id}, False)
            outcome = "success"

        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        seen = set()
        for node_id in itertools.chain(visited, prompt):
            if node_id in seen:
                continue
            seen.add(node_id)
            ui = self._ui_cache.get(cache_keys[node_id])
            if ui is not None:
                outputs[node_id] = ui["output"]
                meta[node_id] = ui["meta"]
        if not self.cache:
            self._outputs_cache.clear()
            self._ui_cache.clear()
        return outcome, status_str, completed, messages, outputs, meta

    def _check_faults(self, node_id: str, class_type: str, step: int | None) -> None:
        faults = self.faults
        crash = faults.crash
        if crash is not None and crash.at_step == step and crash.matches(class_type, node_id):
            faults.crash = None
            assert self._loop is not None
            self._crash_task = self._loop.create_task(self.crash())
            raise _Crashed()
        error = faults.error
        if error is not None and error.at_step == step and error.matches(class_type, node_id):
            if error.times is not None:
                error.times -= 1
                if error.times <= 0:
                    faults.error = None
            message = error.exception_message
            if error.exception_type.endswith("OutOfMemoryError"):
                message = f"{message}\n{OOM_TIPS}"
            else:
                message = f"{message}\n"
            tb = (
                error.traceback
                if error.traceback is not None
                else [
                    f'  File "{self.root}/gpubridge_comfy_double.py", line 1, in {class_type}\n'
                    f"    raise {error.exception_type}({error.exception_message!r})\n"
                ]
            )
            raise _NodeFailed(
                {
                    "node_id": node_id,
                    "exception_message": message,
                    "exception_type": error.exception_type,
                    "traceback": list(tb),
                }
            )

    async def _run_node(
        self,
        job: Job,
        node_id: str,
        class_type: str,
        key: int,
        cache_keys: Mapping[str, int],
        results: dict[str, tuple[Any, ...]],
        progress: _Progress,
    ) -> None:
        prompt = job.prompt
        cache_key = cache_keys[node_id]
        inputs = prompt[node_id].get("inputs") or {}
        info = self.object_info[class_type]
        values: dict[str, Any] = {}
        for name, value in inputs.items():
            if _is_link(value):
                source = results.get(value[0])
                if source is None and value[0] in cache_keys:  # a cached input that did not need to run
                    source = self._outputs_cache.get(cache_keys[value[0]])
                slot = int(value[1])
                values[name] = source[slot] if source is not None and 0 <= slot < len(source) else None
            else:
                values[name] = value
        ctx = Ctx(node_id, class_type, info, inputs, values, key, job, self.store)  # type: ignore[arg-type]
        client = job.client_id
        if self._interrupt:
            raise _Interrupted(node_id)
        try:
            self._check_faults(node_id, class_type, None)
            await self._node_wait(
                lambda: self.faults.delay_for(class_type, node_id),
                lambda: self.faults.holds(job.prompt_id, class_type, node_id),
            )
            steps = sampler_steps(ctx)
            for step in range(1, steps + 1):
                await self._node_wait(lambda: self.faults.step_delay_for(class_type, node_id), None)
                if self._interrupt:
                    raise _Interrupted(node_id)
                self._check_faults(node_id, class_type, step)
                progress.update(node_id, step, steps)
                preview = self._preview_jpeg() if self.previews else None
                if preview is not None and self._supports_metadata(client):
                    self._send_preview_metadata(preview, "image/jpeg", job, node_id)
                self.send(
                    "progress",
                    {"value": step, "max": steps, "prompt_id": job.prompt_id, "node": node_id},
                    client,
                    node_id,
                )
                if preview is not None and not self._supports_metadata(client):
                    self.send_bytes(BINARY_PREVIEW_IMAGE, (1).to_bytes(4, "big") + preview, client, node_id)
            try:
                result = run_node(ctx)
            except (_Interrupted, _Crashed, _NodeFailed):
                raise
            except Exception as exc:
                raise _NodeFailed(
                    {
                        "node_id": node_id,
                        "exception_message": f"{exc}\n",
                        "exception_type": _type_name(type(exc)),
                        "traceback": traceback.format_tb(exc.__traceback__),
                    }
                ) from exc
            for text in result.texts:
                node_bytes = node_id.encode()
                self.send_bytes(
                    BINARY_TEXT,
                    len(node_bytes).to_bytes(4, "big") + node_bytes + text.encode(),
                    None,
                    node_id,
                )
            total = len(result.ws_images)
            for index, image in enumerate(result.ws_images):
                if self._interrupt:
                    raise _Interrupted(node_id)
                progress.update(node_id, index, total)
                if self._supports_metadata(client):
                    self._send_preview_metadata(image, "image/png", job, node_id)
                self.send(
                    "progress",
                    {"value": index, "max": total, "prompt_id": job.prompt_id, "node": node_id},
                    client,
                    node_id,
                )
                if not self._supports_metadata(client):
                    self.send_bytes(BINARY_PREVIEW_IMAGE, (2).to_bytes(4, "big") + image, client, node_id)
        except _NodeFailed as failure:
            failure.details.setdefault(
                "current_inputs", self._current_inputs(info, inputs, values, job, node_id)
            )
            raise
        if result.ui:
            entry = {
                "meta": {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                },
                "output": result.ui,
            }
            self._ui_cache[cache_key] = entry
            if client is not None:
                self.send(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": result.ui,
                        "prompt_id": job.prompt_id,
                    },
                    client,
                    node_id,
                )
        results[node_id] = result.outputs
        self._outputs_cache[cache_key] = result.outputs
        progress.finish(node_id)

    async def _node_wait(self, delay_of: Callable[[], float], held: Callable[[], bool] | None) -> None:
        """Wait out a node's (or step's) delay and any hold, re-reading both whenever the faults change."""
        if held is None or not held():
            if delay_of() <= 0:
                return
        assert self._work is not None
        start = time.monotonic()
        while True:
            holding = held is not None and held()
            remaining = delay_of() - (time.monotonic() - start)
            if not holding and remaining <= 0:
                return
            self._work.clear()
            if holding:
                await self._work.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), remaining)

    def hold(self, *keys: str) -> None:
        """Hold matching nodes "running" (keys: class_type, node id or ``"<prompt_id>/<node_id>"``)."""
        self.faults.hold = set(self.faults.hold) | set(keys)

    def release(self, *keys: str) -> None:
        """Release held nodes (no keys: all of them)."""
        self.faults.hold = set(self.faults.hold) - set(keys) if keys else set()

    def _send_preview_metadata(self, image: bytes, mime: str, job: Job, node_id: str) -> None:
        metadata = json.dumps(
            {
                "node_id": node_id,
                "prompt_id": job.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
                "image_type": mime,
            }
        ).encode()
        self.send_bytes(
            BINARY_PREVIEW_IMAGE_WITH_METADATA,
            len(metadata).to_bytes(4, "big") + metadata + image,
            job.client_id,
            node_id,
        )

    _jpeg_cache: bytes | None = None

    def _preview_jpeg(self) -> bytes:
        if ComfyDouble._jpeg_cache is None:
            from io import BytesIO

            from PIL import Image

            buffer = BytesIO()
            Image.new("RGB", (64, 64), (90, 90, 90)).save(buffer, format="JPEG", quality=95)
            ComfyDouble._jpeg_cache = buffer.getvalue()
        return ComfyDouble._jpeg_cache

    @staticmethod
    def _current_inputs(
        info: Mapping[str, Any], inputs: Mapping[str, Any], values: Mapping[str, Any], job: Job, node_id: str
    ) -> dict[str, list[Any]]:
        declared = info.get("input") or {}
        known = set(declared.get("required") or {}) | set(declared.get("optional") or {})
        out: dict[str, list[Any]] = {}
        for name in inputs:
            if name in known:
                out[name] = [format_value(values.get(name))]
        for name, kind in (declared.get("hidden") or {}).items():
            if kind == "PROMPT":
                out[name] = [format_value(job.prompt)]
            elif kind == "EXTRA_PNGINFO":
                extra = job.extra_data.get("extra_pnginfo") if isinstance(job.extra_data, dict) else None
                out[name] = [format_value(extra)]
            elif kind == "UNIQUE_ID":
                out[name] = [node_id]
        return out

    # ------------------------------------------------------------------------------------ object_info

    def served_object_info(self) -> tuple[dict[str, Any], bytes]:
        """object_info as GET /object_info serves it (input-folder COMBOs current), and its JSON."""
        assert self.store is not None
        try:
            marker: Any = (os.stat(self.store.input_dir).st_mtime_ns, id(self.object_info))
        except FileNotFoundError:
            marker = (None, id(self.object_info))
        cached = self._served_info
        if cached is not None and cached[0][0] == marker:
            return cached[0][1], cached[1]
        info = with_input_files(self.object_info, self.store.input_files())
        body = json.dumps(info).encode()
        self._served_info = ((marker, info), body)  # type: ignore[assignment]
        return info, body


class _ExecutionList:
    """ComfyUI's execution order: a topological dissolve that runs ready output nodes first."""

    def __init__(
        self, prompt: Mapping[str, Any], object_info: Mapping[str, Any], is_cached: Callable[[str], bool]
    ):
        self.prompt = prompt
        self.object_info = object_info
        self.is_cached = is_cached
        self.pending: dict[str, None] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, None]] = {}
        self._outputs: dict[str, bool] = {}

    def _is_output(self, node_id: str) -> bool:
        found = self._outputs.get(node_id)
        if found is None:
            info = self.object_info.get(self.prompt[node_id]["class_type"]) or {}
            found = self._outputs[node_id] = info.get("output_node") is True
        return found

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = None
            self.block_count[current] = 0
            self.blocking[current] = {}
            for value in (self.prompt[current].get("inputs") or {}).values():
                if _is_link(value) and value[0] in self.prompt and not self.is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            if target not in self.blocking[source]:
                self.blocking[source][target] = None
                self.block_count[target] += 1

    def is_empty(self) -> bool:
        return not self.pending

    def pick(self) -> str:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:  # a cycle: ComfyUI reports "Dependency cycle detected"; run something anyway
            ready = list(self.pending)
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self.blocking[node_id]:
                if any(self._is_output(b) for b in self.blocking.get(blocked, ())):
                    return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        self.pending.pop(node_id, None)
        for blocked in self.blocking.pop(node_id, {}):
            if blocked in self.block_count:
                self.block_count[blocked] -= 1


# ------------------------------------------------------------------------------------------ thread


class ThreadedComfyDouble:
    """A :class:`ComfyDouble` on its own event loop in a background thread, for synchronous tests.

    ``with ComfyDouble().run_in_thread() as comfy:`` gives this object: ``comfy.url``, ``comfy.faults``
    (shared; setting a knob is thread-safe), ``comfy.stats``, ``comfy.jobs``, ``comfy.double`` and
    blocking versions of the hooks (``wait_for_state``, ``wait_until``, ``wait_for_prompts``,
    ``wait_for_idle``) and actions (``crash``, ``restart``, ``drop_sockets``, ``pause``, ``resume``).
    """

    def __init__(self, double: ComfyDouble):
        self.double = double
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ThreadedComfyDouble:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> ThreadedComfyDouble:
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.double.start())
            except BaseException as exc:  # report to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name="comfy-double", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self.call(self.double.stop(), timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = None
        self._thread = None

    def call(self, coro: Any, timeout: float | None = 30.0) -> Any:
        """Run a coroutine on the double's loop and return its result."""
        assert self._loop is not None, "not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None, "not started"
        self._loop.call_soon_threadsafe(fn, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.double, name)

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = 10.0) -> None:
        self.call(self.double.wait_until(predicate, timeout), None)

    def wait_for_state(self, prompt_id: str, *states: str, timeout: float | None = 10.0) -> Job:
        return self.call(self.double.wait_for_state(prompt_id, *states, timeout=timeout), None)

    def wait_for_prompts(self, count: int, timeout: float | None = 10.0) -> None:
        self.call(self.double.wait_for_prompts(count, timeout), None)

    def wait_for_idle(self, timeout: float | None = 10.0) -> None:
        self.call(self.double.wait_for_idle(timeout), None)

    def crash(self) -> None:
        self.call(self.double.crash())

    def restart(self) -> None:
        self.call(self.double.restart())

    def drop_sockets(self, client_id: str | None = None) -> int:
        return self.call(self.double.drop_sockets(client_id))

    def pause(self) -> None:
        self.double.pause()

    def resume(self) -> None:
        self.double.resume()

    def interrupt(self) -> None:
        self.call_soon(self.double.interrupt)
