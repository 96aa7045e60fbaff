"""Two ``gpubridge serve`` processes on one PostgreSQL database, behind an imagined load balancer: a job
sent to one is readable and cancellable on the other, one Idempotency-Key makes one job, and a replica that
dies mid-job has its job finished by the other."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpubridge.testing import ComfyDouble

from .helpers import AUTH, Gateway, until, workflow


@pytest.fixture
def comfy(tmp_path: Path) -> Iterator[Any]:
    with ComfyDouble(root=tmp_path / "comfy", cache=False).run_in_thread() as double:
        yield double


@pytest.fixture
def replicas(comfy, pg_store, postgres_url: str, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    env = {"GPUBRIDGE_DATABASE_URL": postgres_url}
    a = Gateway(comfy.url, tmp_path / "a", env=env).start()
    b = Gateway(comfy.url, tmp_path / "b", env=env).start()
    yield a, b
    a.stop()
    b.stop()


def test_a_job_sent_to_one_replica_is_read_on_the_other(comfy, replicas):
    a, b = replicas
    job = httpx.post(f"{a.url}/v1/jobs", json={"workflow": workflow()}, headers=AUTH, timeout=30).json()
    env = until(b, job["job_id"], "succeeded", "failed")
    assert env["status"]["state"] == "succeeded" and len(env["result"]["artifacts"]) == 2


def test_a_job_sent_to_one_replica_is_cancelled_on_the_other(comfy, replicas):
    a, b = replicas
    # The node is held until ComfyUI has the interrupt (not a fixed delay the cancel must beat: under load
    # the cancel's trip through the other replica took longer than 3 s and the job ended first).
    comfy.hold("ImageInvert")
    job = httpx.post(f"{a.url}/v1/jobs", json={"workflow": workflow()}, headers=AUTH, timeout=30).json()
    until(b, job["job_id"], "running")
    answer: list[dict[str, Any]] = []
    cancel = threading.Thread(target=lambda: answer.append(httpx.post(
        f"{b.url}/v1/jobs/{job['job_id']}/cancel", headers=AUTH, timeout=60).json()))
    cancel.start()
    comfy.wait_until(lambda: comfy.stats.interrupts > 0, timeout=30)  # the interrupt reached ComfyUI
    comfy.release("ImageInvert")  # the node ends; ComfyUI stops the job before its next node
    cancel.join(60)
    assert answer and answer[0]["status"]["state"] == "cancelled", answer
    assert until(a, job["job_id"], "cancelled")["status"]["state"] == "cancelled"
    assert comfy.stats.interrupts >= 1


def test_one_idempotency_key_sent_to_both_replicas_at_once_makes_one_job(comfy, replicas):
    answers: list[httpx.Response] = []
    body = {"workflow": workflow()}
    headers = {**AUTH, "Idempotency-Key": "checkout-9"}

    def send(gw: Gateway) -> None:
        answers.append(httpx.post(f"{gw.url}/v1/jobs", json=body, headers=headers, timeout=60))

    threads = [threading.Thread(target=send, args=(gw,)) for gw in (*replicas, *replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 202], [r.text for r in answers]
    assert len({r.json()["job_id"] for r in answers}) == 1
    until(replicas[0], answers[0].json()["job_id"], "succeeded")
    assert comfy.stats.prompts_accepted == 1


def test_a_replica_killed_mid_job_has_its_job_finished_by_the_other(comfy, replicas):
    a, b = replicas
    comfy.hold("ImageInvert")
    job = httpx.post(f"{a.url}/v1/jobs", json={"workflow": workflow()}, headers=AUTH, timeout=30).json()
    until(a, job["job_id"], "running")
    a.kill(signal.SIGKILL)
    comfy.release("ImageInvert")  # the job ends in ComfyUI while nobody follows it; b adopts it (lease 2 s)
    env = until(b, job["job_id"], "succeeded", "failed", wait=60)
    assert env["status"]["state"] == "succeeded", env
    assert len(env["result"]["artifacts"]) == 2
    assert comfy.stats.prompts_accepted == 1
