from __future__ import annotations

import pytest

from gpubridge.providers.local import LocalRunner
from gpubridge.testing import ComfyDouble


@pytest.fixture
async def comfy(tmp_path):
    async with ComfyDouble(root=tmp_path / "comfy") as double:
        yield double


@pytest.fixture
async def local(comfy):
    runner = LocalRunner(comfy.url, reconnect_timeout=2.0, cancel_wait=10.0)
    yield runner
    await runner.aclose()
