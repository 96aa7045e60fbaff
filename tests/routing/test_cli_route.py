"""``gpubridge route`` and the instances in ``gpubridge providers``; no backend is called."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.config import Settings
from gpubridge.models import JobRequest, Workflow
from gpubridge.shadow.runner import ShadowRunner
from gpubridge.shadow.stages import build_stage_runner
from gpubridge.shadow.store import MemorySink

from ..shadow.helpers import ImageRunner

ROOT = Path(__file__).resolve().parents[2]
cli = CliRunner()
CONFIG = '''provider = "local"
fallbacks = ["runpod-image"]

[providers.runpod-image]
type = "runpod"
endpoint_id = "ep-image"
api_key = "k"

[providers.modal-faceswap]
type = "modal"

[[routes]]
name = "inverts"
match = { template = "model_free*" }
providers = ["modal-faceswap", "runpod-image"]

[[routes]]
name = "vip"
match = { tags = { tier = "vip" } }
providers = ["runpod-image"]
shadow = "modal-faceswap"
shadow_rate = 0.2
'''


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gpubridge.toml"
    path.write_text(CONFIG)
    return path


def test_route_says_which_route_and_why(config: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # templates from ./workflows
    res = cli.invoke(app, ["route", "--template", "model_free_invert", "--param", "color=1", "--config",
                           str(config), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["route"], info["line"]) == ("inverts", 12)
    assert info["reason"] == "template 'model_free_invert' matches 'model_free*'"
    assert info["providers"] == [{"name": "modal-faceswap", "type": "modal"}, {"name": "runpod-image", "type": "runpod"}]
    vip = json.loads(cli.invoke(app, ["route", str(ROOT / "workflows" / "flux_schnell_t2i.json"), "--tag",
                                      "tier=vip", "--config", str(config), "--json"]).stdout)
    assert (vip["route"], vip["shadow"], vip["shadow_rate"]) == ("vip", "modal-faceswap", 0.2)
    plain = cli.invoke(app, ["route", str(ROOT / "workflows" / "flux_schnell_t2i.json"), "--config", str(config)])
    assert "route default" in plain.stdout and "local -> runpod-image (runpod)" in plain.stdout


def test_route_refuses_a_bad_config(config: Path):
    config.write_text(CONFIG.replace('providers = ["runpod-image"]\nshadow', 'providers = ["runpod-imag"]\nshadow'))
    res = cli.invoke(app, ["route", str(ROOT / "workflows" / "flux_schnell_t2i.json"), "--config", str(config)])
    assert res.exit_code == 2 and "no provider 'runpod-imag'" in res.output


def test_providers_lists_instances_with_their_type_and_routes(config: Path):
    res = cli.invoke(app, ["providers", "--config", str(config), "--json"])
    assert res.exit_code == 0, res.output
    rows = {i["name"]: i for i in json.loads(res.stdout)["instances"]}
    assert rows["runpod-image"] == {"name": "runpod-image", "type": "runpod", "routes": ["inverts", "vip", "default"]}
    assert rows["modal-faceswap"]["type"] == "modal" and rows["local"]["type"] == "local"


async def test_each_routes_shadow_records_are_judged_apart():
    settings = Settings(provider="ctl", shadow="cand", shadow_rate=1.0)
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    sink = MemorySink()
    runner = build_stage_runner(settings, {"ctl": ctl, "cand": cand}.__getitem__, sink=sink,
                                rng=random.Random(0), group="faceswap")
    assert isinstance(runner, ShadowRunner)
    wf = Workflow.load(ROOT / "workflows" / "model_free_invert.json")
    await runner.run(JobRequest(workflow=wf, tags={"workflow": "invert"}))
    await runner.drain()
    assert sink.records and {r.workflow for r in sink.records} == {"faceswap/invert"}

