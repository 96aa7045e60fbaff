from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from gpubridge.errors import WorkflowFormatError, WorkflowInputError
from gpubridge.models import (
    Artifact,
    ArtifactKind,
    InputFile,
    JobRequest,
    JobResult,
    JobState,
    Progress,
    Workflow,
    artifact_kind,
)

from .conftest import EXAMPLES, FIXTURES

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def flux() -> Workflow:
    return Workflow.load(EXAMPLES / "flux_schnell_t2i.json")


def test_load_from_path_text_bytes_and_dict_agree():
    path = EXAMPLES / "model_free_invert.json"
    text = path.read_text()
    a, b, c, d = Workflow.load(path), Workflow.load(str(path)), Workflow.load(text), Workflow.load(text.encode())
    e = Workflow.load(json.loads(text))
    assert a.to_api() == b.to_api() == c.to_api() == d.to_api() == e.to_api()
    assert a.class_type("3") == "SaveImage"


def test_prompt_request_body_is_unwrapped():
    body = {"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}}}, "client_id": "x"}
    assert list(Workflow.load(body)) == ["1"]


def test_ui_format_is_refused_with_export_api_hint():
    ui = {"last_node_id": 2, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": [], "version": 0.4}
    with pytest.raises(WorkflowFormatError, match=r"Export \(API\)"):
        Workflow.load(ui)
    with pytest.raises(WorkflowFormatError, match=r"Export \(API\)"):
        JobRequest(workflow=ui)  # the typed error is not swallowed by pydantic


@pytest.mark.parametrize(
    "doc, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object of nodes"),
        ('{"1": "EmptyImage"}', "not a node object"),
    ],
)
def test_malformed_documents(doc: str, match: str):
    with pytest.raises(WorkflowFormatError, match=match):
        Workflow.load(doc)


def test_missing_file(tmp_path: Path):
    with pytest.raises(WorkflowFormatError, match="not found"):
        Workflow.load(tmp_path / "nope.json")


def test_set_by_id_title_and_class():
    wf = flux()
    wf.set("4.text", "a fox")
    wf.set("KSampler.seed", 7)  # title == class here
    wf.set("Size.width", 512)  # by title
    wf.set("VAELoader.vae_name", "other.safetensors")  # unique class type, title differs
    api = wf.to_api()
    assert api["4"]["inputs"]["text"] == "a fox"
    assert api["7"]["inputs"]["seed"] == 7
    assert api["6"]["inputs"]["width"] == 512
    assert api["3"]["inputs"]["vae_name"] == "other.safetensors"


def test_set_errors_name_the_node_and_input():
    wf = flux()
    with pytest.raises(WorkflowInputError, match=r"Node 7 \(KSampler\) has no input 'sede'.*'seed'"):
        wf.set("KSampler.sede", 1)
    with pytest.raises(WorkflowInputError, match=r"No node 'KSamplr'.*'KSampler'"):
        wf.set("KSamplr.seed", 1)
    with pytest.raises(WorkflowInputError, match="NODE.input"):
        wf.set("seed", 1)
    ambiguous = Workflow.load(EXAMPLES / "sdxl_img2img.json")
    with pytest.raises(WorkflowInputError, match="several nodes"):
        ambiguous.set("CLIPTextEncode.text", "x")


def test_with_values_copies():
    wf = flux()
    other = wf.with_values({"4.text": "changed"})
    assert other.to_api()["4"]["inputs"]["text"] == "changed"
    assert wf.to_api()["4"]["inputs"]["text"] != "changed"


def test_input_file_sources(tmp_path: Path):
    path = tmp_path / "face.png"
    path.write_bytes(PNG)
    b64 = base64.b64encode(PNG).decode()
    for source in (PNG, path, str(path), b64, f"data:image/png;base64,{b64}"):
        f = InputFile.coerce(source)
        assert f.data == PNG and f.mime_type == "image/png"
    url = InputFile.coerce("https://example.com/x.png")
    assert url.url == "https://example.com/x.png" and url.data is None


@pytest.mark.parametrize("bad", ["nope", "data:image/png,notbase64", "data:image/png;base64,!!!", str(Path("/no/such.png"))])
def test_input_file_rejects_garbage(bad: str):
    with pytest.raises(WorkflowInputError):
        InputFile.coerce(bad)


def test_request_rejects_path_like_input_names():
    with pytest.raises(WorkflowInputError, match="plain file name"):
        JobRequest(workflow=flux(), inputs={"../x.png": PNG})


def test_request_json_round_trip_keeps_bytes():
    req = JobRequest(workflow=flux(), inputs={"x.png": PNG}, timeout=30, tags={"user": "u1"})
    again = JobRequest.model_validate_json(req.model_dump_json())
    assert again.inputs["x.png"].data == PNG
    assert again.workflow.to_api() == req.workflow.to_api()
    assert again.request_id == req.request_id


def test_payload_size_counts_base64_inputs():
    small = JobRequest(workflow=flux())
    big = JobRequest(workflow=flux(), inputs={"x.png": b"\x89PNG" + b"0" * 3000})
    assert big.payload_size() - small.payload_size() >= 4000


def test_artifact_kind_comes_from_mime():
    assert artifact_kind("image/png") is ArtifactKind.IMAGE
    assert artifact_kind("image/webp", animated=True) is ArtifactKind.ANIMATION
    assert artifact_kind("image/gif") is ArtifactKind.ANIMATION
    assert artifact_kind("video/mp4") is ArtifactKind.VIDEO
    assert artifact_kind("audio/flac") is ArtifactKind.AUDIO
    assert artifact_kind(None) is ArtifactKind.FILE


def test_result_save_keeps_names_unique(tmp_path: Path):
    arts = [
        Artifact(node_id="9", kind=ArtifactKind.IMAGE, filename="a.png", data=b"1"),
        Artifact(node_id="9", kind=ArtifactKind.IMAGE, filename="sub/a.png", data=b"2"),
        Artifact(node_id="4", kind=ArtifactKind.TEXT, text="hello"),
    ]
    result = JobResult(job_id="j", provider="p", artifacts=arts)
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["a.png", "a_1.png", "node4_text.txt"]
    assert [p.read_bytes() for p in paths] == [b"1", b"2", b"hello"]
    summary = result.summary()
    assert all("data" not in a for a in summary["artifacts"])
    assert result.texts == ["hello"] and len(result.images) == 2


def test_repr_hides_bytes():
    art = Artifact(node_id="1", kind=ArtifactKind.IMAGE, data=b"x" * 10_000)
    assert "xxxx" not in repr(art)


def test_progress_fraction():
    assert Progress(value=5, max=10).fraction == 0.5
    assert Progress(nodes_done=2, nodes_total=4, value=1, max=2).fraction == pytest.approx(0.625)
    assert Progress().fraction is None
    assert JobState.CANCELLED.is_terminal and not JobState.RUNNING.is_terminal


def test_contract_fixture_prompt_loads():
    recorded = json.loads((FIXTURES / "comfyui-contract" / "prompt_success.json").read_text())
    wf = Workflow.load(recorded["request"]["json"])
    assert wf.nodes_of_type("EmptyImage") == ["1", "4"]
