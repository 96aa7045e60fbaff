"""`gpubridge run --provider modal` through the real CLI entry point, against the job API served by uvicorn
on 127.0.0.1 (in-process backend) in front of the ComfyUI double."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubridge.cli import main

from .conftest import INPUTS, TOKEN, WORKFLOWS, serve_api


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def modal_env(threaded_comfy, monkeypatch):
    with serve_api(threaded_comfy.url) as (url, backend):
        monkeypatch.setenv("GPUBRIDGE_MODAL_URL", url)
        monkeypatch.setenv("GPUBRIDGE_MODAL_TOKEN", TOKEN)
        monkeypatch.setenv("GPUBRIDGE_CONFIG", str(_empty_config(monkeypatch)))
        yield url, backend


def _empty_config(monkeypatch) -> Path:
    path = Path(os.environ["HOME"]) / "gpubridge.toml"
    path.write_text("")
    return path


def test_run_with_input_image(modal_env, threaded_comfy, capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = cli(
        capsys,
        "run",
        "--provider",
        "modal",
        str(WORKFLOWS / "sdxl_img2img.json"),
        "--input",
        f"input.png={INPUTS / 'input.png'}",
        "--set",
        "KSampler.steps=2",
        "--out",
        str(out_dir),
        "--json",
        "--quiet",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["state"] == "succeeded" and summary["provider"] == "modal"
    assert summary["cost"]["gpu"] == "L40S" and summary["cost"]["basis"] == "estimate"
    assert summary["timings"]["total_s"] is not None
    paths = [Path(a["path"]) for a in summary["artifacts"]]
    assert paths and all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert threaded_comfy.stats.uploads == 1
    [job] = threaded_comfy.jobs.values()
    assert job.prompt["7"]["inputs"]["steps"] == 2


def test_submit_status_cancel(modal_env, threaded_comfy, capsys):
    threaded_comfy.pause()
    code, out, err = cli(capsys, "submit", "-p", "modal", str(WORKFLOWS / "model_free_invert.json"))
    assert code == 0, err
    job_id = out.strip()
    code, out, _ = cli(capsys, "status", "-p", "modal", job_id, "--json")
    assert code == 0 and json.loads(out)["state"] == "queued"
    code, out, _ = cli(capsys, "cancel", "-p", "modal", job_id, "--json")
    assert code == 0 and json.loads(out)["state"] == "cancelled"
    assert threaded_comfy.stats.deletes == 1
    code, out, _ = cli(capsys, "result", "-p", "modal", job_id, "--json")
    assert code == 1 and json.loads(out)["error"]["type"] == "JobCancelled"


def test_auth_failure_exits_3_without_leaking_the_token(modal_env, capsys, monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_MODAL_TOKEN", "not-the-token-123")
    code, out, err = cli(capsys, "run", "-p", "modal", str(WORKFLOWS / "model_free_invert.json"), "--json")
    assert code == 3
    error = json.loads(out)["error"]
    assert error["type"] == "AuthError" and error["retryable"] is False
    assert "not-the-token-123" not in out + err and TOKEN not in out + err


def test_comfyui_dead_health_red_and_run_refused_retryably(modal_env, threaded_comfy, capsys):
    threaded_comfy.crash()
    code, out, _ = cli(capsys, "health", "-p", "modal", "--json")
    assert code == 3 and json.loads(out)["state"] == "unhealthy"
    code, out, _ = cli(capsys, "run", "-p", "modal", str(WORKFLOWS / "model_free_invert.json"), "--json")
    assert code == 3
    error = json.loads(out)["error"]
    assert error["type"] == "ProviderUnavailable" and error["retryable"] is True


def test_installed_entry_point_in_a_subprocess(modal_env, tmp_path):
    url, _ = modal_env
    env = {**os.environ, "GPUBRIDGE_MODAL_URL": url, "GPUBRIDGE_MODAL_TOKEN": TOKEN}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpubridge.cli",
            "run",
            "--provider",
            "modal",
            str(WORKFLOWS / "model_free_invert.json"),
            "--json",
            "--out",
            str(tmp_path / "o"),
        ],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["state"] == "succeeded" and len(summary["artifacts"]) == 2


def test_credentials_in_the_api_url_never_reach_health_output(monkeypatch, capsys):
    """Issue 10 (12): GPUBRIDGE_MODAL_URL=http://user:pass@host printed the password in `health --json`,
    because the unreachable-API message names the URL. Port 9 on loopback refuses the connection."""
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "http://alice:hunter2-SECRET@127.0.0.1:9")
    monkeypatch.setenv("GPUBRIDGE_MODAL_TOKEN", TOKEN)
    monkeypatch.setenv("GPUBRIDGE_CONFIG", str(_empty_config(monkeypatch)))
    code, out, err = cli(capsys, "health", "-p", "modal", "--json")
    assert code != 0 and "127.0.0.1:9" in out + err  # the message still says where
    assert "hunter2" not in out + err and "alice" not in out + err
