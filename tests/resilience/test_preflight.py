"""Capabilities and preflight (issue 13 item 5): a workflow that needs a node class or model file one
backend lacks is never sent there; the failover runner goes straight to a backend that has it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.comfy.preflight import preflight
from gpubridge.errors import WorkflowUnsupported
from gpubridge.models import JobRequest, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.resilience import FailoverRunner
from gpubridge.testing import ComfyDouble
from gpubridge.testing.comfy import recorded_object_info

from ..conftest import EXAMPLES

FLUX = Workflow.load(EXAMPLES / "flux_schnell_t2i.json").with_values({"KSampler.steps": 2})


def test_preflight_names_a_missing_node_class_with_its_pack_and_a_missing_model():
    info = recorded_object_info()
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "juggernaut_xl.safetensors"}},
        "2": {"class_type": "ReActorFaceSwap", "inputs": {"input_image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    problems = {p.kind: p for p in preflight(prompt, info)}
    assert problems["missing_node_class"].class_type == "ReActorFaceSwap"
    assert problems["missing_node_class"].pack == "comfyui-reactor-node"
    model = problems["missing_model"]
    assert (model.node_id, model.input, model.value, model.folder) == ("1", "ckpt_name", "juggernaut_xl.safetensors",
                                                                      "checkpoints")
    assert all(p.backend_lacks for p in problems.values())


def test_preflight_finds_dangling_and_self_links_and_a_missing_output():
    info = recorded_object_info()
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    }
    kinds = sorted(p.kind for p in preflight(prompt, info))
    assert kinds == ["dangling_link", "no_output", "self_link"]
    assert not any(p.backend_lacks for p in preflight(prompt, info))


def test_a_runnable_workflow_has_no_problems():
    assert preflight(json.loads((EXAMPLES / "model_free_invert.json").read_text()), recorded_object_info()) == []


async def test_a_primary_without_the_model_gets_no_submit_and_the_fallback_runs_the_job(tmp_path: Path):
    async with ComfyDouble(root=tmp_path / "a", model_files={"diffusion_models": []}) as lacking, \
            ComfyDouble(root=tmp_path / "b") as full:
        runner = FailoverRunner([LocalRunner(lacking.url, name="primary"),
                                 LocalRunner(full.url, name="fallback")])
        try:
            result = await runner.run(FLUX, timeout=60)
        finally:
            await runner.aclose()
    assert result.provider == "fallback" and len(result.images) == 1
    assert lacking.stats.prompts_received == 0  # not one submit to the primary
    skipped = result.attempts[0]
    assert (skipped.provider, skipped.outcome) == ("primary", "skipped")
    assert "flux1-schnell.safetensors" in skipped.error["message"]
    assert [a.outcome for a in result.attempts] == ["skipped", "succeeded"]
    assert runner.counters["failovers"] == 0 and runner.counters["skipped"] == 1


async def test_when_no_provider_can_run_it_the_job_fails_naming_what_each_lacks(tmp_path: Path):
    async with ComfyDouble(root=tmp_path / "a", model_files={"diffusion_models": []}) as a, \
            ComfyDouble(root=tmp_path / "b", model_files={"vae": []}) as b:
        runner = FailoverRunner([LocalRunner(a.url, name="one"), LocalRunner(b.url, name="two")])
        try:
            with pytest.raises(WorkflowUnsupported) as info:
                await runner.run(JobRequest(workflow=FLUX, timeout=60))
        finally:
            await runner.aclose()
    assert "flux1-schnell.safetensors" in str(info.value) and "ae.safetensors" in str(info.value)
    assert set(info.value.problems) == {"one", "two"}
    assert a.stats.prompts_received == b.stats.prompts_received == 0


def test_gpubridge_check_names_a_missing_node_class_and_a_missing_checkpoint(tmp_path: Path, in_tmp: Path):
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "juggernaut_xl.safetensors"}},
        "2": {"class_type": "ReActorFaceSwap", "inputs": {"input_image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }))
    with ComfyDouble(root=tmp_path / "comfy").run_in_thread() as comfy:
        env = {"GPUBRIDGE_PROVIDER": "local", "GPUBRIDGE_COMFY_URL": comfy.url, "GPUBRIDGE_FALLBACKS": ""}
        res = CliRunner().invoke(app, ["check", str(workflow)], env=env, catch_exceptions=False)
        ok = CliRunner().invoke(app, ["check", str(EXAMPLES / "model_free_invert.json"), "--json"], env=env,
                                catch_exceptions=False)
    assert res.exit_code == 1, res.output
    assert "ReActorFaceSwap" in res.output and "comfyui-reactor-node" in res.output
    assert "juggernaut_xl.safetensors" in res.output and "checkpoints" in res.output
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["providers"]["local"]["can_run"] is True


async def test_the_job_api_reports_capabilities_and_the_modal_provider_is_skipped_when_it_lacks_a_model(
    tmp_path: Path,
):
    """GET /v1/capabilities on the job API (over a ComfyUI that lacks the Flux UNet) lets a failover runner
    skip the Modal provider without submitting to it."""
    from gpubridge.providers.modal import ModalRunner

    from ..modal.conftest import TOKEN, serve_api

    with ComfyDouble(root=tmp_path / "a", model_files={"diffusion_models": []}).run_in_thread() as lacking, \
            ComfyDouble(root=tmp_path / "b").run_in_thread() as full:
        with serve_api(lacking.url) as (api_url, _backend):
            modal = ModalRunner(api_url, token=TOKEN, name="modal")
            info = await modal.capabilities()
            assert info is not None and "UNETLoader" in info
            runner = FailoverRunner([modal, LocalRunner(full.url, name="local")])
            try:
                result = await runner.run(FLUX, timeout=60)
            finally:
                await runner.aclose()
        assert result.provider == "local"
        assert lacking.stats.prompts_received == 0
        assert [(a.provider, a.outcome) for a in result.attempts] == [("modal", "skipped"), ("local", "succeeded")]


def test_the_compact_capabilities_preflight_the_same_as_the_full_object_info():
    from gpubridge.comfy.preflight import compact_object_info

    info = recorded_object_info()
    compact = compact_object_info(info)
    assert len(json.dumps(compact)) < len(json.dumps(info)) / 5
    prompt = FLUX.to_api() | {"99": {"class_type": "ReActorFaceSwap", "inputs": {}}}
    prompt["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.safetensors"}}
    assert [p.to_dict() for p in preflight(prompt, compact)] == [p.to_dict() for p in preflight(prompt, info)]


async def test_a_runpod_endpoint_without_the_model_gets_no_run_and_the_fallback_runs_the_job(tmp_path: Path):
    """The RunPod provider learns what the gpubridge worker's ComfyUI has from a low-priority capabilities
    job (cached), and the failover runner skips the endpoint with 0 /run requests."""
    from gpubridge.testing.runpod import RunPodEndpointDouble

    from ..runpod.conftest import API_KEY, load_worker_module, make_runner

    worker = load_worker_module()
    async with ComfyDouble(root=tmp_path / "a", model_files={"diffusion_models": []}) as lacking, \
            ComfyDouble(root=tmp_path / "b") as full:
        worker.configure(comfy_url=lacking.url, reconnect_timeout=0.5, progress_interval=0.0)
        async with RunPodEndpointDouble(worker.handler, api_key=API_KEY) as endpoint:
            runpod = make_runner(endpoint, worker="gpubridge", name="runpod")
            runner = FailoverRunner([runpod, LocalRunner(full.url, name="local")])
            try:
                result = await runner.run(FLUX, timeout=60)
                again = await runner.run(FLUX, timeout=60)
                stock = make_runner(endpoint, worker="worker-comfyui")
                assert await stock.capabilities() is None  # a stock worker-comfyui cannot say
                await stock.aclose()
            finally:
                await runner.aclose()
                await worker.aclose()
    assert result.provider == again.provider == "local"
    assert endpoint.counters["run"] == 0  # not one job sent to the endpoint that lacks the model
    assert endpoint.counters["runsync"] == 1  # one capabilities job, then the cache
    assert lacking.stats.prompts_received == 0
    assert (result.attempts[0].provider, result.attempts[0].outcome) == ("runpod", "skipped")
    assert "flux1-schnell.safetensors" in result.attempts[0].error["message"]
