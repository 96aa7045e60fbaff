"""Provider ``comfy``: Comfy Org's API v2, wherever it is served (Comfy Cloud, Comfy serverless deployments
at ``https://{deployment}.run.comfy.app``, or a self-hosted ComfyUI behind ``comfy-api-proxy``).

    GPUBRIDGE_COMFY_API_URL=https://my-deployment.run.comfy.app GPUBRIDGE_COMFY_API_KEY=... \\
        gpubridge run --provider comfy workflow.json

See :mod:`gpubridge.providers.comfy_api._runner` for how jobs are submitted, followed and fetched, and
:mod:`gpubridge.providers.comfy_api._errors` for the error mapping (``queue_full``/``deployment_not_ready``
retry after ``Retry-After``; ``deployment_stopped`` fails over; invalid workflows name their nodes).
"""

from __future__ import annotations

from typing import Any

from ...plugins import ProviderSpec, hookimpl
from ._errors import error_of, failure_of
from ._runner import ComfyApiRunner, ComfyApiSettings

__all__ = ["ComfyApiRunner", "ComfyApiSettings", "error_of", "failure_of"]


@hookimpl
def register_providers(register: Any) -> None:
    register(
        ProviderSpec(
            name="comfy",
            factory=ComfyApiRunner.from_settings,
            description="Comfy Org's API v2: Comfy Cloud, serverless deployments, comfy-api-proxy "
                        "(GPUBRIDGE_COMFY_API_URL, GPUBRIDGE_COMFY_API_KEY)",
            settings=ComfyApiSettings,
        )
    )
