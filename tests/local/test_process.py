"""ComfyProcess: launching, readiness, death and restart, with the double run as a real process."""

from __future__ import annotations

import socket
import sys

import httpx
import pytest

from gpubridge.comfy import ComfyProcess, ComfyStartError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def double_process(tmp_path, **kw) -> ComfyProcess:
    cmd = [sys.executable, "-m", "gpubridge.testing.comfy", "--port", "{port}", "--root", str(tmp_path)]
    return ComfyProcess(cmd, port=free_port(), **kw)


def test_start_waits_until_it_answers_then_stop(tmp_path):
    proc = double_process(tmp_path)
    with proc:
        assert proc.alive() and proc.healthy()
        assert httpx.get(f"{proc.url}/system_stats").status_code == 200
    assert not proc.alive() and proc.returncode is not None


def test_a_process_that_dies_while_starting_fails_fast_with_its_output():
    proc = ComfyProcess([sys.executable, "-c", "import sys; print('model folder missing'); sys.exit(3)"])
    with pytest.raises(ComfyStartError) as info:
        proc.start()
    assert info.value.returncode == 3 and "model folder missing" in str(info.value)
    assert info.value.retryable


def test_start_timeout_is_honoured_and_the_process_stopped():
    proc = ComfyProcess([sys.executable, "-c", "import time; time.sleep(60)"], port=free_port(), start_timeout=0.5)
    with pytest.raises(ComfyStartError, match="did not answer"):
        proc.start()
    assert not proc.alive()


def test_dead_comfyui_is_restarted_and_restarts_are_bounded(tmp_path):
    proc = double_process(tmp_path, max_restarts=1)
    proc.start()
    try:
        assert proc.ensure_running() is False
        first_pid = proc.pid
        # the crash fault makes the double's process exit(70), like a ComfyUI that died mid-job
        httpx.post(f"{proc.url}/gpubridge/faults", json={"crash": {}})
        httpx.post(f"{proc.url}/prompt", json={"prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}})
        proc._proc.wait(10)
        assert proc.returncode == 70 and not proc.healthy()
        assert proc.ensure_running() is True
        assert proc.healthy() and proc.pid != first_pid
        proc.kill()
        with pytest.raises(ComfyStartError, match="not restarting"):
            proc.ensure_running()
    finally:
        proc.stop()


def test_path_mode_builds_the_comfyui_command(tmp_path):
    proc = ComfyProcess(path=tmp_path, port=9999, args=["--cpu"])
    assert proc.argv[1:] == ["main.py", "--listen", "127.0.0.1", "--port", "9999", "--cpu"]
    assert proc.cwd == str(tmp_path)
    with pytest.raises(ValueError):
        ComfyProcess()
