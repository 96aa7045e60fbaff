"""ComfyUI custom node that lets a container snapshotted on CPU use its GPU after restore.

Modal snapshots the container after ComfyUI started, while no GPU is attached (see prestartup_script.py
for the patch that makes that start possible). After restore, the app calls ``POST /cuda/set_device``
once, from ``@modal.enter(snap=False)``, and ComfyUI's first CUDA use then finds the device. This follows
Modal's own ComfyUI memory-snapshot example.
"""

import os

from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


@PromptServer.instance.routes.post("/cuda/set_device")
async def set_current_device(request):
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("GPUBRIDGE_CUDA_DEVICE", "0")
    return web.json_response({"status": "success", "device": os.environ["CUDA_VISIBLE_DEVICES"]})
