"""Shared test setup: no real credentials, no user config, loopback only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "workflows"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test starts without gpubridge/Modal/RunPod settings from the developer's machine."""
    for key in list(os.environ):
        if key.startswith(("GPUBRIDGE_", "RUNPOD_", "MODAL_")):
            monkeypatch.delenv(key, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    empty = home / "modal.toml"
    empty.write_text("")
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(empty))  # never a real Modal token
    yield


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test with the working directory in an empty temp dir (no ./gpubridge.toml)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server on loopback (moto's server mode), one per test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def store_settings(s3_endpoint: str, request: pytest.FixtureRequest):
    """StoreSettings for a fresh bucket on the loopback S3 server (threshold 1 MB, 1 h URLs)."""
    import re
    import uuid

    import boto3

    from gpubridge.storage import StoreSettings

    bucket = re.sub(r"[^a-z0-9-]", "-", f"t-{uuid.uuid4().hex[:8]}-{request.node.name.lower()}")[:60].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    return StoreSettings(url=f"s3://{bucket}/gb", endpoint_url=s3_endpoint, region="us-east-1",
                         access_key_id="testing", secret_access_key="testing-secret-9f2", threshold="1MB")
