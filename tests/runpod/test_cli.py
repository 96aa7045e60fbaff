"""``gpubridge ... --provider runpod`` through the real CLI entry point, against the endpoint double (its
own thread) running the real worker against the ComfyUI double (its own thread)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubridge.cli import main
from gpubridge.testing.runpod import RunPodEndpointDouble

from .conftest import API_KEY, WORKFLOWS, comfy_double_class, load_worker_module

WORKFLOW = str(WORKFLOWS / "model_free_invert.json")


@pytest.fixture
def rp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunPodEndpointDouble]:
    from runpod.serverless.modules.rp_logger import RunPodLogger

    monkeypatch.setattr(RunPodLogger(), "level", "NOTSET")  # the SDK prints to stdout, where --json goes
    worker = load_worker_module()
    with comfy_double_class()(root=tmp_path / "comfy").run_in_thread() as comfy:
        worker.configure(comfy_url=comfy.url, reconnect_timeout=0.5)
        with RunPodEndpointDouble(worker.handler, api_key=API_KEY) as double:
            monkeypatch.chdir(tmp_path)
            for key, value in {
                "GPUBRIDGE_RUNPOD_ENDPOINT_ID": double.endpoint_id,
                "GPUBRIDGE_RUNPOD_BASE_URL": double.base_url,
                "RUNPOD_API_KEY": API_KEY,
                "GPUBRIDGE_RUNPOD_POLL_INITIAL": "0.01",
                "GPUBRIDGE_RUNPOD_POLL_MAX": "0.05",
                "GPUBRIDGE_RUNPOD_RETRY_INITIAL": "0",
                "GPUBRIDGE_RUNPOD_HEALTH_RESAMPLE": "0",
                "GPUBRIDGE_RUNPOD_GPU_TYPE": "L40S",
            }.items():
                monkeypatch.setenv(key, value)
            try:
                yield double
            finally:
                double.call(worker.aclose())


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr().out
    try:
        return code, json.loads(out)
    except ValueError:
        return code, out


def test_run_end_to_end(rp: RunPodEndpointDouble, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rp.throttle, rp.throttle_retry_after = 2, 0  # 429s on the way are retried
    code, out = cli(capsys, "run", "--provider", "runpod", WORKFLOW, "--json", "--out", str(tmp_path / "out"))
    assert code == 0, out
    assert out["provider"] == "runpod" and out["state"] == "succeeded"
    paths = [Path(a["path"]) for a in out["artifacts"]]
    assert len(paths) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert out["timings"]["executing_s"] is not None and out["cost"]["gpu"] == "L40S"
    assert rp.counters["throttled"] == 2 and rp.counters["submitted"] == 1


def test_worker_crash_is_a_failed_job(rp: RunPodEndpointDouble, capsys: pytest.CaptureFixture[str]):
    rp.crash_next = 1
    code, out = cli(capsys, "run", "-p", "runpod", WORKFLOW, "--json")
    assert code == 1
    assert out["error"]["type"] == "JobFailed" and out["error"]["retryable"] is True


def test_stuck_queue_times_out(rp: RunPodEndpointDouble, capsys: pytest.CaptureFixture[str]):
    rp.workers = 0
    code, out = cli(capsys, "run", "-p", "runpod", WORKFLOW, "--json", "--timeout", "0.3")
    assert code == 4
    assert out["error"]["type"] == "JobTimeout"
    assert rp.status_of(out["error"]["job_id"]) == "CANCELLED"
    code, health = cli(capsys, "health", "-p", "runpod", "--json")
    assert code == 0 and health["state"] == "healthy" and health["workers"]["idle"] == 0


def test_submit_status_cancel_result(rp: RunPodEndpointDouble, capsys: pytest.CaptureFixture[str]):
    rp.workers = 0
    code, job_id = cli(capsys, "submit", "-p", "runpod", WORKFLOW)
    job_id = str(job_id).strip()
    assert code == 0 and rp.status_of(job_id) == "IN_QUEUE"
    code, status = cli(capsys, "status", "-p", "runpod", job_id, "--json")
    assert code == 0 and status["state"] == "queued"
    code, status = cli(capsys, "cancel", "-p", "runpod", job_id, "--json")
    assert code == 0 and status["state"] == "cancelled"
    code, out = cli(capsys, "result", "-p", "runpod", job_id, "--json")
    assert code == 1 and out["error"]["type"] == "JobCancelled"
    rp.expire(job_id)
    rp.call(rp.wait_for(lambda d: d.status_of(job_id) is None))
    code, out = cli(capsys, "result", "-p", "runpod", job_id, "--json")
    assert code == 1 and out["error"]["type"] == "JobNotFound"


def test_bad_key_is_an_auth_error(rp: RunPodEndpointDouble, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_API_KEY", "not-the-key")
    code, out = cli(capsys, "run", "-p", "runpod", WORKFLOW, "--json")
    assert code == 3 and out["error"]["type"] == "AuthError"
    assert "not-the-key" not in json.dumps(out)
