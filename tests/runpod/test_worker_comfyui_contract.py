"""worker-comfyui's documented API (its README, 5.x: "API Specification"), as a stock client of it reads
it: the request shape, and ``output.images`` as "a list of all generated images (excluding temporary ones)",
each ``{"filename", "type": "base64" | "s3_url", "data"}``, with ``output.errors`` a list of strings. Built
from the documented examples, not from our own double, so a drift in our worker's shape fails here."""

from __future__ import annotations

import base64
import json
from types import ModuleType
from typing import Any

from gpubridge.models import ArtifactKind
from gpubridge.providers.runpod._shapes import _artifacts_of

from .conftest import ROOT
from .test_worker import MEDIA, job

# The README's input example (its workflow cut to a runnable one; the images entry as documented).
PNG = (ROOT / "examples" / "inputs" / "input.png").read_bytes()
DOCUMENTED_INPUT = {
    "workflow": {
        "1": {"inputs": {"image": "input_image_1.png"}, "class_type": "LoadImage", "_meta": {"title": "Load"}},
        "2": {"inputs": {"images": ["1", 0], "filename_prefix": "ComfyUI"}, "class_type": "SaveImage"},
        "3": {"inputs": {"images": ["1", 0]}, "class_type": "PreviewImage"},
    },
    "images": [{"name": "input_image_1.png", "image": "data:image/png;base64," + base64.b64encode(PNG).decode()}],
}
# The README's output example.
DOCUMENTED_OUTPUT = {"images": [{"filename": "ComfyUI_00001_.png", "type": "base64", "data": "iVBORw0KGgoAAAANSUhEUg..."}]}


def stock_client_files(output: dict[str, Any]) -> list[tuple[str, bytes]]:
    """What a client written against the README does with a COMPLETED job's output."""
    files = []
    for image in output.get("images", []):
        assert set(DOCUMENTED_OUTPUT["images"][0]) <= set(image)  # filename, type, data: always there
        assert image["type"] in ("base64", "s3_url") and isinstance(image["filename"], str)
        if image["type"] == "base64":
            files.append((image["filename"], base64.b64decode(image["data"])))
    errors = output.get("errors", [])
    assert isinstance(errors, list) and all(isinstance(e, str) for e in errors)
    return files


async def test_the_documented_request_gives_the_documented_output_without_temp_previews(worker: ModuleType):
    out = await worker.handler(job(DOCUMENTED_INPUT))
    assert "error" not in out, out
    files = stock_client_files(out)
    assert len(files) == 1 and files[0][0].startswith("ComfyUI") and files[0][1].startswith(b"\x89PNG")
    assert all(i["filename"].startswith("ComfyUI") for i in out["images"])  # the PreviewImage (temp) is not there


async def test_animated_and_video_saves_reach_a_stock_client_in_output_images(worker: ModuleType):
    out = await worker.handler(job({"workflow": MEDIA}))
    files = stock_client_files(out)
    assert [name.rsplit(".", 1)[1] for name, _ in files] == ["webp", "webm"]
    json.dumps(out)  # plain JSON throughout
    # gpubridge's RunPod provider reads the same output with the kinds intact
    artifacts, _, _, _ = _artifacts_of(out)
    kinds = {a.mime_type: a.kind for a in artifacts if a.kind is not ArtifactKind.TEXT}
    assert kinds == {"image/webp": ArtifactKind.ANIMATION, "video/webm": ArtifactKind.VIDEO}
