"""worker-comfyui's documented API (its README, 5.x: "API Specification"), as a stock client of it reads
it: the request shape, and ``output.images`` as "a list of all generated images (excluding temporary ones)",
each ``{"filename", "type": "base64" | "s3_url", "data"}``, with ``output.errors`` a list of strings. Built
from the documented examples, not from our own double, so a drift in our worker's shape fails here."""

from __future__ import annotations

import base64
import json
import re
from types import ModuleType
from typing import Any

from gpubridge.errors import JobFailed
from gpubridge.models import ArtifactKind
from gpubridge.providers.runpod._shapes import _artifacts_of, parse_failure
from gpubridge.testing import ErrorFault

from .conftest import ROOT, WORKFLOWS
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


# worker-comfyui's failure shape (its handler.py, 5.x): {"error": "<text>", "details": ["<line>", ...]}, and for a
# node that raised, the line "Workflow execution error: Node Type: <T>, Node ID: <N>, Message: <M>".
WC_EXEC_LINE = re.compile(r"^Workflow execution error: Node Type: (?P<type>[^,]+), Node ID: (?P<id>[^,]+), Message: ")


def stock_client_failure(out: dict[str, Any]) -> str:
    """What a client written against worker-comfyui does with a failure: print the error and its details."""
    assert isinstance(out["error"], str)
    details = out.get("details", [])
    assert isinstance(details, list) and all(isinstance(d, str) for d in details), details
    return "\n".join([out["error"], *details])


async def test_a_node_failure_reaches_a_stock_client_as_a_list_of_strings(worker: ModuleType, comfy: Any):
    comfy.faults.error = ErrorFault(class_type="ImageInvert", exception_message="CUDA out of memory")
    out = await worker.handler(job({"workflow": json.loads((WORKFLOWS / "model_free_invert.json").read_text())}))
    text = stock_client_failure(out)
    line = WC_EXEC_LINE.match(out["details"][0])
    assert line and line.group("type") == "ImageInvert" and "CUDA out of memory" in text
    # gpubridge's provider reads the typed fields beside them and types the error
    error = parse_failure({"status": "FAILED", "error": out["error"], "output": {
        k: v for k, v in out.items() if k != "error"}})
    assert isinstance(error, JobFailed) and error.node_type == "ImageInvert" and error.node_id == line.group("id")


async def test_a_validation_failure_names_each_node_in_details(worker: ModuleType):
    bad = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": 7}},
           "3": {"class_type": "NoSuchNode", "inputs": {}}}
    out = await worker.handler(job({"workflow": bad}))
    text = stock_client_failure(out)
    assert out["error"].startswith("Workflow validation failed") and "NoSuchNode" in text
    assert out["gpubridge_error"]["exception_type"] == "WorkflowInvalid"
