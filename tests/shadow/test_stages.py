"""Stages in configuration: off, shadow, canary, cutover; and the canary's split runner."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scipy.stats import binom

from gpubridge.config import Settings
from gpubridge.errors import ConfigError, JobNotFound
from gpubridge.models import HealthReport, HealthState, JobHandle
from gpubridge.shadow.runner import ShadowRunner, SplitRunner
from gpubridge.shadow.settings import Stage, default_db_path
from gpubridge.shadow.stages import build_stage_runner, describe_stage, resolve_stage
from gpubridge.shadow.store import MemorySink, SQLiteSink

from .helpers import ImageRunner, request


class Factory:
    def __init__(self, broken: set[str] = frozenset()):  # type: ignore[assignment]
        self.built: dict[str, ImageRunner] = {}
        self.broken = broken

    def __call__(self, name: str) -> ImageRunner:
        if name in self.broken:
            raise ConfigError(f"{name} is not configured")
        self.built[name] = ImageRunner(name, auto="succeed")
        return self.built[name]


def test_env_vars_enable_shadow(in_tmp: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_PROVIDER", "runpod")
    monkeypatch.setenv("GPUBRIDGE_SHADOW", "modal")
    monkeypatch.setenv("GPUBRIDGE_SHADOW_RATE", "0.1")
    s = Settings.load()
    assert resolve_stage(s) is Stage.SHADOW
    runner = build_stage_runner(s, Factory(), sink=MemorySink())
    assert isinstance(runner, ShadowRunner)
    assert (runner.control.name, runner.candidate.name, runner.sample_rate) == ("runpod", "modal", 0.1)


def test_toml_expresses_every_stage(in_tmp: Path):
    base = 'provider = "runpod"\nshadow = "modal"\nshadow_rate = 0.25\ncanary_weight = 0.2\n'
    opts = '[shadow_options]\nmax_inflight = 3\ntimeout = 90\nseed = 7\ndb = "{db}"\n' \
           '[shadow_options.thresholds]\nmin_samples = 500\nmax_mismatch_rate = 0.02\n'
    db = in_tmp / "records.sqlite3"
    for stage in ("off", "shadow", "canary", "cutover"):
        (in_tmp / "gpubridge.toml").write_text(f'stage = "{stage}"\n' + base + opts.format(db=db))
        s = Settings.load()
        assert s.shadow_options.thresholds.min_samples == 500 and s.shadow_options.db_path() == db
        f = Factory()
        runner = build_stage_runner(s, f)
        if stage == "off":
            assert runner is f.built["runpod"] and list(f.built) == ["runpod"]
        elif stage == "cutover":
            assert runner is f.built["modal"] and list(f.built) == ["modal"]
        elif stage == "canary":
            assert isinstance(runner, SplitRunner)
            arms = zip(runner.choice.options, runner.choice.weights, strict=True)
            assert [(r.name, w) for r, w in arms] == [("runpod", 0.8), ("modal", 0.2)]
        else:
            assert isinstance(runner, ShadowRunner) and runner.sample_rate == 0.25
            assert runner.admission.max_inflight == 3 and runner.timeout == 90
            assert isinstance(runner.sink, SQLiteSink) and runner.sink.path == db
        assert describe_stage(s)["stage"] == stage


def test_stage_defaults_and_errors(in_tmp: Path):
    assert resolve_stage(Settings.load()) is Stage.OFF
    assert resolve_stage(Settings.load(shadow="modal")) is Stage.OFF  # rate 0: nothing to mirror
    assert Settings.load().shadow_options.db_path() == default_db_path()
    assert str(default_db_path()).endswith(".local/share/gpubridge/shadow.sqlite3")
    with pytest.raises(ConfigError, match="needs `shadow`"):
        build_stage_runner(Settings.load(stage="canary"), Factory())
    with pytest.raises(ConfigError, match="nothing to migrate"):
        build_stage_runner(Settings.load(stage="cutover", shadow="local"), Factory())
    with pytest.raises(ConfigError):
        Settings.load(shadow_rate=1.5)
    (in_tmp / "gpubridge.toml").write_text("[shadow_options]\nmax_inflite = 3\n")
    with pytest.raises(ConfigError, match="max_inflite"):
        Settings.load()


def test_a_broken_shadow_provider_leaves_the_control_alone(in_tmp: Path):
    s = Settings.load(provider="runpod", shadow="modal", shadow_rate=0.5)
    f = Factory(broken={"modal"})
    assert build_stage_runner(s, f, sink=MemorySink()) is f.built["runpod"]
    with pytest.raises(ConfigError):  # in the canary the candidate carries traffic
        build_stage_runner(s.model_copy(update={"stage": Stage.CANARY}), Factory(broken={"modal"}))


# ------------------------------------------------------------------------------------------- split runner


async def test_split_honours_weight_within_binomial_bounds():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    split = SplitRunner([(ctl, 0.9), (cand, 0.1)], rng=random.Random(11))
    n = 4000
    for _ in range(n):
        await split.run(request())
    lo, hi = int(binom.ppf(1e-6 / 2, n, 0.1)), int(binom.isf(1e-6 / 2, n, 0.1))
    assert lo <= len(cand.jobs) <= hi and len(ctl.jobs) + len(cand.jobs) == n
    assert split.counts == {"ctl": len(ctl.jobs), "cand": len(cand.jobs)}


async def test_split_routes_later_calls_to_the_runner_that_took_the_job():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand")
    split = SplitRunner([(ctl, 0.0), (cand, 1.0)], rng=random.Random(0))
    handle = await split.submit(request())
    assert handle.provider == "cand"
    cand.succeed(handle.job_id)
    assert (await split.status(handle.job_id)).provider == "cand"
    assert (await split.wait(handle.job_id)).provider == "cand"
    assert [e.provider async for e in split.events(handle.job_id)] == ["cand", "cand"]
    await split.cancel(handle.job_id)
    assert cand.cancelled == [handle.job_id] and ctl.cancelled == []


async def test_split_unknown_job_by_provider_or_first_that_knows_it():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand")
    other = SplitRunner([(ctl, 0.5), (cand, 0.5)])
    h = await cand.submit(request())  # submitted elsewhere (another process)
    cand.succeed(h.job_id)
    assert (await other.wait(JobHandle(job_id=h.job_id, provider="cand"))).provider == "cand"
    assert (await other.status(h.job_id)).provider == "cand"  # ctl: JobNotFound, then cand
    with pytest.raises(JobNotFound):
        await other.status("nobody-1")


async def test_split_is_sticky_by_idempotency_key():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    split = SplitRunner([(ctl, 0.5), (cand, 0.5)], rng=random.Random(0))
    providers = {(await split.run(request(idempotency_key="order-42"))).provider for _ in range(20)}
    assert len(providers) == 1


async def test_split_health_and_close():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand")

    async def down() -> HealthReport:
        return HealthReport(provider="cand", state=HealthState.UNHEALTHY, message="no workers")

    split = SplitRunner([(ctl, 0.9), (cand, 0.1)])
    assert (await split.health()).state is HealthState.HEALTHY
    cand.health = down  # type: ignore[method-assign]
    report = await split.health()
    assert report.state is HealthState.DEGRADED
    assert [c["state"] for c in report.details["components"]] == ["healthy", "unhealthy"]
    await split.aclose()
    assert ctl.closed and cand.closed
