"""The CLI on a bad day (issue 10 items 6, 8, 9): SIGTERM cancels the remote job and exits 143; output names
never leave --out; bad config files and timeouts are exit 2 with a message, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpubridge import cli
from gpubridge.cli import app
from gpubridge.models import Artifact, ArtifactKind, JobResult, JobState
from gpubridge.testing import ComfyDouble

from .conftest import EXAMPLES

runner = CliRunner()
MODEL_FREE = str(EXAMPLES / "model_free_invert.json")
FLUX = str(EXAMPLES / "flux_schnell_t2i.json")


# ------------------------------------------------------------------------------------------- SIGTERM


async def _read_until(stream: asyncio.StreamReader, marker: bytes, seen: bytearray) -> None:
    while marker not in seen:
        chunk = await stream.read(4096)
        if not chunk:
            raise AssertionError(f"the CLI ended before printing {marker!r}: {bytes(seen)[-500:]!r}")
        seen += chunk


@pytest.mark.parametrize("stage", ["queued", "running"])
async def test_sigterm_cancels_the_remote_job_and_exits_143(tmp_path: Path, stage: str):
    async with ComfyDouble(root=tmp_path / "comfy") as comfy:
        if stage == "queued":
            comfy.pause()  # the job waits in ComfyUI's queue
        else:
            comfy.faults.step_delay = 0.05  # 10,000 sampler steps: runs until interrupted
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpubridge.cli", "run", FLUX, "--url", comfy.url,
            "--set", "KSampler.steps=10000", "--set", "Size.width=64", "--set", "Size.height=64",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "200"},  # live progress on the stderr pipe
        )
        seen = bytearray()
        try:
            await comfy.wait_for_prompts(1, timeout=20)
            (prompt_id,) = list(comfy.jobs)
            await comfy.wait_for_state(prompt_id, "pending" if stage == "queued" else "running")
            # The progress line comes from the job's events, which the CLI follows once its submit returned.
            assert proc.stderr is not None
            await asyncio.wait_for(_read_until(proc.stderr, b"queued" if stage == "queued" else b"running", seen),
                                   20)
            proc.send_signal(signal.SIGTERM)
            _, rest = await asyncio.wait_for(proc.communicate(), 20)
            seen += rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 143, bytes(seen)[-2000:]
        job = await comfy.wait_for_state(prompt_id, "interrupted", "deleted", timeout=5)
        assert job.state == ("deleted" if stage == "queued" else "interrupted")
        assert b"Traceback" not in seen and b"terminated" in seen


async def test_sigterm_while_the_submit_is_in_flight_leaves_no_orphan(tmp_path: Path):
    """SIGTERM lands while POST /prompt is still in flight: the CLI must not close its connections before
    the prompt it is creating is known and cancelled (it would be queued, then run unobserved)."""
    async with ComfyDouble(root=tmp_path / "comfy") as comfy:
        comfy.pause()  # once queued the prompt stays queued: only the CLI's cancel can remove it
        comfy.faults.hold_prompts = True  # the POST's body is read, then held: the submit is in flight
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpubridge.cli", "run", MODEL_FREE, "--url", comfy.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            await comfy.wait_until(lambda: comfy.stats.prompts_arrived >= 1, timeout=20)
            proc.send_signal(signal.SIGTERM)
            comfy.faults.hold_prompts = False  # the held POST now queues the prompt
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 143, err[-2000:]
        (prompt_id,) = list(comfy.jobs)
        job = await comfy.wait_for_state(prompt_id, "deleted", "interrupted", timeout=5)
        assert job.state == "deleted"
        assert b"Traceback" not in err


# ------------------------------------------------------------------------------------- output names


HOSTILE_NAMES = ["..", "a\x00b", "/etc/x", "../../escape.png", "sub/dir/../../../up.png", ".", "C:\\evil.png", ""]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_result_save_keeps_every_name_inside_the_folder(tmp_path: Path):
    out = tmp_path / "deep" / "out"
    arts = [Artifact(node_id="_modules/../../../x", kind=ArtifactKind.TEXT, text="hi"),
            Artifact(node_id="/abs", kind=ArtifactKind.IMAGE, data=b"img")]
    arts += [Artifact(node_id="9", kind=ArtifactKind.IMAGE, filename=name, data=b"x") for name in HOSTILE_NAMES]
    result = JobResult(job_id="j", provider="local", state=JobState.SUCCEEDED, artifacts=arts)
    paths = result.save(out)
    assert len(paths) == len(arts) == len(set(paths))
    for path in paths:
        assert path.parent == out and path.is_file(), path
        assert "\x00" not in path.name and path.name not in ("", ".", "..")
    assert _files_under(tmp_path) == set(paths)
    single = arts[0].save(out, name="../../single.txt")
    assert single.parent == out


def test_cli_run_node_id_with_dot_dot_writes_only_inside_out(comfy_thread: Any, tmp_path: Path):
    """A node id of ``_modules/../../../x`` made the fallback name ``node_modules/../../../x_text.txt``."""
    wf = json.loads(Path(MODEL_FREE).read_text())
    wf["_modules/../../../x"] = {"class_type": "PreviewAny", "inputs": {"source": "hello"}}
    path = tmp_path / "a" / "b" / "wf.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(wf))
    out = tmp_path / "a" / "b" / "out"
    res = runner.invoke(app, ["run", str(path), "--url", comfy_thread.url, "--out", str(out), "--json"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.exception is None
    written = _files_under(tmp_path) - {path}
    assert written and all(p.parent == out for p in written), written
    assert any(p.read_text(errors="replace") == "hello" for p in written)


def test_cli_run_hostile_filenames_write_only_inside_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    arts = [Artifact(node_id="9", kind=ArtifactKind.IMAGE, filename=name, data=b"x") for name in HOSTILE_NAMES]

    class Hostile:
        name = "hostile"

        async def __aenter__(self) -> Hostile:
            return self

        async def __aexit__(self, *exc: Any) -> None:
            pass

        async def run(self, request: Any, on_event: Any = None) -> JobResult:
            return JobResult(job_id="j", provider="hostile", state=JobState.SUCCEEDED, artifacts=arts)

    monkeypatch.setattr(cli, "_runner", lambda *a: (Hostile(), None))
    out = tmp_path / "x" / "out"
    res = runner.invoke(app, ["run", MODEL_FREE, "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    written = _files_under(tmp_path)
    assert len(written) == len(arts) and all(p.parent == out for p in written), written


# ------------------------------------------------------------------------------ bad config and timeouts


@pytest.mark.parametrize("how", ["--config", "env"])
def test_non_utf8_config_file_exits_2_with_a_message(tmp_path: Path, how: str):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'provider = "l\xe9ocal"\n')
    args = ["health"] + (["--config", str(bad)] if how == "--config" else [])
    env = {"GPUBRIDGE_CONFIG": str(bad)} if how == "env" else None
    res = runner.invoke(app, args, env=env, catch_exceptions=False)
    assert res.exit_code == 2
    assert "UTF-8" in res.output and "bad.toml" in res.output


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
@pytest.mark.parametrize("command", ["run", "submit"])
def test_non_positive_timeout_exits_2_with_a_message(value: str, command: str):
    res = runner.invoke(app, [command, MODEL_FREE, "--timeout", value, "--url", "http://127.0.0.1:9"],
                        catch_exceptions=False)
    assert res.exit_code == 2
    assert "positive number of seconds" in res.output


def test_result_timeout_zero_exits_2():
    res = runner.invoke(app, ["result", "some-job", "--timeout", "0", "--url", "http://127.0.0.1:9"],
                        catch_exceptions=False)
    assert res.exit_code == 2 and "positive number of seconds" in res.output


@pytest.fixture(scope="module")
def comfy_thread(tmp_path_factory: pytest.TempPathFactory):
    with ComfyDouble(root=tmp_path_factory.mktemp("comfy")).run_in_thread() as double:
        yield double
