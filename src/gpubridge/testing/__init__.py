"""Test helpers for gpubridge and its users.

:class:`ComfyDouble` is a stand-in ComfyUI server (HTTP + websocket, fault injection); see
:mod:`gpubridge.testing.comfy`. :class:`RunPodEndpointDouble` serves RunPod's v2 serverless API and runs
jobs through a worker handler (:mod:`gpubridge.testing.runpod`; it needs the ``runpod`` extra when it
runs a handler). Both need the ``testing`` extra (aiohttp, pillow).
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



def __getattr__(name: str):
    # Imported on first use: the RunPod double loads the runpod SDK's job runner.
    if name == "RunPodEndpointDouble":
        from .runpod import RunPodEndpointDouble

        return RunPodEndpointDouble
    raise AttributeError(name)


__all__ = [
    "RunPodEndpointDouble",
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
