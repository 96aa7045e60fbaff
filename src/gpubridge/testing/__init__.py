"""Test helpers for gpubridge and its users.

:class:`ComfyDouble` is a stand-in ComfyUI server (HTTP + websocket, fault injection); see
:mod:`gpubridge.testing.comfy`. It needs the ``testing`` extra (aiohttp, pillow).
"""

from .comfy import (
    DEFAULT_MODEL_FILES,
    ComfyDouble,
    CrashFault,
    DoubleEvent,
    DropFault,
    ErrorFault,
    Faults,
    Job,
    Stats,
    ThreadedComfyDouble,
    serve,
)

__all__ = [
    "DEFAULT_MODEL_FILES",
    "ComfyDouble",
    "CrashFault",
    "DoubleEvent",
    "DropFault",
    "ErrorFault",
    "Faults",
    "Job",
    "Stats",
    "ThreadedComfyDouble",
    "serve",
]
