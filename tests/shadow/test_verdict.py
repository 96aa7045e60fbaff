"""The go/no-go verdict of issue 22: every group judged, uncertainty, a robust noise floor, one provider
pair, missing figures and billed failures (defects 1, 2, 3, 9 and 10)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.shadow.compare import Comparison
from gpubridge.shadow.report import Verdict, build_report
from gpubridge.shadow.settings import ShadowOptions, ShadowThresholds
from gpubridge.shadow.store import SQLiteSink

from .helpers import record

T0 = 1_700_000_000.0


def pairs(wf: str, n: int, *, start: float = T0, fail_every: int = 0, ctl_fail_every: int = 0,
          distance: float = 0.0, candidate: str = "modal", ctl_s: float = 1.0, cand_s: float = 1.0,
          **kw) -> list[Comparison]:
    out = []
    for i in range(n):
        cand_ok = not (fail_every and i % fail_every == fail_every - 1)
        ctl_ok = not (ctl_fail_every and i % ctl_fail_every == ctl_fail_every - 1)
        rec = record(wf, ctl_ok=ctl_ok, cand_ok=cand_ok, distance=distance, at=start + i, ctl_s=ctl_s,
                     cand_s=cand_s, **kw)
        rec.candidate.provider = candidate if rec.candidate.provider == "modal" else rec.candidate.provider
        out.append(rec)
    return out


def noise(wf: str, distances: list[float]) -> list[Comparison]:
    return [record(wf, "noise", distance=d, at=T0 - 100 + i) for i, d in enumerate(distances)]


def test_small_failing_groups_are_never_dropped(tmp_path: Path, in_tmp: Path):
    """Defect 1: 2,000 healthy txt2img pairs hid inpaint failing 20 of 20 and upscale 60 of 60 mismatched:
    overall `go`, and `shadow report --check` exited 0."""
    records = [
        *pairs("txt2img", 2000),
        *pairs("inpaint", 20, start=T0 + 5000, fail_every=1),
        *pairs("upscale", 60, start=T0 + 6000, distance=40.0),
        *noise("txt2img", [1.0] * 30), *noise("upscale", [1.0] * 30),
    ]
    rep = build_report(records, ShadowOptions())
    by = {g.workflow: g for g in rep.workflows}
    assert by["inpaint"].verdict is Verdict.NO_GO and by["inpaint"].samples < rep.thresholds.min_samples
    assert by["upscale"].verdict is Verdict.NO_GO
    assert rep.verdict is Verdict.NO_GO
    assert any(r.startswith("inpaint: success_rate_drop") for r in rep.reasons)
    assert any(r.startswith("upscale: mismatch_rate") for r in rep.reasons)

    db = tmp_path / "shadow.sqlite3"

    async def write() -> None:
        sink = SQLiteSink(db)
        await sink.write_many(records)
        await sink.aclose()

    asyncio.run(write())
    res = CliRunner().invoke(app, ["shadow", "report", "--db", str(db), "--format", "json", "--check"])
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout)["verdict"] == "no-go"


OPTS = ShadowOptions(thresholds=ShadowThresholds(max_p95_latency_ratio=None))


def test_a_point_estimate_within_the_margin_is_not_go():
    """Defect 2: 160 pairs where the candidate failed 3 and the control 2 (a draw that happens when the
    candidate fails 3 % against 1 %) gave `go` on the point estimate."""
    rep = build_report(pairs("t2i", 160, fail_every=50, ctl_fail_every=80), OPTS)
    assert rep.verdict is not Verdict.GO
    drop = rep.overall.criteria[0]
    assert drop.name == "success_rate_drop" and drop.estimate == pytest.approx(1 / 160)
    assert drop.upper is not None and drop.upper > 0.01 and drop.verdict is Verdict.INSUFFICIENT_DATA
    assert rep.verdict is Verdict.INSUFFICIENT_DATA and rep.pairs_needed is None or rep.pairs_needed > 0


def test_a_mismatch_rate_under_the_limit_by_chance_is_not_go():
    """Defect 2: 5 of 100 mismatched (a usual draw at 8 % against a 5 % limit) gave `go`."""
    recs = pairs("t2i", 100)
    for r in recs[::20]:
        r.phash_distance = 40.0
    rep = build_report([*recs, *noise("t2i", [1.0] * 30)], OPTS)
    assert rep.verdict is not Verdict.GO
    mm = next(c for c in rep.overall.criteria if c.name == "mismatch_rate")
    assert mm.estimate == pytest.approx(0.05) and mm.verdict is Verdict.INSUFFICIENT_DATA
    assert rep.verdict is not Verdict.GO


def test_identical_providers_are_not_no_go_on_noise():
    """Defect 2: identical providers got `no-go` 11 % of the time (e.g. 3 failures against 1 in 100)."""
    rep = build_report(pairs("t2i", 100, fail_every=33, ctl_fail_every=100), OPTS)
    assert rep.verdict is Verdict.INSUFFICIENT_DATA
    assert rep.overall.candidate.successes == 97 and rep.overall.control.successes == 99
    assert rep.pairs_needed is not None and rep.pairs_needed > 0


def test_one_noise_outlier_does_not_set_the_floor():
    """Defect 3: eleven noise pairs at 2 bits and one at 30 set the floor to 30: 200 candidate pairs at
    24 bits all passed."""
    rep = build_report([*pairs("t2i", 200, distance=24.0), *noise("t2i", [2.0] * 11 + [30.0])], OPTS)
    g = rep.workflows[0]
    assert (g.noise_floor, g.noise_pairs) == (2.0, 12) and g.floor_source == "measured"
    assert g.mismatch_rate == 1.0 and rep.verdict is Verdict.NO_GO


def test_a_noisy_floor_at_small_n_is_capped_at_the_default():
    rep = build_report([*pairs("t2i", 10, distance=24.0), *noise("t2i", [30.0] * 12)], OPTS)
    g = rep.workflows[0]
    assert (g.noise_floor, g.floor_source, g.noise_pairs) == (8.0, "measured (capped)", 12)
    many = build_report([*pairs("t2i", 10, distance=24.0), *noise("t2i", [30.0] * 20)], OPTS)
    assert many.workflows[0].noise_floor == 30.0 and many.workflows[0].floor_source == "measured"


def test_the_report_judges_one_provider_pair_the_latest_by_default():
    """Defect 9: good pairs of an earlier candidate hid the current one failing 5 %."""
    old = pairs("t2i", 4000, candidate="modal-v1")
    new = pairs("t2i", 700, start=T0 + 10_000, fail_every=20, candidate="modal-v2")
    records = [*old, *new]
    rep = build_report(records, OPTS)
    assert rep.candidate == ["modal-v2"] and rep.overall.samples == 700
    assert rep.verdict is Verdict.NO_GO
    assert rep.pairs_available == {"runpod -> modal-v1": 4000, "runpod -> modal-v2": 700}
    assert any("other pairs in the window" in r for r in rep.reasons)
    earlier = build_report(records, OPTS, candidate="modal-v1")
    assert earlier.candidate == ["modal-v1"] and earlier.overall.samples == 4000


def test_a_missing_cost_under_a_cost_threshold_is_a_reason():
    """Defect 10: a cost threshold with a candidate that reports no cost gave `go` with no reason."""
    t = ShadowThresholds(max_p95_latency_ratio=None, max_success_rate_drop=None, max_mismatch_rate=None,
                         max_cost_per_image_ratio=1.5)
    rep = build_report(pairs("t2i", 200, ctl_cost=0.01), ShadowOptions(thresholds=t))
    assert rep.verdict is Verdict.INSUFFICIENT_DATA
    cost = rep.overall.criteria[0]
    assert cost.name == "cost_per_image_ratio" and cost.verdict is Verdict.INSUFFICIENT_DATA
    assert "cost missing for 160 successful candidate" in (cost.reason or "")
    assert rep.verdict is Verdict.INSUFFICIENT_DATA and any("cost missing" in r for r in rep.reasons)


def test_billed_failures_count_in_the_cost_per_delivered_image():
    """Defect 10: 1 % failures billed at 60x the price: the report said 1.00x, the real spend per delivered
    image is 1.61x."""
    t = ShadowThresholds(max_p95_latency_ratio=None, max_success_rate_drop=None, max_mismatch_rate=None,
                         max_cost_per_image_ratio=1.5)
    recs = pairs("t2i", 1000, fail_every=100, ctl_cost=0.01, cand_cost=0.01)
    for r in recs:
        if not r.candidate.ok:
            r.candidate.cost_usd = 0.60
    rep = build_report(recs, ShadowOptions(thresholds=t))
    assert rep.overall.cost_per_image_ratio == pytest.approx(15.9 / 9.9, rel=1e-6)  # 1.61x
    assert rep.verdict is not Verdict.GO
    assert rep.overall.candidate.billed_failures == 10


def test_identical_large_window_is_go():
    recs = pairs("t2i", 700, ctl_s=1.0, cand_s=1.0)
    for i, r in enumerate(recs):
        r.control.total_s = r.candidate.total_s = 1.0 + (i % 50) / 10
    rep = build_report([*recs, *noise("t2i", [1.0] * 30)], ShadowOptions(
        thresholds=ShadowThresholds(max_success_rate_drop=0.02)))
    assert rep.verdict is Verdict.GO, rep.reasons
    names = {c.name for c in rep.overall.criteria}
    assert names == {"success_rate_drop", "mismatch_rate", "p95_latency_ratio"}
    assert all(c.upper is not None and c.upper <= c.limit for c in rep.overall.criteria)

