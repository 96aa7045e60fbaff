"""Large outputs through the Modal job API with an artifact store (a real S3-protocol server on loopback):
the GPU side uploads next to ComfyUI, the result carries a presigned URL, and `gpubridge run --out` streams
the same bytes to disk."""

from __future__ import annotations

import hashlib
import json

import boto3
import httpx

from gpubridge.storage import ArtifactStore

from .conftest import serve_api
from .test_cli_e2e import _empty_config, cli

VIDEO = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 3, "color": 255}},
    "2": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "clip", "codec": "vp9",
                                               "fps": 24.0, "crf": 32.0}},
}
SIZE = 30_000_000


def _objects(settings) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=settings.endpoint_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = settings.url.split("/")[2]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_a_30mb_video_comes_back_as_a_url_and_run_out_writes_the_same_bytes(
    threaded_comfy, store_settings, monkeypatch, capsys, tmp_path
):
    httpx.post(f"{threaded_comfy.url}/gpubridge/faults", json={"output_size": SIZE}).raise_for_status()
    workflow = tmp_path / "video.json"
    workflow.write_text(json.dumps(VIDEO))
    with serve_api(threaded_comfy.url, worker={"artifacts": ArtifactStore(store_settings)}) as (url, backend):
        monkeypatch.setenv("GPUBRIDGE_MODAL_URL", url)
        monkeypatch.setenv("GPUBRIDGE_MODAL_TOKEN", "test-token-7f3a9c")
        monkeypatch.setenv("GPUBRIDGE_CONFIG", str(_empty_config(monkeypatch)))
        out_dir = tmp_path / "out"
        code, out, err = cli(capsys, "run", "--provider", "modal", str(workflow), "--out", str(out_dir), "--json",
                             "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    stored = _objects(store_settings)
    assert len(stored) == 1, list(stored)
    (key, body), = stored.items()
    assert key.startswith("gb/") and key.endswith(".webm") and len(body) == SIZE
    files = list(out_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".webm"
    assert hashlib.sha256(files[0].read_bytes()).hexdigest() == hashlib.sha256(body).hexdigest()
    art = summary["artifacts"][0]  # the job API sent a URL, not 40 MB of base64
    assert art["url"].startswith(store_settings.endpoint_url) and art["size"] == SIZE
    assert art["sha256"] == hashlib.sha256(body).hexdigest() and art["url_expires_at"] > 0


def test_a_request_prefix_places_outputs_and_a_bad_one_is_a_422(threaded_comfy, store_settings):
    httpx.post(f"{threaded_comfy.url}/gpubridge/faults", json={"output_size": 2_000_000}).raise_for_status()
    headers = {"Authorization": "Bearer test-token-7f3a9c"}
    with serve_api(threaded_comfy.url, worker={"artifacts": ArtifactStore(store_settings)}) as (url, _):
        bad = httpx.post(f"{url}/v1/run", json={"workflow": VIDEO, "store_prefix": "../elsewhere"}, headers=headers,
                         timeout=30)
        assert bad.status_code == 422 and "store prefix" in bad.text
        good = httpx.post(f"{url}/v1/run", json={"workflow": VIDEO, "store_prefix": "team-a/renders"},
                          headers=headers, timeout=60)
    assert good.status_code == 200, good.text
    assert all(k.startswith("gb/team-a/renders/") for k in _objects(store_settings))
