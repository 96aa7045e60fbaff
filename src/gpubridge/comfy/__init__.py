"""gpubridge.comfy: ComfyUI's protocol, in one place.

- :class:`ComfyClient` talks to one ComfyUI server (HTTP + websocket) and follows jobs to their result.
- :mod:`~gpubridge.comfy.protocol` holds the wire formats as pure functions.
- :func:`validate_prompt` checks a prompt against ``/object_info`` the way ComfyUI does.
- :class:`ComfyProcess` launches and supervises a ComfyUI server process.

The local provider, the Modal app and the RunPod worker all use this package; nothing else in gpubridge
speaks ComfyUI's protocol.
"""

from .client import ComfyClient, ComfyJob, unreachable_message
from .files import JobFiles
from .process import ComfyProcess, ComfyStartError
from .validate import PromptValidator, ValidationResult, validate_prompt

__all__ = [
    "ComfyClient",
    "ComfyJob",
    "JobFiles",
    "ComfyProcess",
    "ComfyStartError",
    "PromptValidator",
    "ValidationResult",
    "validate_prompt",
    "unreachable_message",
]
