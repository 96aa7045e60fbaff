"""Report figures from a known fixture, checked against values computed by hand (in the comments)."""

from __future__ import annotations

import json

import pytest

from gpubridge.shadow.report import (
    OVERALL,
    Verdict,
    build_report,
    percentile,
    render_html,
    render_json,
    render_table,
)
from gpubridge.shadow.settings import ShadowOptions, ShadowThresholds

from .helpers import record

T0 = 1_699_999_200.0  # a whole hour (472222 * 3600)

OPTIONS = ShadowOptions(
    noise_margin=2.0,
    min_noise_pairs=5,
    default_floor=8.0,
    thresholds=ShadowThresholds(
        min_samples=4,
        max_success_rate_drop=0.1,
        max_mismatch_rate=0.3,
        max_p95_latency_ratio=1.5,
        max_cost_per_image_ratio=1.5,
    ),
)


def fixture():
    a = dict(images=2, ctl_cost=0.02)
    return [
        # wf-a: 5 pairs, images=2 each side
        record("wf-a", ctl_s=1.0, cand_s=1.2, cand_cost=0.03, distance=3, at=T0 + 10, **a),
        record("wf-a", ctl_s=2.0, cand_s=2.4, cand_cost=0.03, distance=9, at=T0 + 20, **a),
        record("wf-a", ctl_s=3.0, cand_s=3.0, cand_cost=0.03, distance=5, at=T0 + 3610, **a),
        record("wf-a", ctl_s=4.0, cand_s=6.0, cand_cost=None, distance=4, structure=False, at=T0 + 3620, **a),
        record("wf-a", ctl_s=5.0, cand_ok=False, cand_err="JobTimeout", at=T0 + 3630, **a),
        # wf-a noise: distances 1 2 2 3 4 6
        *[record("wf-a", "noise", distance=d, at=T0 + 100 + d) for d in (1, 2, 2, 3, 4, 6)],
        # wf-b: 3 pairs, no cost
        record("wf-b", ctl_s=10.0, cand_s=8.0, distance=9, at=T0 + 7205),
        record("wf-b", ctl_ok=False, cand_ok=False, ctl_err="JobFailed", cand_err="JobFailed", at=T0 + 7210),
        record("wf-b", ctl_ok=False, cand_ok=False, ctl_err="JobFailed", cand_err="ProviderUnavailable",
               at=T0 + 7220),
        # wf-b noise: only 2 pairs, fewer than min_noise_pairs=5
        record("wf-b", "noise", distance=0, at=T0 + 7300),
        record("wf-b", "noise", distance=1, at=T0 + 7301),
    ]


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([4, 1, 3, 2], 50) == 2  # ceil(0.5*4)=2nd
    assert percentile([1, 2, 3, 4, 5], 95) == 5  # ceil(4.75)=5th
    assert percentile([1, 2, 2, 3, 4, 6], 95) == 6  # ceil(5.7)=6th
    assert percentile([7], 0) == 7


def test_workflow_figures_match_hand_computed_values():
    rep = build_report(fixture(), OPTIONS)
    a, b = rep.workflows
    assert (a.workflow, b.workflow) == ("wf-a", "wf-b")

    # wf-a: noise distances [1,2,2,3,4,6], n=6 < 20 -> rank min(ceil(5.7), n-1) = 5th = 4 (never the
    # maximum), under the default 8 (measured); threshold 4 + 2 = 6.
    assert (a.noise_floor, a.floor_source, a.noise_pairs, a.threshold) == (4.0, "measured", 6, 6.0)
    assert a.samples == 5
    assert a.outcomes == {"both_ok": 4, "candidate_failed": 1, "control_failed": 0, "both_failed": 0}
    assert a.control.success_rate == 1.0 and a.candidate.success_rate == 0.8
    # control totals [1,2,3,4,5]: p50 = 3rd = 3, p95 = 5th = 5
    assert (a.control.p50_total_s, a.control.p95_total_s) == (3.0, 5.0)
    # candidate totals (successful) [1.2,2.4,3.0,6.0]: p50 = 2nd = 2.4, p95 = 4th = 6.0
    assert (a.candidate.p50_total_s, a.candidate.p95_total_s) == (2.4, 6.0)
    assert a.p95_latency_ratio == pytest.approx(1.2)
    # control: 5 x $0.02 over 10 images; candidate: 3 costed jobs x $0.03 over 6 images
    assert a.control.cost_per_image == pytest.approx(0.01)
    assert a.candidate.cost_per_image == pytest.approx(0.015)
    assert a.cost_per_image_ratio == pytest.approx(1.5)  # at the threshold: passes
    # compared (both ok) 4: d=3 no, d=9 > 6 yes, d=5 no, dims differ yes -> 2/4
    assert (a.compared, a.mismatches, a.mismatch_rate) == (4, 2, 0.5)
    # 5 pairs: 1.0 vs 0.8 success and 2/4 mismatches are neither shown within nor beyond the limits.
    assert a.verdict is Verdict.INSUFFICIENT_DATA and a.look_pairs == 5
    names = [c.name for c in a.criteria]
    assert names == ["success_rate_drop", "mismatch_rate", "p95_latency_ratio", "cost_per_image_ratio"]
    drop = a.criteria[0]
    assert drop.estimate == pytest.approx(0.2) and drop.lower < 0.1 < drop.upper
    # the candidate's 4th wf-a job reports no cost: a reason, not a skip
    assert "cost missing for 1 successful candidate" in a.criteria[3].reason

    # wf-b: 2 noise pairs < 5 -> default floor 8, threshold 10; d=9 is not a mismatch.
    assert (b.noise_floor, b.floor_source, b.noise_pairs, b.threshold) == (8.0, "default", 2, 10.0)
    assert (b.compared, b.mismatches, b.mismatch_rate) == (1, 0, 0.0)
    assert b.control.success_rate == pytest.approx(1 / 3) and b.candidate.success_rate == pytest.approx(1 / 3)
    assert b.error_class_parity == 0.5  # 1 of the 2 both-failed pairs failed alike
    assert b.control.cost_per_image is None
    assert b.verdict is Verdict.INSUFFICIENT_DATA  # 3 pairs < min_samples 4


