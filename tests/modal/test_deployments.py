"""Several Modal apps from one codebase: modal_app/deployments.toml, checked and deployed offline."""

from __future__ import annotations

import pytest

from gpubridge.errors import ConfigError
from gpubridge.manifest import Manifest
from modal_app.config import AppConfig, load_config, load_deployments
from modal_app.deployments import check, main

from .test_app import probe


def test_each_deployment_is_its_own_app_with_its_own_gpus_and_concurrency(tmp_path):
    video = probe(tmp_path, GPUBRIDGE_APP_DEPLOYMENT="video")
    image = probe(tmp_path, GPUBRIDGE_APP_DEPLOYMENT="image")
    assert video["attempts"] == [] and image["attempts"] == []
    assert (video["app"], image["app"]) == ("gpubridge-video", "gpubridge")
    assert video["gpus"] == [["H100", 1], ["A100-80GB", 1]] and video["max_inputs"] == 1
    assert image["gpus"] == [["L40S", 1], ["A100-40GB", 1]] and image["max_inputs"] == 2
    # the environment still wins over the deployment's table
    assert probe(tmp_path, GPUBRIDGE_APP_DEPLOYMENT="video", GPUBRIDGE_APP_MAX_INPUTS="3")["max_inputs"] == 3


def test_the_shipped_deployments_pass_their_check_and_list_for_the_deploy_loop(capsys):
    configs = check()
    assert set(configs) == set(load_deployments()) >= {"image", "video"}
    assert "wan2.1_t2v_1.3B_fp16.safetensors" in configs["video"].models
    assert "flux1-schnell.safetensors" not in configs["video"].models
    assert main([]) == 0 and capsys.readouterr().out.split() == list(load_deployments())


def test_a_deployment_bakes_itself_into_the_image(monkeypatch: pytest.MonkeyPatch):
    cfg = load_config(deployment="video")
    baked = cfg.to_env()
    assert baked["GPUBRIDGE_APP_DEPLOYMENT"] == "video"
    for key, value in baked.items():
        monkeypatch.setenv(key, value)
    assert load_config() == cfg  # the container reads the same settings back


@pytest.mark.parametrize(("tables", "words"), [
    ({"a": {"name": "x", "jobs_dict": "j1"}, "b": {"name": "x", "jobs_dict": "j2"}}, "both app 'x'"),
    ({"a": {"name": "x", "jobs_dict": "j"}, "b": {"name": "y", "jobs_dict": "j"}}, "share jobs_dict 'j'"),
    ({"a": {"name": "x", "models": ["nowhere.safetensors"]}}, "nowhere.safetensors not in models.toml"),
    ({"a": {"name": "x", "gpu": ["H100"]}}, "unknown setting(s) gpu"),
    ({"a": {"max_inputs": 0}}, "deployment 'a'"),
])
def test_a_bad_deployments_file_is_refused(tables, words):
    with pytest.raises(ConfigError) as info:
        check(tables)
    assert words in str(info.value)


def test_an_unknown_deployment_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_APP_DEPLOYMENT", "nope")
    with pytest.raises(ConfigError, match="No deployment 'nope'"):
        load_config()


def test_a_deployment_links_only_its_models(tmp_path):
    from modal_app.runtime import link_models

    volume = tmp_path / "models"
    (volume / "files" / "loras").mkdir(parents=True)
    for name in ("a.safetensors", "b.safetensors"):
        (volume / "files" / "loras" / name).write_bytes(b"x")
    manifest = Manifest.parse(
        '[[models]]\nname = "a.safetensors"\nfolder = "loras"\nurl = "https://x/a"\n'
        '[[models]]\nname = "b.safetensors"\nfolder = "loras"\nurl = "https://x/b"\n'
    )
    cfg = AppConfig(models_mount=str(volume), comfy_path=str(tmp_path / "ComfyUI"), models=["b.safetensors"])
    report = link_models(cfg, manifest)
    assert report.linked == ["loras/b.safetensors"]
    assert not (tmp_path / "ComfyUI" / "models" / "loras" / "a.safetensors").exists()
