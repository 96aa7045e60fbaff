"""The endpoint double's own behaviour (knobs and routes not covered through the provider)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gpubridge.testing.runpod import RunPodEndpointDouble


async def echo(job: dict[str, Any]) -> dict[str, Any]:
    return {"echo": job["input"]}


def sync_echo(job: dict[str, Any]) -> dict[str, Any]:  # sync handlers run in a thread
    return {"echo": job["input"], "sync": True}


async def test_hold_release_and_sync_handler():
    async with RunPodEndpointDouble(sync_echo, hold=True) as rp, httpx.AsyncClient(base_url=rp.endpoint_url) as http:
        job_id = (await http.post("/run", json={"input": {"a": 1}})).json()["id"]
        await rp.wait_status(job_id, "IN_PROGRESS")
        body = (await http.get(f"/status/{job_id}")).json()
        assert body["status"] == "IN_PROGRESS" and "workerId" in body and "output" not in body
        rp.release()
        await rp.wait_status(job_id, "COMPLETED")
        body = (await http.get(f"/status/{job_id}")).json()
        assert body["output"] == {"echo": {"a": 1}, "sync": True}
        assert isinstance(body["delayTime"], int) and isinstance(body["executionTime"], int)


async def test_crash_rate_and_routes():
    async with RunPodEndpointDouble(echo, crash_rate=1.0, seed=1) as rp, \
            httpx.AsyncClient(base_url=rp.url) as http:
        ep = f"/v2/{rp.endpoint_id}"
        body = (await http.post(f"{ep}/runsync", json={"input": {}})).json()
        assert body["status"] == "FAILED" and "WorkerCrashed" in body["error"] and body["id"].startswith("sync-")
        rp.crash_rate = 0
        assert (await http.post(f"{ep}/retry/{body['id']}")).json()["status"] == "IN_QUEUE"
        assert (await rp.wait_status(body["id"])) == "COMPLETED"
        assert (await http.get("/v2/other-endpoint/health")).status_code == 404
        assert (await http.post(f"{ep}/run", json={"no": "input"})).status_code == 400
        assert (await http.post(f"{ep}/run", content=b"x" * (10 * 1024 * 1024 + 1))).status_code == 413
        assert (await http.get(f"{ep}/run")).status_code == 405


async def test_ttl_drops_a_queued_job():
    async with RunPodEndpointDouble(echo, workers=0) as rp, httpx.AsyncClient(base_url=rp.endpoint_url) as http:
        job_id = (await http.post("/run", json={"input": {}, "policy": {"ttl": 0}})).json()["id"]
        assert (await http.get(f"/status/{job_id}")).status_code == 404
        assert rp.counters["expired"] == 1


async def test_generator_handler_streams():
    async def gen(job: dict[str, Any]):
        for i in range(3):
            yield {"i": i}
            await asyncio.sleep(0)

    async with RunPodEndpointDouble(gen, return_aggregate_stream=True) as rp, \
            httpx.AsyncClient(base_url=rp.endpoint_url) as http:
        body = (await http.post("/runsync", json={"input": {}})).json()
        assert body["status"] == "COMPLETED" and body["output"] == [{"i": 0}, {"i": 1}, {"i": 2}]
        stream = (await http.get(f"/stream/{body['id']}")).json()
        assert stream["stream"] == [{"output": {"i": i}} for i in range(3)]
        assert (await http.get(f"/stream/{body['id']}")).json()["stream"] == []
