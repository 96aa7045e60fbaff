"""Templates: manifests, parameter checks, versions, JSON Schema, proposals; no server needed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jsonschema
import pytest

from gpubridge.errors import ConfigError, ParamInvalid, TemplateNotFound
from gpubridge.models import JobRequest, RemoteJobRequest, Workflow
from gpubridge.shadow.compare import workflow_key
from gpubridge.templates import Template, TemplateRegistry
from gpubridge.templates.propose import propose, to_toml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
PNG = (ROOT / "examples" / "inputs" / "input.png").read_bytes()

LORA_WF = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
    "2": {"class_type": "LoraLoader", "_meta": {"title": "Style"},
          "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "none.safetensors",
                     "strength_model": 1.0, "strength_clip": 1.0}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 1]}},
    "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "5": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0, "model": ["2", 0],
                                               "positive": ["3", 0], "negative": ["3", 0],
                                               "latent_image": ["4", 0]}},
}
LORA_MANIFEST = {
    "params": {
        "style": {"type": "lora", "bind": "Style", "choices": ["ink.safetensors", "oil.safetensors"],
                  "min": 0.0, "max": 2.0, "default": "ink.safetensors"},
        "seed": {"type": "int", "bind": "5.seed", "default": "random", "min": 0, "max": 1000},
        "sampler": {"type": "enum", "bind": "5.sampler_name", "choices": ["euler", "dpmpp_2m"], "default": "euler"},
        "face": {"type": "image", "bind": "4.image"},
        "hires": {"type": "bool", "bind": "5.denoise", "default": True},
    },
}


@pytest.fixture(scope="module")
def registry() -> TemplateRegistry:
    return TemplateRegistry.load(WORKFLOWS, models=ROOT / "modal_app" / "models.toml")


def test_the_shipped_examples_are_templates(registry: TemplateRegistry):
    assert set(registry) == {"model_free_invert", "flux_schnell_t2i", "sdxl_img2img", "wan21_t2v"}
    assert registry["wan21_t2v"].outputs[0].kind == "video"
    assert "flux1-schnell.safetensors" in registry["flux_schnell_t2i"].models


def test_params_bind_to_the_workflow_and_record_what_was_used(registry: TemplateRegistry):
    req = registry.request("model_free_invert", {"color": 255, "width": 32}, timeout=30)
    assert req.workflow["1"]["inputs"] == {"width": 32, "height": 256, "batch_size": 2, "color": 255}
    assert (req.template, req.template_version, req.timeout) == (
        "model_free_invert", registry["model_free_invert"].version, 30)
    assert req.params == {"width": 32, "height": 256, "color": 255}
    # the template's own workflow is never changed by a render
    assert registry["model_free_invert"].workflow["1"]["inputs"]["color"] == 16744448
    # a rendered request survives the wire (the gateway stores it as JSON)
    again = JobRequest.model_validate_json(req.model_dump_json())
    assert (again.workflow.root, again.template_version, again.params) == (req.workflow.root,
                                                                           req.template_version, req.params)


@pytest.mark.parametrize(("params", "name", "words"), [
    ({"colour": 1}, "colour", "did you mean 'color'"),
    ({"color": "255"}, "color", "expected an integer"),
    ({"color": True}, "color", "expected an integer"),
    ({"color": 2**24}, "color", "above the maximum 16777215"),
    ({"width": 0}, "width", "below the minimum 1"),
    ({"width": 1.5}, "width", "expected an integer"),
])
def test_a_bad_parameter_is_named(registry: TemplateRegistry, params, name, words):
    with pytest.raises(ParamInvalid) as info:
        registry.request("model_free_invert", params)
    assert list(info.value.params) == [name] and words in info.value.params[name]
    assert name in str(info.value) and info.value.template == "model_free_invert"
    assert info.value.to_dict()["params"] == info.value.params


def test_every_bad_parameter_is_reported_at_once(registry: TemplateRegistry):
    with pytest.raises(ParamInvalid) as info:
        registry.request("sdxl_img2img", {"cfg": float("nan"), "denoise": "x", "prompt": 7})
    assert set(info.value.params) == {"cfg", "denoise", "prompt", "image"}
    assert info.value.params["image"] == "required"


def test_lora_enum_bool_random_and_image_types():
    tpl = Template.from_parts("styled", LORA_WF, LORA_MANIFEST)
    r = tpl.render({"style": {"name": "oil.safetensors", "strength": 0.5}, "face": PNG, "sampler": "dpmpp_2m",
                    "hires": False}, rng=random.Random(3))
    lora = r.workflow["2"]["inputs"]
    assert (lora["lora_name"], lora["strength_model"], lora["strength_clip"]) == ("oil.safetensors", 0.5, 0.5)
    assert r.workflow["4"]["inputs"]["image"] == "face.png" and r.inputs["face.png"].data == PNG
    assert r.workflow["5"]["inputs"]["sampler_name"] == "dpmpp_2m" and r.workflow["5"]["inputs"]["denoise"] is False
    assert 0 <= r.params["seed"] <= 1000 and r.workflow["5"]["inputs"]["seed"] == r.params["seed"]
    assert tpl.render({"face": PNG}, rng=random.Random(4)).params["seed"] != r.params["seed"]  # drawn per job
    assert tpl.render({"face": PNG, "seed": 9}).params["seed"] == 9
    with pytest.raises(ParamInvalid) as info:
        tpl.render({"face": PNG, "style": "evil.safetensors", "sampler": "ddim", "hires": 1,
                    "seed": 1001})
    assert set(info.value.params) == {"style", "sampler", "hires", "seed"}
    with pytest.raises(ParamInvalid) as info:
        tpl.render({"face": PNG, "style": {"name": "ink.safetensors", "strength": 3}})
    assert "above the maximum 2" in info.value.params["style"]


def test_remote_images_are_base64_or_urls_never_a_server_path(tmp_path: Path):
    tpl = Template.from_parts("styled", LORA_WF, LORA_MANIFEST)
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    with pytest.raises(ParamInvalid) as info:
        tpl.render({"face": str(secret)}, remote=True)
    assert "not a usable image" in info.value.params["face"]
    assert tpl.render({"face": str(secret)}).inputs["face.png"].data == PNG  # a caller's own path, locally
    import base64

    by_data = tpl.render({"face": base64.b64encode(PNG).decode()}, remote=True)
    assert by_data.inputs["face.png"].data == PNG
    by_url = tpl.render({"face": "https://example.com/in/face.jpg?x=1"}, remote=True)
    assert by_url.inputs["face.jpg"].url == "https://example.com/in/face.jpg?x=1"
    assert by_url.workflow["4"]["inputs"]["image"] == "face.jpg"


@pytest.mark.parametrize(("change", "words"), [
    ({"params": {"x": {"type": "int", "bind": "Nope.width"}}}, "No node 'Nope'"),
    ({"params": {"x": {"type": "int", "bind": "Canvas.widht"}}}, "has no input 'widht'"),
    ({"params": {"x": {"type": "int", "bind": "Invert.image"}}}, "is a link, not a value"),
    ({"params": {"x": {"type": "int", "bind": "Canvas.width", "default": 5, "max": 4}}}, "above the maximum"),
    ({"params": {"x": {"type": "integer", "bind": "Canvas.width"}}}, "type 'integer' is not one of"),
    ({"params": {"x": {"type": "enum", "bind": "Canvas.width"}}}, "needs a non-empty list of 'choices'"),
    ({"params": {"x": {"type": "string", "bind": "Canvas.width", "defualt": "a"}}}, "unknown key(s) defualt"),
    ({"outputs": [{"node": "Nowhere"}]}, "output 'Nowhere'"),
    ({"paramz": {}}, "unknown key(s) paramz"),
])
def test_a_broken_manifest_is_refused_naming_the_problem(change, words):
    wf = Workflow.load(WORKFLOWS / "model_free_invert.json")
    with pytest.raises(ConfigError) as info:
        Template.from_parts("broken", wf, change)
    assert words in str(info.value) and "broken" in str(info.value)


def test_the_registry_refuses_a_folder_with_a_bad_template_or_unknown_model(tmp_path: Path):
    shutil.copy(WORKFLOWS / "model_free_invert.json", tmp_path / "a.json")
    (tmp_path / "a.toml").write_text('models = ["nowhere.safetensors"]\n')
    assert len(TemplateRegistry.load(tmp_path)) == 1  # no model manifest: models are not checked
    with pytest.raises(ConfigError, match="'nowhere.safetensors' not in the model manifest"):
        TemplateRegistry.load(tmp_path, models=ROOT / "modal_app" / "models.toml")
    (tmp_path / "a.toml").write_text('[params.c]\ntype = "int"\nbind = "Canvas.colr"\n')
    with pytest.raises(ConfigError, match=r"a\.toml.*parameter 'c'.*has no input 'colr'"):
        TemplateRegistry.load(tmp_path)
    with pytest.raises(TemplateNotFound, match="did you mean 'model_free_invert'"):
        TemplateRegistry.load(WORKFLOWS)["model_free_invrt"]


def test_the_version_is_the_content_of_workflow_and_manifest(tmp_path: Path):
    for name in ("model_free_invert.json", "model_free_invert.toml"):
        shutil.copy(WORKFLOWS / name, tmp_path / name)
    first = Template.load(tmp_path / "model_free_invert.toml").version
    manifest = tmp_path / "model_free_invert.toml"
    manifest.write_text("# a comment changes nothing\n" + manifest.read_text())
    assert Template.load(manifest).version == first
    wf = json.loads((tmp_path / "model_free_invert.json").read_text())
    wf["2"]["class_type"] = "ImageInvert"  # the same
    wf["1"]["inputs"]["batch_size"] = 1   # a change to the graph
    (tmp_path / "model_free_invert.json").write_text(json.dumps(wf))
    second = Template.load(manifest).version
    assert second != first
    manifest.write_text(manifest.read_text().replace("max = 1024", "max = 2048", 1))
    assert Template.load(manifest).version not in (first, second)
    # and shadow records carry it: jobs from a template group by name@version
    req = TemplateRegistry.load(tmp_path).request("model_free_invert")
    assert workflow_key(req) == f"model_free_invert@{Template.load(manifest).version}"


def test_the_json_schema_agrees_with_the_checks(registry: TemplateRegistry):
    for tpl in registry.values():
        schema = tpl.json_schema()
        jsonschema.Draft202012Validator.check_schema(schema)
        defaults = {n: p.default for n, p in tpl.params.items() if not p.required}
        defaults.update({n: "https://example.com/a.png" for n, p in tpl.params.items() if p.required})
        jsonschema.validate(defaults, schema)
        tpl.render(defaults, remote=True)
    schema = registry["model_free_invert"].json_schema()
    for bad in ({"color": -1}, {"color": "red"}, {"colour": 1}, {"width": 2.5}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ParamInvalid):
            registry.request("model_free_invert", bad)
    assert registry["sdxl_img2img"].json_schema()["required"] == ["image"]


def test_job_request_renders_a_template_from_the_configured_folder(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_TEMPLATES", str(WORKFLOWS))
    req = JobRequest(template="model_free_invert", params={"color": 7}, tags={"who": "t"})
    assert req.workflow["1"]["inputs"]["color"] == 7 and req.tags == {"who": "t"}
    with pytest.raises(ParamInvalid):
        JobRequest(template="model_free_invert", params={"color": "7"})
    with pytest.raises(TemplateNotFound):
        JobRequest(template="nope")


def test_the_wire_request_takes_a_workflow_or_a_template(registry: TemplateRegistry):
    ok = RemoteJobRequest.model_validate({"template": "model_free_invert", "params": {"color": 1}})
    assert ok.to_request(registry).workflow["1"]["inputs"]["color"] == 1
    for body in ({}, {"params": {"a": 1}, "workflow": {"1": {"class_type": "X", "inputs": {}}}},
                 {"template": "model_free_invert", "workflow": {"1": {"class_type": "X", "inputs": {}}}},
                 {"template": "../etc"}):
        with pytest.raises(ValueError):
            RemoteJobRequest.model_validate(body)
    with pytest.raises(TemplateNotFound):
        RemoteJobRequest.model_validate({"template": "model_free_invert"}).to_request(None)


def test_propose_finds_what_a_user_usually_wants():
    flux = propose(Workflow.load(WORKFLOWS / "flux_schnell_t2i.json"))
    assert {"prompt", "seed", "steps", "width", "height"} <= set(flux["params"])
    assert flux["params"]["prompt"]["bind"] == "Prompt.text" and flux["params"]["seed"]["bind"] == "KSampler.seed"
    assert flux["outputs"] == [{"node": "Save", "kind": "image"}]
    sdxl = propose(Workflow.load(WORKFLOWS / "sdxl_img2img.json"))
    assert sdxl["params"]["negative_prompt"]["bind"] == "Negative Prompt.text"  # by the sampler's input
    assert sdxl["params"]["image"]["type"] == "image" and "denoise" in sdxl["params"]
    lora = propose(Workflow.load(LORA_WF))
    assert lora["params"]["lora"]["bind"] == "Style" and lora["models"] == ["base.safetensors", "none.safetensors"]
    # what it proposes is a valid template
    text = to_toml(flux, workflow_file="x.json")
    import tomllib

    Template.from_parts("flux_t2i", Workflow.load(WORKFLOWS / "flux_schnell_t2i.json"), tomllib.loads(text))
