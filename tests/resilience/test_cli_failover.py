"""`gpubridge run` against a failing primary: the failover shows in the output and the result names the
provider that served it; `gpubridge health` shows every provider and its circuit."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.testing import ComfyDouble

from ..conftest import EXAMPLES

MODEL_FREE = str(EXAMPLES / "model_free_invert.json")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with ComfyDouble(root=tmp_path_factory.mktemp("comfy")).run_in_thread() as double:
        yield double


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def env(comfy) -> dict[str, str]:
    return {
        "GPUBRIDGE_PROVIDER": "modal",
        "GPUBRIDGE_MODAL_URL": dead_url(),  # the primary is down
        "GPUBRIDGE_MODAL_TOKEN": "t0ken-never-printed",
        "GPUBRIDGE_FALLBACKS": "local",
        "GPUBRIDGE_COMFY_URL": comfy.url,
    }


def test_run_shows_the_failover_and_names_the_serving_provider(comfy, in_tmp):
    res = CliRunner().invoke(app, ["run", MODEL_FREE], env=env(comfy), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "failing over from modal to local" in res.output
    assert "job modal:" not in res.output and "on local: succeeded" in res.output
    assert "attempts: modal=failed, local=succeeded" in res.output
    assert "t0ken" not in res.output

    res = CliRunner().invoke(app, ["run", MODEL_FREE, "--json"], env=env(comfy), catch_exceptions=False)
    data = json.loads(res.stdout)
    assert data["provider"] == "local"
    assert [(a["provider"], a["outcome"]) for a in data["attempts"]] == [("modal", "failed"), ("local", "succeeded")]
    assert data["attempts"][0]["error"]["type"] == "ProviderUnavailable"


def test_health_lists_every_provider_with_its_circuit(comfy, in_tmp):
    res = CliRunner().invoke(app, ["health", "--json"], env=env(comfy), catch_exceptions=False)
    report = json.loads(res.stdout)
    assert report["state"] == "degraded" and "serving from local" in report["message"]
    rows = {c["provider"]: c for c in report["details"]["components"]}
    assert rows["modal"]["state"] == "unhealthy" and rows["local"]["state"] == "healthy"
    assert rows["modal"]["circuit"] in ("closed", "open") and rows["local"]["circuit"] == "closed"
    assert res.exit_code == 0  # degraded still serves
    table = CliRunner().invoke(app, ["health"], env=env(comfy), catch_exceptions=False)
    assert "components" in table.output and "modal" in table.output and "local" in table.output
