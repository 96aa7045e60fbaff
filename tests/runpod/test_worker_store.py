"""Object storage on the RunPod path, against a real S3-protocol server on loopback (moto's server mode):
worker-comfyui's BUCKET_* contract (``type: "s3_url"`` through runpod's rp_upload), gpubridge's store
(threshold, expiry, checksum), and a 15 MB input that goes through the store instead of a 413."""

from __future__ import annotations

import io
import json
import time
from types import ModuleType
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image

from gpubridge.errors import PayloadTooLarge
from gpubridge.models import JobRequest, Workflow
from gpubridge.storage import ArtifactStore
from gpubridge.testing.runpod import RunPodEndpointDouble

from .conftest import API_KEY, WORKFLOWS, make_runner
from .test_worker import IMG2IMG, job

INVERT = json.loads((WORKFLOWS / "model_free_invert.json").read_text())


def _s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


async def test_bucket_env_gives_worker_comfyui_s3_urls(worker_module: ModuleType, comfy: Any, s3_endpoint,
                                                       monkeypatch):
    """worker-comfyui's contract: with BUCKET_ENDPOINT_URL and its keys set, every image is uploaded by
    runpod's rp_upload (bucket named by month, key by job) and listed as {"type": "s3_url", "data": URL}."""
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "testing")
    s3 = _s3(s3_endpoint)
    now = time.time()
    for t in (now, now + 3600):  # rp_upload names the bucket "%m-%y": this month's (and the next, at a boundary)
        name = time.strftime("%m-%y", time.localtime(t))
        if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=name)
    worker_module.configure(comfy_url=comfy.url, reconnect_timeout=0.5, progress_interval=0.0,
                            bucket_endpoint_url=s3_endpoint)
    try:
        out = await worker_module.handler(job({"workflow": INVERT}, "job-s3"))
    finally:
        await worker_module.aclose()
    assert "error" not in out, out
    assert out["images"] and all(i["type"] == "s3_url" and "/job-s3/" in i["data"] for i in out["images"])
    got = httpx.get(out["images"][0]["data"])
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")


async def test_the_gpubridge_store_uploads_over_the_threshold_with_expiry_and_checksum(
    worker_module: ModuleType, comfy: Any, store_settings
):
    comfy.faults.output_size = 2_000_000  # over the 1 MB threshold
    worker_module.configure(comfy_url=comfy.url, reconnect_timeout=0.5, progress_interval=0.0,
                            store=store_settings)
    try:
        out = await worker_module.handler(job({"workflow": INVERT, "gpubridge": {"store_prefix": "team-b"}},
                                              "job-big"))
        bad = await worker_module.handler(job({"workflow": INVERT, "gpubridge": {"store_prefix": "../x"}}))
    finally:
        await worker_module.aclose()
    assert "store prefix" in bad["error"] and bad["gpubridge_error"]["exception_type"] == "WorkflowInputError"
    image = out["images"][0]
    assert "/gb/team-b/job-big/" in image["data"]
    assert all(i["type"] == "s3_url" for i in out["images"])
    assert image["size"] == 2_000_000 and image["url_expires_at"] > time.time()
    body = httpx.get(image["data"]).content
    import hashlib

    assert hashlib.sha256(body).hexdigest() == image["sha256"] and len(body) == 2_000_000


def _big_png(size: int) -> bytes:
    side = int((size / 3) ** 0.5) + 1
    import os

    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))  # noise: PNG cannot shrink it
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


async def test_a_15mb_input_goes_through_the_store_instead_of_a_413(worker_module: ModuleType, comfy: Any,
                                                                   store_settings):
    png = _big_png(15_000_000)
    assert len(png) > 15_000_000
    worker_module.configure(comfy_url=comfy.url, reconnect_timeout=0.5, progress_interval=0.0,
                            store=store_settings)
    request = JobRequest(workflow=Workflow.model_validate(IMG2IMG), inputs={"face.png": png}, timeout=60)
    try:
        async with RunPodEndpointDouble(worker_module.handler, api_key=API_KEY) as endpoint:
            plain = make_runner(endpoint, worker="gpubridge")
            with pytest.raises(PayloadTooLarge):  # no store: the body is over RunPod's 10 MB
                await plain.submit(request)
            await plain.aclose()
            runner = make_runner(endpoint, worker="gpubridge", artifacts=ArtifactStore(store_settings))
            try:
                result = await runner.run(request)
            finally:
                await runner.aclose()
    finally:
        await worker_module.aclose()
    assert len(result.images) == 1 and endpoint.counters["too_large"] == 0
    bucket = store_settings.url.split("/")[2]
    keys = [o["Key"] for o in _s3(store_settings.endpoint_url).list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("gb/inputs/") and k.endswith("face.png") for k in keys), keys
