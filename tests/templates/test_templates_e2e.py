"""Templated jobs where jobs go: the CLI, the gateway (a real `gpubridge serve`), the Modal job API, the
RunPod worker, and shadow records; all against the ComfyUI double on loopback."""

from __future__ import annotations

import io
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.shadow.runner import ShadowRunner
from gpubridge.shadow.store import MemorySink
from gpubridge.templates import TemplateRegistry
from gpubridge.testing import ComfyDouble

from ..gateway.helpers import AUTH, Gateway, until
from ..modal.conftest import TOKEN as MODAL_TOKEN
from ..modal.conftest import serve_api
from ..shadow.helpers import ImageRunner

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
cli = CliRunner()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with ComfyDouble(root=tmp_path_factory.mktemp("comfy"), cache=False).run_in_thread() as double:
        yield double


@pytest.fixture(scope="module")
def registry() -> TemplateRegistry:
    return TemplateRegistry.load(WORKFLOWS)


def colour_of(png: bytes) -> tuple[int, ...]:
    return Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))


def test_templates_run_writes_the_outputs_with_the_parameter_applied(comfy, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the default folder is ./workflows
    out = tmp_path / "out"
    res = cli.invoke(app, ["templates", "run", "model_free_invert", "--param", "color=255", "--out", str(out),
                           "--url", comfy.url, "--provider", "local"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    files = sorted(out.iterdir())
    assert len(files) == 2
    assert colour_of(files[0].read_bytes()) == (255, 255, 0)  # EmptyImage 0x0000FF, inverted


def test_a_bad_parameter_exits_2_naming_it_and_submits_nothing(comfy, tmp_path: Path):
    before = comfy.stats.prompts_accepted
    res = cli.invoke(app, ["templates", "run", "model_free_invert", "--dir", str(WORKFLOWS), "--param",
                           "color=red", "--param", "size=3", "--url", comfy.url, "--json"])
    assert res.exit_code == 2, res.output
    err = json.loads(res.stdout)["error"]
    assert err["type"] == "ParamInvalid" and set(err["params"]) == {"color", "size"}
    res = cli.invoke(app, ["templates", "run", "model_free_invert", "--dir", str(WORKFLOWS), "--param",
                           "color=99999999", "--url", comfy.url])
    assert res.exit_code == 2 and "'color'" in res.output and "above the maximum" in res.output
    assert comfy.stats.prompts_accepted == before


def test_templates_new_then_validate_list_and_show(tmp_path: Path):
    folder = tmp_path / "tpl"
    res = cli.invoke(app, ["templates", "new", "flux_t2i", "--from", str(WORKFLOWS / "flux_schnell_t2i.json"),
                           "--dir", str(folder)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in folder.iterdir()} == {"flux_t2i.json", "flux_t2i.toml"}
    for name in ("prompt", "seed", "steps", "width", "height"):
        assert f"[params.{name}]" in res.stdout
    res = cli.invoke(app, ["templates", "validate", "--dir", str(folder), "--models",
                           str(ROOT / "modal_app" / "models.toml")])
    assert res.exit_code == 0 and "1 template(s)" in res.output, res.output
    listed = json.loads(cli.invoke(app, ["templates", "list", "--dir", str(folder), "--json"]).stdout)
    assert [t["name"] for t in listed] == ["flux_t2i"]
    shown = json.loads(cli.invoke(app, ["templates", "show", "flux_t2i", "--dir", str(folder), "--json"]).stdout)
    assert shown["schema"]["properties"]["steps"]["type"] == "integer"
    again = cli.invoke(app, ["templates", "new", "flux_t2i", "--from", str(WORKFLOWS / "flux_schnell_t2i.json"),
                             "--dir", str(folder)])
    assert again.exit_code == 2 and "exists" in again.output
    (folder / "flux_t2i.toml").write_text('[params.x]\ntype = "int"\nbind = "KSampler.sed"\n')
    res = cli.invoke(app, ["templates", "validate", "--dir", str(folder)])
    assert res.exit_code == 2 and "parameter 'x'" in res.output and "'sed'" in res.output


def test_the_gateway_lists_templates_and_runs_templated_jobs(comfy, tmp_path: Path):
    gw = Gateway(comfy.url, tmp_path / "data", "--runpod-endpoint", "ep",
                 env={"GPUBRIDGE_TEMPLATES": str(WORKFLOWS)}).start()
    try:
        listed = httpx.get(f"{gw.url}/v1/templates", headers=AUTH, timeout=30).json()["templates"]
        invert = next(t for t in listed if t["name"] == "model_free_invert")
        assert invert["schema"]["properties"]["color"]["maximum"] == 16777215 and invert["version"]
        assert httpx.get(f"{gw.url}/v1/templates/nope", headers=AUTH, timeout=30).status_code == 404
        before = comfy.stats.prompts_accepted
        bad = httpx.post(f"{gw.url}/v1/jobs", json={"template": "model_free_invert", "params": {"color": "x"}},
                         headers=AUTH, timeout=30)
        assert bad.status_code == 422 and bad.json()["error"]["params"] == {"color": "expected an integer, got "
                                                                            "a string ('x')"}
        unknown = httpx.post(f"{gw.url}/v1/jobs", json={"template": "nope"}, headers=AUTH, timeout=30)
        assert unknown.status_code == 422 and unknown.json()["error"]["type"] == "TemplateNotFound"
        assert comfy.stats.prompts_accepted == before
        job = httpx.post(f"{gw.url}/v1/jobs", json={"template": "model_free_invert", "params": {"color": 255,
                                                                                                  "width": 8}},
                         headers=AUTH, timeout=30)
        assert job.status_code == 202, job.text
        env = until(gw, job.json()["job_id"], "succeeded", "failed")
        assert env["status"]["state"] == "succeeded", env
        assert [a["width"] for a in env["result"]["artifacts"]] == [8, 8]
        # the RunPod-shaped API takes a template in worker-comfyui's input too
        sync = httpx.post(f"{gw.url}/v2/ep/runsync", json={"input": {"template": "model_free_invert",
                                                                     "params": {"height": 3}}},
                          headers=AUTH, timeout=60).json()
        assert sync["status"] == "COMPLETED", sync
        assert len(sync["output"]["images"]) == 2
        bad = httpx.post(f"{gw.url}/v2/ep/run", json={"input": {"template": "model_free_invert",
                                                                "params": {"height": -3}}}, headers=AUTH, timeout=30)
        assert bad.status_code == 422 and "'height'" in bad.json()["error"]["message"]
        assert comfy.stats.prompts_accepted == before + 2
    finally:
        gw.stop()


def test_the_modal_job_api_runs_templated_jobs(comfy, registry: TemplateRegistry):
    with serve_api(comfy.url, api={"templates": registry}) as (url, _backend):
        headers = {"Authorization": f"Bearer {MODAL_TOKEN}"}
        names = [t["name"] for t in httpx.get(f"{url}/v1/templates", headers=headers, timeout=30).json()["templates"]]
        assert "sdxl_img2img" in names
        bad = httpx.post(f"{url}/v1/jobs", json={"template": "model_free_invert", "params": {"width": 0}},
                         headers=headers, timeout=30)
        assert bad.status_code == 422 and "width" in bad.json()["error"]["params"]
        done = httpx.post(f"{url}/v1/run?timeout=60", json={"template": "model_free_invert",
                                                             "params": {"height": 4}}, headers=headers, timeout=90)
        assert done.status_code == 200, done.text
        assert [a["height"] for a in done.json()["result"]["artifacts"]] == [4, 4]


async def test_the_runpod_worker_renders_templated_input(tmp_path: Path, registry: TemplateRegistry):
    from ..runpod.conftest import load_worker_module

    async with ComfyDouble(root=tmp_path / "comfy") as double:
        worker = load_worker_module()
        worker.configure(comfy_url=double.url, reconnect_timeout=0.5, progress_interval=0.0)
        try:
            worker.get_worker().templates = registry
            out = await worker.handler({"id": "t1", "input": {"template": "model_free_invert",
                                                              "params": {"color": 255}}})
            assert "error" not in out, out
            import base64

            assert colour_of(base64.b64decode(out["images"][0]["data"])) == (255, 255, 0)
            bad = await worker.handler({"id": "t2", "input": {"template": "model_free_invert",
                                                              "params": {"colour": 1}}})
            assert bad["gpubridge_error"]["exception_type"] == "ParamInvalid", bad
            assert bad["details"] == ["colour: unknown parameter (did you mean 'color'?)"]
            assert double.stats.prompts_accepted == 1
        finally:
            await worker.aclose()


async def test_shadow_records_carry_the_template_and_its_version(registry: TemplateRegistry):
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    sink = MemorySink()
    runner = ShadowRunner(ctl, cand, 1.0, rng=random.Random(0), sink=sink, noise_warmup=0, noise_rate=0.0)
    for color in (1, 2):  # other parameters, the same template and version
        await runner.run(registry.request("model_free_invert", {"color": color}))
    await runner.drain()
    version = registry["model_free_invert"].version
    assert [r.workflow for r in sink.records] == [f"model_free_invert@{version}"] * 2


def test_a_gateway_refuses_to_start_with_a_template_whose_model_is_not_in_the_manifest(tmp_path: Path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "tpl"
    folder.mkdir()
    shutil.copy(WORKFLOWS / "model_free_invert.json", folder / "needs_a_model.json")
    (folder / "needs_a_model.toml").write_text('models = ["nowhere.safetensors"]\n')
    env = {**os.environ, "GPUBRIDGE_TEMPLATES": str(folder), "GPUBRIDGE_MODELS_MANIFEST":
           str(ROOT / "modal_app" / "models.toml"), "GPUBRIDGE_API_TOKEN": "t"}
    done = subprocess.run([sys.executable, "-m", "gpubridge.cli", "serve", "--port", "1", "--data-dir",
                           str(tmp_path / "data")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "'nowhere.safetensors' not in the model manifest" in done.stderr + done.stdout


def test_the_job_api_checks_its_templates_models_against_the_shipped_manifest(tmp_path: Path):
    from modal_app.runtime import load_templates

    from gpubridge.errors import ConfigError

    folder = tmp_path / "tpl"
    folder.mkdir()
    shutil.copy(WORKFLOWS / "model_free_invert.json", folder / "needs_a_model.json")
    (folder / "needs_a_model.toml").write_text('models = ["nowhere.safetensors"]\n')
    with pytest.raises(ConfigError, match="'nowhere.safetensors' not in the model manifest"):
        load_templates(folder)
    assert set(load_templates(WORKFLOWS)) >= {"flux_schnell_t2i", "wan21_t2v"}  # the shipped ones pass