def test_overall_figures_and_verdict_match_hand_computed_values():
    rep = build_report(fixture(), OPTIONS)
    o = rep.overall
    assert o.workflow == OVERALL and o.samples == 8
    assert o.outcomes == {"both_ok": 5, "candidate_failed": 1, "control_failed": 0, "both_failed": 2}
    assert o.control.success_rate == 0.75 and o.candidate.success_rate == 0.625  # 6/8, 5/8
    # control totals [1,2,3,4,5,10]: p50 = 3rd = 3, p95 = 6th = 10
    assert (o.control.p50_total_s, o.control.p95_total_s) == (3.0, 10.0)
    # candidate totals [1.2,2.4,3,6,8]: p50 = 3rd = 3, p95 = 5th = 8
    assert (o.candidate.p50_total_s, o.candidate.p95_total_s) == (3.0, 8.0)
    assert o.p95_latency_ratio == pytest.approx(0.8)
    assert o.control.cost_per_image == pytest.approx(0.01)  # wf-b has no cost: left out
    assert (o.compared, o.mismatches, o.mismatch_rate) == (5, 2, 0.4)
    assert o.error_class_parity == 0.5 and o.noise_pairs == 8
    assert rep.verdict is Verdict.INSUFFICIENT_DATA
    assert rep.control == ["runpod"] and rep.candidate == ["modal"]

    # mismatch rate per hour: hour 0 {d=3, d=9} 1/2; hour 1 {d=5, dims} 1/2; hour 2 {d=9 under 10} 0/1
    assert rep.timeline_bucket_s == 3600
    assert [(p.start, p.compared, p.mismatches) for p in rep.timeline] == [
        (T0, 2, 1), (T0 + 3600, 2, 1), (T0 + 7200, 1, 0)
    ]
    assert sum(rep.latency_control) == 6 and sum(rep.latency_candidate) == 5
    assert rep.latency_edges[0] == 0.0 and rep.latency_edges[-1] == 10.0


def test_verdict_insufficient_data_on_a_small_fixture():
    loose = OPTIONS.model_copy(update={"thresholds": ShadowThresholds(
        min_samples=4, max_success_rate_drop=0.2, max_mismatch_rate=0.5, max_p95_latency_ratio=1.5)})
    rep = build_report(fixture(), loose)
    assert rep.verdict is Verdict.INSUFFICIENT_DATA  # 8 pairs show nothing either way
    big = OPTIONS.model_copy(update={"thresholds": ShadowThresholds(min_samples=100, max_mismatch_rate=None)})
    rep = build_report(fixture(), big)
    assert rep.verdict is Verdict.INSUFFICIENT_DATA
    assert any("fewer than min_samples=100" in r for r in rep.reasons)
    # the default 5 % mismatch limit: 2 of 4 compared pairs is shown above it, min_samples or not
    strict = OPTIONS.model_copy(update={"thresholds": ShadowThresholds(min_samples=100)})
    rep = build_report(fixture(), strict)
    assert rep.verdict is Verdict.NO_GO and rep.reasons[0].startswith("(all): mismatch_rate")
    empty = build_report([], OPTIONS)
    assert empty.overall.samples == 0 and empty.verdict is Verdict.INSUFFICIENT_DATA


def test_renderers():
    rep = build_report(fixture(), OPTIONS)
    data = json.loads(render_json(rep))
    assert data["verdict"] == "insufficient-data" and data["overall"]["mismatch_rate"] == 0.4
    page = render_html(rep)
    assert page.count("<svg") == 2 and "latency distribution" in page and "mismatch rate over time" in page
    assert "<polyline" in page and page.count("<circle") == 3  # one point per hour
    assert "insufficient-data" in page and "wf-a" in page
    # each criterion's interval, the pairs still needed and the not-compared counts
    assert "one-sided bounds" in page and "success_rate_drop" in page and "pairs needed" in page
    assert "not compared" in page

    from rich.console import Console

    console = Console(width=240, record=True)
    console.print(render_table(rep))
    text = console.export_text()
    assert "wf-a" in text and "(all)" in text and "verdict: insufficient-data" in text
    assert "40.0% (2/5)" in text


def test_an_80_column_table_cuts_nothing_off():
    """Issue 25: in 80 columns the wide table truncated every header and cell ("wor…", "ins…")."""
    from rich.console import Console

    rep = build_report(fixture(), OPTIONS)
    console = Console(width=80, record=True)
    console.print(render_table(rep, width=console.width))
    text = console.export_text()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines() if not line.startswith("  "))
    assert "wf-a" in text and "40.0% (2/5)" in text and "verdict: insufficient-data" in text
    assert "mismatch_rate: " in text and "success_rate_drop: " in text


def test_with_no_records_the_report_names_the_configured_pair():
    rep = build_report([], OPTIONS, configured=("runpod", "modal"))
    assert (rep.control, rep.candidate) == (["runpod"], ["modal"])
    assert build_report(fixture(), OPTIONS, configured=("x", "y")).control != ["x"]  # records name their pair
