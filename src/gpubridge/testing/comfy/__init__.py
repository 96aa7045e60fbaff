"""A ComfyUI test double: ComfyUI 0.3.64's HTTP + websocket API on a real loopback socket.

::

    from gpubridge.testing.comfy import ComfyDouble

    async with ComfyDouble(root=tmp_path) as comfy:          # comfy.url == "http://127.0.0.1:<port>"
        comfy.faults.node_delay = 0.2                        # fault injection, any time
        ...
        job = await comfy.wait_for_state(prompt_id, "success")

Behaviour follows recordings of a real server (``tests/fixtures/comfyui-contract``): routes with and
without ``/api``, status codes and bodies (quirks included), prompt validation
(:mod:`gpubridge.comfy.validate`), websocket frame order, queue/interrupt/history/cache semantics,
binary preview frames. Nodes "run" as deterministic placeholders with realistic image sizes.

Also runnable as a process: ``python -m gpubridge.testing.comfy --port 8188`` (or :func:`serve`).
"""

from ._double import ComfyDouble, DoubleEvent, Job, Stats, ThreadedComfyDouble
from ._faults import CrashFault, DropFault, ErrorFault, Faults
from ._objectinfo import DEFAULT_MODEL_FILES, MODEL_INPUTS, VHS_VIDEO_COMBINE, recorded_object_info
from ._serve import main, serve, serve_async

__all__ = [
    "DEFAULT_MODEL_FILES",
    "MODEL_INPUTS",
    "VHS_VIDEO_COMBINE",
    "ComfyDouble",
    "CrashFault",
    "DoubleEvent",
    "DropFault",
    "ErrorFault",
    "Faults",
    "Job",
    "Stats",
    "ThreadedComfyDouble",
    "main",
    "recorded_object_info",
    "serve",
    "serve_async",
]
