"""The artifact store against a real S3-protocol server on loopback (moto's server mode): uploads, presigned
URLs from boto3, the threshold, request prefixes kept inside the bucket, and URL artifacts streamed to disk
with their size cap and checksum."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from gpubridge.errors import InputUnavailable, PayloadTooLarge, ProtocolError, WorkflowInputError
from gpubridge.models import Artifact, ArtifactKind, JobResult
from gpubridge.storage import ArtifactStore, StoreSettings, parse_size


def _art(size: int, name: str = "clip.webm") -> Artifact:
    return Artifact(node_id="7", kind=ArtifactKind.VIDEO, filename=name, mime_type="video/webm",
                    data=os.urandom(size))


async def test_large_outputs_leave_as_presigned_urls_and_small_ones_stay_inline(store_settings):
    store = ArtifactStore(store_settings)
    big, small = _art(3_000_000), _art(1000, "thumb.png")
    result = JobResult(job_id="job-1", provider="local", artifacts=[big, small, Artifact(
        node_id="9", kind=ArtifactKind.TEXT, text="a caption")])
    out = await store.offload(result)
    up, kept, text = out.artifacts
    assert up.holds == "url" and up.data is None and up.size == 3_000_000
    assert up.sha256 == hashlib.sha256(big.data).hexdigest() and up.url_expires_at is not None
    assert "/gb/job-1/" in up.url and "clip.webm" in up.url
    assert kept.holds == "bytes" and kept.data == small.data and text.holds == "text"
    got = httpx.get(up.url)
    assert got.status_code == 200 and got.content == big.data
    assert got.headers["content-type"] == "video/webm"
    only_small = JobResult(job_id="j", provider="p", artifacts=[small])
    assert await store.offload(only_small) is only_small  # nothing over the threshold: nothing uploaded


async def test_threshold_all_and_none(store_settings):
    every = ArtifactStore(store_settings.model_copy(update={"threshold": "all"}))
    assert (await every.offload_artifact(_art(10))).holds == "url"
    never = ArtifactStore(store_settings.model_copy(update={"threshold": "none"}))
    assert (await never.offload_artifact(_art(5_000_000))).holds == "bytes"
    assert parse_size("5MB") == 5_000_000 and parse_size("1MiB") == 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError):
        StoreSettings(url="s3://b", threshold="lots")
    with pytest.raises(ValueError):
        StoreSettings(url="https://bucket.example.com/x")


@pytest.mark.parametrize("prefix", ["../other", "/abs", "a//b", "a/../../b", "x\\y", "sp ace", "."])
def test_a_request_prefix_never_leaves_the_configured_bucket_and_prefix(store_settings, prefix):
    store = ArtifactStore(store_settings)
    with pytest.raises(WorkflowInputError, match="store prefix"):
        store.key("f.png", prefix=prefix)
    key = store.key("../../etc/passwd", job_id="j/../1", prefix="team-a/renders")
    assert key.startswith("gb/team-a/renders/j_.._1/") and key.endswith("-passwd")


def test_credentials_never_show(store_settings):
    store = ArtifactStore(store_settings)
    for text in (repr(store), str(store), repr(store_settings), str(store_settings.model_dump())):
        assert "testing-secret-9f2" not in text


async def test_url_artifacts_stream_to_disk_with_cap_and_checksum(store_settings, tmp_path):
    store = ArtifactStore(store_settings)
    art = await store.offload_artifact(_art(2_500_000))
    path = art.save(tmp_path / "out")
    assert path.read_bytes() and hashlib.sha256(path.read_bytes()).hexdigest() == art.sha256
    assert "X-Amz-Signature" not in repr(art)  # a presigned URL is a credential: not in reprs

    with pytest.raises(PayloadTooLarge):
        art.save(tmp_path / "capped", max_bytes=1_000_000)
    assert list((tmp_path / "capped").iterdir()) == []  # nothing half-written is left

    forged = art.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ProtocolError, match="sha256"):
        forged.save(tmp_path / "forged")
    assert list((tmp_path / "forged").iterdir()) == []

    gone = art.model_copy(update={"url": art.url.replace("clip.webm", "deleted.webm")})  # a removed object
    with pytest.raises(InputUnavailable, match="HTTP 404") as info:
        gone.save(tmp_path / "gone")
    assert "X-Amz-Signature" not in str(info.value) and not info.value.retryable


def test_a_request_prefix_is_checked_when_the_request_is_made():
    from gpubridge.models import JobRequest

    ok = JobRequest(workflow={"1": {"class_type": "SaveImage", "inputs": {}}}, store_prefix="team-a/renders")
    assert ok.store_prefix == "team-a/renders"
    with pytest.raises(WorkflowInputError, match="store prefix"):
        JobRequest(workflow={"1": {"class_type": "SaveImage", "inputs": {}}}, store_prefix="../other-bucket")
