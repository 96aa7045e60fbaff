"""The RunPod worker image: the SDK version it installs stops a running handler, and that stop interrupts
ComfyUI (driven through the SDK's own JobScaler stop channel, not by cancelling a task by hand); the
entrypoint keeps the base image's start-up checks before it runs our handler."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import ROOT, WORKFLOWS

WORKER = ROOT / "contrib" / "runpod_worker"
INVERT = json.loads((WORKFLOWS / "model_free_invert.json").read_text())


def _tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3])


def test_the_image_installs_the_sdk_the_tests_run_and_starts_with_start_sh():
    dockerfile = (WORKER / "Dockerfile").read_text()
    pinned = re.search(r'"runpod==([0-9.]+)"', dockerfile)
    assert pinned, "the Dockerfile must pin runpod"
    assert _tuple(pinned.group(1)) >= (1, 10, 0)  # the first SDK that stops a running handler
    assert pinned.group(1) == version("runpod")  # the SDK these tests drive
    assert dockerfile.rstrip().endswith('CMD ["/start.sh"]')
    assert re.search(r"COPY .*contrib/runpod_worker/start\.sh /", dockerfile)
    assert os.access(WORKER / "start.sh", os.X_OK)


async def test_the_sdks_stop_signal_interrupts_comfyui(worker_module: ModuleType, comfy: Any):
    """A RunPod cancel (or executionTimeout) reaches the worker as a stop signal; the SDK's JobScaler cancels
    the handler's task, and the handler interrupts ComfyUI, so the worker is free for the next job."""
    from runpod.serverless.modules import rp_job
    from runpod.serverless.modules.rp_scale import JobScaler

    worker_module.configure(comfy_url=comfy.url, reconnect_timeout=0.5, progress_interval=0.0)
    comfy.faults.delays = {"ImageInvert": 60.0}  # a long node: the interrupt lands when it ends
    job = {"id": "job-stop", "input": {"workflow": INVERT}}
    finished = asyncio.Event()
    handed_out, stop_sent, stopped, results = [], [], [], {}

    async def jobs_fetcher(session: Any, needed: int) -> list[dict[str, Any]]:
        if handed_out:
            await finished.wait()
            return []
        handed_out.append(job["id"])
        return [job]

    async def jobs_handler(session: Any, config: dict[str, Any], got: dict[str, Any]) -> None:
        results[got["id"]] = await rp_job.run_job(config["handler"], got)

    async def stop_signals_fetcher(session: Any) -> list[str]:
        if stop_sent:
            await finished.wait()
            return []
        await comfy.wait_until(lambda: bool(comfy.queue_running), timeout=20)
        stop_sent.append(job["id"])
        stopped.append(scaler.jobs_tasks[job["id"]])  # the handler's task, which the SDK will cancel
        return [job["id"]]

    scaler = JobScaler({"handler": worker_module.handler, "jobs_fetcher": jobs_fetcher,
                        "jobs_handler": jobs_handler, "stop_signals_fetcher": stop_signals_fetcher})
    running = asyncio.create_task(scaler.run())
    try:
        await comfy.wait_until(lambda: comfy.stats.interrupts >= 1, timeout=20)
        prompt_id = next(iter(comfy.jobs))
        comfy.faults.delays = {}  # the node ends; ComfyUI honours the interrupt at the boundary
        assert (await comfy.wait_for_state(prompt_id, "done", timeout=20)).state == "interrupted"
        await asyncio.wait_for(asyncio.wait({stopped[0]}), 20)
        assert stopped[0].cancelled() and job["id"] not in scaler.jobs_tasks  # the SDK's stop path ran
        assert job["id"] not in results  # stopped: no result was produced for RunPod
        await comfy.wait_for_idle(timeout=20)
        out = await worker_module.handler({"id": "job-next", "input": {"workflow": INVERT}})
        assert "error" not in out and out["images"], out  # the worker is free for the next job
    finally:
        finished.set()
        scaler.kill_worker()
        await asyncio.wait_for(running, 30)
        await worker_module.aclose()


def _stub(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)


@pytest.fixture
def start_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # `python` is the handler's interpreter: record what start.sh runs it with.
    _stub(bin_dir, "python", f'echo "python $*" >> {calls}\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return env, calls


def _start(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(WORKER / "start.sh")], env={**env, **extra}, capture_output=True,
                          text=True, timeout=30, check=False)


def test_start_sh_fails_fast_when_cuda_cannot_initialise(start_env):
    env, calls = start_env
    _stub(Path(env["PATH"].split(":")[0]), "python3", 'echo "FAIL: CUDA driver initialization failed"; exit 1\n')
    done = _start(env)
    assert done.returncode == 1
    assert "CUDA driver initialization failed" in done.stderr and "report the machine" in done.stderr
    assert not calls.exists()  # the handler never started: RunPod replaces the worker


def test_start_sh_checks_the_gpu_then_runs_the_handler(start_env):
    env, calls = start_env
    bin_dir = Path(env["PATH"].split(":")[0])
    _stub(bin_dir, "python3", 'echo "OK: NVIDIA H100"\n')
    _stub(bin_dir, "comfy-manager-set-mode", f'echo "manager $*" >> {calls}\n')
    done = _start(env)
    assert done.returncode == 0, done.stderr
    assert "GPU available: OK: NVIDIA H100" in done.stdout
    assert calls.read_text().splitlines() == ["manager offline", "python -u /handler.py"]

    calls.unlink()
    done = _start(env, SERVE_API_LOCALLY="true", GPUBRIDGE_SKIP_GPU_CHECK="1")
    assert done.returncode == 0 and "checking the GPU" not in done.stdout
    assert calls.read_text().splitlines()[-1] == "python -u /handler.py --rp_serve_api --rp_api_host=0.0.0.0"
