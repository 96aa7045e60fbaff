"""The CLI through its real entry point, against the ComfyUI double on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.testing import ComfyDouble, ErrorFault

from .conftest import EXAMPLES, ROOT

runner = CliRunner()
MODEL_FREE = str(EXAMPLES / "model_free_invert.json")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with ComfyDouble(root=tmp_path_factory.mktemp("comfy")).run_in_thread() as double:
        yield double


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def test_run_writes_artifacts_and_prints_timings(comfy, tmp_path):
    out = tmp_path / "out"
    res = invoke("run", MODEL_FREE, "--provider", "local", "--out", str(out), env={"GPUBRIDGE_COMFY_URL": comfy.url})
    assert res.exit_code == 0, res.output
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".png", ".png"]
    assert "timings:" in res.output and "total" in res.output and "256x256" in res.output


def test_run_json_has_no_bytes_and_set_overrides_apply(comfy, tmp_path):
    res = invoke("run", MODEL_FREE, "--url", comfy.url, "--json", "--set", "Canvas.width=32",
                 "--set", "1.height=16", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["state"] == "succeeded" and data["provider"] == "local"
    assert [(a["width"], a["height"]) for a in data["artifacts"]] == [(32, 16), (32, 16)]
    assert all("data" not in a and Path(a["path"]).is_file() for a in data["artifacts"])


def test_run_with_an_input_image(comfy, tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({
        "1": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "in"}}}))
    res = invoke("run", str(wf), "--url", comfy.url, "--input", f"input.png={ROOT / 'examples' / 'inputs' / 'input.png'}",
                 "--json")
    assert res.exit_code == 0, res.output
    assert [(a["width"], a["height"]) for a in json.loads(res.stdout)["artifacts"]] == [(96, 64)]


def test_failures_exit_non_zero_with_the_typed_message(comfy, tmp_path):
    res = invoke("run", MODEL_FREE, "--url", comfy.url, "--set", "Canvas.widht=3")
    assert res.exit_code != 0 and "has no input 'widht'" in res.output
    res = invoke("run", MODEL_FREE, "--url", comfy.url, "--set", "Canvas.width=0")
    assert res.exit_code == 2 and "WorkflowInvalid" in res.output and "node 1 (EmptyImage)" in res.output
    comfy.faults.error = ErrorFault(class_type="ImageInvert", times=1)
    res = invoke("run", MODEL_FREE, "--url", comfy.url, "--json")
    assert res.exit_code == 1
    err = json.loads(res.stdout)["error"]
    assert err["type"] == "JobFailed" and err["node_id"] == "2" and err["node_type"] == "ImageInvert"
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    res = invoke("run", str(ui), "--url", comfy.url)
    assert res.exit_code == 2 and "Export (API)" in res.output


def test_comfyui_not_running_names_the_url_and_how_to_start_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    res = invoke("run", MODEL_FREE, "--provider", "local", env={"GPUBRIDGE_COMFY_URL": url})
    assert res.exit_code == 3
    assert url in res.output and "gpubridge testing comfy" in res.output


def test_submit_status_result_cancel(comfy, tmp_path):
    res = invoke("submit", MODEL_FREE, "--url", comfy.url)
    assert res.exit_code == 0
    job_id = res.stdout.strip()
    res = invoke("result", job_id, "--url", comfy.url, "--out", str(tmp_path), "--json")
    assert res.exit_code == 0 and len(json.loads(res.stdout)["artifacts"]) == 2
    res = invoke("status", job_id, "--url", comfy.url, "--json")
    assert json.loads(res.stdout)["state"] == "succeeded"
    comfy.faults.paused = True
    try:
        job_id = invoke("submit", MODEL_FREE, "--url", comfy.url).stdout.strip()
        assert json.loads(invoke("status", job_id, "--url", comfy.url, "--json").stdout)["state"] == "queued"
        res = invoke("cancel", job_id, "--url", comfy.url, "--json")
        assert json.loads(res.stdout)["state"] == "cancelled"
    finally:
        comfy.faults.paused = False
    res = invoke("status", "no-such-job", "--url", comfy.url)
    assert res.exit_code == 1 and "JobNotFound" in res.output


def test_health(comfy):
    res = invoke("health", "--url", comfy.url, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["state"] == "healthy"


def test_providers_lists_builtins_with_their_source():
    res = invoke("providers", "--json")
    data = json.loads(res.stdout)
    local = next(p for p in data["providers"] if p["name"] == "local")
    assert local["source"] == "builtin" and local["plugin"] == "gpubridge.providers.local"


def test_third_party_provider_from_an_entry_point(comfy, tmp_path):
    """A plugin installed as a distribution (dist-info + entry point) shows up and runs a job; a broken
    one is reported without breaking the rest."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "gpubridge_thirdparty.py").write_text(textwrap.dedent("""
        from gpubridge.plugins import ProviderSpec, hookimpl
        from gpubridge.providers.local import LocalRunner

        @hookimpl
        def register_providers(register):
            register(ProviderSpec(
                name="thirdparty",
                factory=lambda settings, url=None, **kw: LocalRunner(url, name="thirdparty"),
                description="a plugin from another package",
            ))
    """))
    (site / "gpubridge_broken.py").write_text("raise ImportError('missing SDK for broken plugin')\n")
    dist = site / "gpubridge_thirdparty-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gpubridge-thirdparty\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(
        "[gpubridge]\nthirdparty = gpubridge_thirdparty\nbroken = gpubridge_broken\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "gpubridge.cli"]
    listed = subprocess.run([*cli, "providers", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    third = next(p for p in data["providers"] if p["name"] == "thirdparty")
    assert third["source"] == "entry point thirdparty (gpubridge-thirdparty 1.2.3)"
    assert {p["name"] for p in data["providers"]} >= {"local", "thirdparty"}
    assert any(f["plugin"] == "broken" and "missing SDK" in f["error"] for f in data["failures"])
    ran = subprocess.run([*cli, "run", MODEL_FREE, "--provider", "thirdparty", "--url", comfy.url, "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["provider"] == "thirdparty"


def test_testing_comfy_serves_the_double(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "gpubridge.cli", "testing", "comfy", "--port", "0",
                             "--root", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        res = invoke("run", MODEL_FREE, "--url", url, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["state"] == "succeeded"
    finally:
        proc.terminate()
        proc.wait(10)


def test_help_texts_keep_their_toml_table_names():
    """Rich reads "[name]" as markup; an unescaped table name vanished from `shadow report --help` (issue 25,
    item 5)."""
    from typer.testing import CliRunner

    from gpubridge.cli import app

    out = CliRunner().invoke(app, ["shadow", "report", "--help"], env={"COLUMNS": "200"}).output
    assert "[shadow_options]" in out
