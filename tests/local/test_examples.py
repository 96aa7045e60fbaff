"""Every example workflow validates and runs end to end against the double, with the right output kinds."""

from __future__ import annotations

import json

import pytest

from gpubridge.models import ArtifactKind, JobRequest, Workflow

from ..conftest import EXAMPLES, ROOT

EXPECTED = {
    "model_free_invert.json": [(ArtifactKind.IMAGE, "image/png", 256, 256)] * 2,
    "flux_schnell_t2i.json": [(ArtifactKind.IMAGE, "image/png", 1024, 1024)],
    "sdxl_img2img.json": [(ArtifactKind.IMAGE, "image/png", 1024, 1024)],
    "wan21_t2v.json": [(ArtifactKind.VIDEO, "video/mp4", None, None)],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_example_runs(local, name):
    wf = Workflow.load(EXAMPLES / name)
    inputs = {"input.png": ROOT / "examples" / "inputs" / "input.png"} if "LoadImage" in json.dumps(wf.to_api()) else {}
    result = await local.run(JobRequest(workflow=wf, inputs=inputs))
    got = [(a.kind, a.mime_type, a.width, a.height) for a in result.artifacts]
    assert got == EXPECTED[name]
    assert all(a.data for a in result.artifacts)
