"""``gpubridge serve`` as a real process: the local provider over the ComfyUI double (in this process, so the
test can hold nodes and count prompts), SIGKILL and restarts on one data dir, SIGTERM draining, bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpubridge.testing import ComfyDouble

from .helpers import AUTH, TOKEN, Gateway, until, workflow

@pytest.fixture
def comfy(tmp_path: Path) -> Iterator[Any]:
    with ComfyDouble(root=tmp_path / "comfy", cache=False).run_in_thread() as double:
        yield double


@pytest.fixture
def gateway(comfy, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(comfy.url, tmp_path / "data", "--max-body-mb", "1", "--drain", "20")
    gw.start()
    yield gw
    gw.stop()


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "GPUBRIDGE_API_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "gpubridge.cli", "serve", "--host", "0.0.0.0",
                           "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "GPUBRIDGE_API_TOKEN" in done.stderr


def test_a_killed_gateway_restarts_answers_for_its_job_and_runs_it_once(comfy, gateway):
    comfy.hold("ImageInvert")
    body = {"workflow": workflow()}
    headers = {**AUTH, "Idempotency-Key": "order-77"}
    first = httpx.post(f"{gateway.url}/v1/jobs", json=body, headers=headers, timeout=30)
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    until(gateway, job_id, "running")

    assert gateway.kill(signal.SIGKILL) == -signal.SIGKILL
    gateway.start()
    # The caller lost the answer and sends the same submit again: the same job, not a second one.
    again = httpx.post(f"{gateway.url}/v1/jobs", json=body, headers=headers, timeout=30)
    assert again.status_code == 200, again.text
    assert again.json()["job_id"] == job_id

    comfy.release("ImageInvert")
    env = until(gateway, job_id, "succeeded", "failed", "cancelled", "timed_out")
    assert env["status"]["state"] == "succeeded", env
    assert len(env["result"]["artifacts"]) == 2
    assert comfy.stats.prompts_accepted == 1


def test_sigterm_lets_a_running_job_finish_before_the_gateway_exits(comfy, gateway, tmp_path: Path):
    comfy.faults.delays = {"ImageInvert": 1.5}
    job = httpx.post(f"{gateway.url}/v1/jobs", json={"workflow": workflow()}, headers=AUTH, timeout=30).json()
    until(gateway, job["job_id"], "running")
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15).
    assert gateway.kill(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gateway.log.read_text()
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        (raw,) = db.execute("SELECT value FROM kv WHERE key = ?", (f"job:{job['job_id']}",)).fetchone()
    assert json.loads(raw)["state"] == "succeeded"  # finished while draining, not left for the next start


def test_bad_input_gets_typed_4xx_answers_and_leaves_no_job(comfy, gateway, tmp_path: Path):
    url = f"{gateway.url}/v1/jobs"
    cases = {
        "no token": httpx.post(url, json={"workflow": workflow()}, timeout=30),
        "bad token": httpx.post(url, json={"workflow": workflow()}, headers={"Authorization": "Bearer x"}),
        "not json": httpx.post(url, content=b"{nope", headers={**AUTH, "content-type": "application/json"}),
        "no workflow": httpx.post(url, json={"inputs": {}}, headers=AUTH),
        "too large": httpx.post(url, json={"workflow": workflow(), "pad": "x" * 2_000_000}, headers=AUTH),
        "invalid node input": httpx.post(
            url, json={"workflow": {**workflow(), "1": {"class_type": "EmptyImage", "inputs": {"width": -1}}}},
            headers=AUTH),
        "path input": httpx.post(url, json={"workflow": workflow(), "inputs": {"a.png": {"path": "/etc/passwd"}}},
                                 headers=AUTH),
        "unknown job": httpx.get(f"{url}/job-nope", headers=AUTH),
    }
    statuses = {name: r.status_code for name, r in cases.items()}
    assert statuses == {"no token": 401, "bad token": 401, "not json": 422, "no workflow": 422, "too large": 413,
                        "invalid node input": 422, "path input": 422, "unknown job": 404}, statuses
    for name, r in cases.items():
        error = r.json()["error"]
        assert error["type"] and error["message"], name
        assert TOKEN not in r.text
    assert "width" in cases["invalid node input"].json()["error"]["message"]
    assert comfy.stats.prompts_accepted == 0
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM kv WHERE key LIKE 'job:%'").fetchone() == (0,)
