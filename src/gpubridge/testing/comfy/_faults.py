"""Fault injection for the ComfyUI double.

Every knob can be changed at any time, from Python (``comfy.faults.node_delay = 0.5``) or over HTTP
(``POST /gpubridge/faults`` with a JSON object of the fields to change; ``null`` clears one). A job
reads the knobs at each node boundary and sampler step, so a change lands on running jobs too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CrashFault", "DropFault", "ErrorFault", "Faults"]


def _matches(class_type: str | None, node_id: str | None, node_class: str, node: str) -> bool:
    if class_type is not None and class_type != node_class:
        return False
    if node_id is not None and str(node_id) != str(node):
        return False
    return True


@dataclass
class ErrorFault:
    """Make a node fail at execution with ComfyUI's ``execution_error`` frame and history entry.

    Matches nodes by ``class_type`` and/or ``node_id`` (both ``None``: every node). The error is raised
    after the node's delay, or at sampler step ``at_step``. ``times``: how many failures before the
    fault disarms itself (``None``: never). ``exception_type`` is reported as is (ComfyUI gives the full
    type name, e.g. ``"torch.OutOfMemoryError"``, which also gets ComfyUI's OOM tips appended to the
    message); ``exception_message`` gets ComfyUI's trailing ``"\\n"``.
    """

    class_type: str | None = None
    node_id: str | None = None
    exception_type: str = "RuntimeError"
    exception_message: str = "Injected failure (gpubridge ComfyUI double)"
    traceback: list[str] | None = None
    at_step: int | None = None
    times: int | None = None

    def matches(self, class_type: str, node_id: str) -> bool:
        return _matches(self.class_type, self.node_id, class_type, node_id)


@dataclass
class CrashFault:
    """Kill the server when a matching node starts (or at sampler step ``at_step``).

    In-process the server stops answering: sockets are aborted and the port is closed. Run as a process
    (``python -m gpubridge.testing.comfy``) the process exits with status 70. ``class_type``/``node_id``
    both ``None`` crash on the first node of the next job.
    """

    class_type: str | None = None
    node_id: str | None = None
    at_step: int | None = None

    def matches(self, class_type: str, node_id: str) -> bool:
        return _matches(self.class_type, self.node_id, class_type, node_id)


@dataclass
class DropFault:
    """Abort websocket connections abruptly (no close frame) after a given frame.

    After the ``count``-th frame of type ``after`` (a ws message type such as ``"executing"``,
    ``"progress"``, ``"executed"``, ``"execution_start"``; ``"binary"`` for binary frames; ``"any"`` for
    every frame) sent to a socket, that socket's TCP connection is aborted. ``client_id`` restricts it
    to one client; ``node_id`` to frames about that node. ``times``: how many sockets to drop before the
    fault disarms itself. Jobs keep running and their history is still written.
    """

    after: str = "executing"
    count: int = 1
    client_id: str | None = None
    node_id: str | None = None
    times: int | None = 1


@dataclass
class Faults:
    """The double's fault knobs. See the module doc; every field may be changed at any time.

    - ``node_delay``: seconds each executed node takes (not interruptible: an interrupt lands at the
      next node boundary, like a real long node). ``delays`` overrides it per class_type or node id.
      Delays are re-read while they run: lowering one lets a waiting node finish at once.
    - ``hold``: nodes that stay "running" until their key is removed (assign a new set, or use
      ``comfy.hold()``/``comfy.release()``); a key is a class_type, a node id, or ``"<prompt_id>/<node_id>"``.
      Like a long node, a held node is not interrupted; the interrupt lands when it is released.
    - ``step_delay``: seconds per sampler step (nodes with a ``steps`` input and the like report
      ``progress`` per step; an interrupt lands at the next step). ``step_delays`` overrides it per
      class_type or node id.
    - ``error``, ``crash``, ``drop_ws``: see :class:`ErrorFault`, :class:`CrashFault`, :class:`DropFault`.
    - ``paused``: a stuck queue; the worker takes no new job (pending jobs stay pending) until unset.
    - ``hold_prompts``: ``POST /prompt`` reads the body, then waits until unset before validating and
      queueing it (ComfyUI validates asynchronously; a slow validation, or a POST still in flight).
    - ``output_size``: every file a node writes (outputs, previews) is padded to at least this many bytes with
      bytes that do not compress: a 30 MB video, a 200 MB artifact (0: the placeholder's own size).
    - ``history_delay``: seconds between ``execution_success`` and writing the history entry (ComfyUI's
      race window, where ``GET /history/{id}`` still answers ``{}``). ``hold_history``: keep that window
      open until unset (deterministic).
    """

    node_delay: float = 0.0
    step_delay: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)
    step_delays: dict[str, float] = field(default_factory=dict)
    hold: set[str] = field(default_factory=set)
    error: ErrorFault | None = None
    crash: CrashFault | None = None
    drop_ws: DropFault | None = None
    paused: bool = False
    history_delay: float = 0.0
    hold_history: bool = False
    hold_prompts: bool = False
    output_size: int = 0

    _listener: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        listener = self.__dict__.get("_listener")
        if listener is not None and not name.startswith("_"):
            listener()

    def delay_for(self, class_type: str, node_id: str) -> float:
        delays = self.delays
        if delays:
            if node_id in delays:
                return float(delays[node_id])
            if class_type in delays:
                return float(delays[class_type])
        return self.node_delay

    def holds(self, prompt_id: str, class_type: str, node_id: str) -> bool:
        hold = self.hold
        return bool(hold) and (class_type in hold or node_id in hold or f"{prompt_id}/{node_id}" in hold)

    def step_delay_for(self, class_type: str, node_id: str) -> float:
        delays = self.step_delays
        if delays:
            if node_id in delays:
                return float(delays[node_id])
            if class_type in delays:
                return float(delays[class_type])
        return self.step_delay

    def reset(self) -> None:
        """Back to no faults."""
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, default)

    # ------------------------------------------------------------------------------------ JSON form

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            elif isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a JSON patch: ``{"node_delay": 0.5, "error": {"class_type": "KSampler"}, "crash": null}``."""
        kinds = {"error": ErrorFault, "crash": CrashFault, "drop_ws": DropFault}
        names = {f.name for f in dataclasses.fields(self) if not f.name.startswith("_")}
        for name, value in changes.items():
            if name not in names:
                raise ValueError(f"unknown fault {name!r}; known: {sorted(names)}")
            if name in kinds and value is not None:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{name} must be an object or null")
                value = kinds[name](**value)
            elif name == "hold":
                value = {str(v) for v in (value or ())}
            elif name in ("delays", "step_delays"):
                value = {str(k): float(v) for k, v in (value or {}).items()}
            elif name in ("node_delay", "step_delay", "history_delay"):
                value = float(value or 0.0)
            elif name in ("paused", "hold_history", "hold_prompts"):
                value = bool(value)
            elif name == "output_size":
                value = max(0, int(value or 0))
            setattr(self, name, value)
