"""Shadow records to figures, a go/no-go verdict with stated error rates, and renderings (rich table,
JSON, HTML with inline SVG).

Which pairs: the report is for one (control, candidate) provider pair. By default the pair of the most
recent candidate record; ``control=``/``candidate=`` (``--control``/``--candidate``) choose another. Records
of other pairs are left out (their pairs are listed in ``pairs_available``). Noise records are those of the
chosen control.

Figures, per workflow and overall, over the candidate records (``kind="candidate"``):

- ``samples``: pairs; success rates: share of pairs where that side succeeded.
- latency: p50/p95 of queue, execution and total seconds over that side's *successful* jobs.
  Percentiles are nearest-rank: the value at position ``ceil(p/100 * n)`` of the sorted sample.
- cost per delivered image: the USD cost summed over *all* that side's jobs that report one (failed jobs
  that were billed included), over the images its successful jobs that report a cost delivered.
  Successful jobs without a cost are counted in ``cost_missing`` (and left out of the figure).
- mismatch rate: of the pairs where both succeeded and every output was compared (``compared``), the
  share whose outputs differ (see :func:`~gpubridge.shadow.compare.pair_status`). Pairs with outputs that
  could not be compared are counted in ``not_compared``, never as matches.

Noise floor (per workflow), from its control-against-control pairs (``kind="noise"``, both succeeded,
with a distance): fewer than ``min_noise_pairs`` of them, ``default_floor``; fewer than
:data:`TRUSTED_NOISE_PAIRS` (20), the order statistic of rank ``min(ceil(0.95 n), n - 1)`` (never the
maximum: one outlier cannot move it) and at most ``default_floor``; from 20 on, the nearest-rank p95
(which then never is the maximum either). The threshold is the floor plus ``noise_margin``; a pair is a
mismatch only when its distance is *strictly* above it.

Verdict: see :mod:`gpubridge.shadow.decision` for the criteria, their bounds and the alpha spending. Each
workflow and the overall figures are judged: ``no-go`` when any group (however small) is shown worse than
a threshold; ``go`` only when the overall figures and every workflow are shown within every configured
threshold and have at least ``min_samples`` pairs; otherwise ``insufficient-data``, with the pairs still
needed. A configured threshold whose figure is missing (no cost reported, no latency) is a reason for
``insufficient-data``, never skipped.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from .compare import Comparison, Outcome, Side, pair_status
from .decision import (
    Criterion,
    Verdict,
    cost_ratio_bounds,
    judge_bounds,
    judge_rate,
    judge_rate_drop,
    look,
    look_size,
    p95_ratio_bounds,
    quantile_ranks,
    spent_alpha,
    MAX_LOOKS,
)
from .settings import ShadowOptions, ShadowThresholds

__all__ = [
    "Verdict",
    "Criterion",
    "SideFigures",
    "GroupFigures",
    "TimelinePoint",
    "ShadowReport",
    "build_report",
    "percentile",
    "noise_floor",
    "select_pair",
    "render_table",
    "render_json",
    "render_html",
    "TRUSTED_NOISE_PAIRS",
]

OVERALL = "(all)"
TRUSTED_NOISE_PAIRS = 20


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


class SideFigures(BaseModel):
    successes: int = 0
    success_rate: float | None = None
    p50_total_s: float | None = None
    p95_total_s: float | None = None
    p50_queued_s: float | None = None
    p95_queued_s: float | None = None
    p50_executing_s: float | None = None
    p95_executing_s: float | None = None
    images: int = 0
    cost_usd: float | None = None
    cost_per_image: float | None = None
    """Cost of every job that reports one (billed failures included) per image delivered."""
    billed_failures: int = 0
    """Failed jobs that report a cost (counted in ``cost_usd``)."""
    cost_missing: int = 0
    """Successful jobs that report no cost."""
    latency_missing: int = 0
    """Successful jobs without a total latency."""


class GroupFigures(BaseModel):
    workflow: str
    samples: int = 0
    outcomes: dict[str, int] = Field(default_factory=dict)
    error_class_parity: float | None = None
    """Of the pairs where both failed, the share that failed with the same error class."""
    control: SideFigures = Field(default_factory=SideFigures)
    candidate: SideFigures = Field(default_factory=SideFigures)
    compared: int = 0
    mismatches: int = 0
    mismatch_rate: float | None = None
    not_compared: int = 0
    """Pairs (both succeeded) with outputs that were not compared and no mismatch found."""
    not_compared_kinds: dict[str, int] = Field(default_factory=dict)
    """Artifact pairs not compared, by kind."""
    noise_pairs: int = 0
    noise_floor: float | None = None
    floor_source: str | None = None
    """``measured``, ``measured (capped)`` or ``default``; None for the overall group."""
    threshold: float | None = None
    p95_latency_ratio: float | None = None
    cost_per_image_ratio: float | None = None
    criteria: list[Criterion] = Field(default_factory=list)
    look_pairs: int = 0
    """Pairs the criteria were judged on (the largest look size within ``samples``)."""
    pairs_needed: int | None = None
    """For ``insufficient-data``: more pairs likely needed for a decision (None: unknown)."""
    verdict: Verdict = Verdict.INSUFFICIENT_DATA
    reasons: list[str] = Field(default_factory=list)


class TimelinePoint(BaseModel):
    start: float
    compared: int
    mismatches: int
    mismatch_rate: float | None


class ShadowReport(BaseModel):
    generated_at: float = Field(default_factory=time.time)
    since: float | None = None
    until: float | None = None
    control: list[str] = Field(default_factory=list)
    candidate: list[str] = Field(default_factory=list)
    pairs_available: dict[str, int] = Field(default_factory=dict)
    """Candidate records per ``control -> candidate`` pair in the window (the report shows one)."""
    thresholds: ShadowThresholds
    noise_margin: float
    overall: GroupFigures
    workflows: list[GroupFigures] = Field(default_factory=list)
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    pairs_needed: int | None = None
    timeline_bucket_s: float = 3600.0
    timeline: list[TimelinePoint] = Field(default_factory=list)
    latency_edges: list[float] = Field(default_factory=list)
    latency_control: list[int] = Field(default_factory=list)
    latency_candidate: list[int] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------- aggregation


def noise_floor(noise: Iterable[Comparison], options: ShadowOptions) -> tuple[float, str, int]:
    """``(floor, source, pairs)`` for one workflow's noise records (see the module docstring)."""
    distances = sorted(
        r.phash_distance for r in noise if r.outcome is Outcome.BOTH_OK and r.phash_distance is not None
    )
    n = len(distances)
    if n < options.min_noise_pairs or n < 2:
        return options.default_floor, "default", n
    rank = min(max(1, math.ceil(0.95 * n)), n - 1)
    measured = float(distances[rank - 1])
    if n < TRUSTED_NOISE_PAIRS and measured > options.default_floor:
        return options.default_floor, "measured (capped)", n
    return measured, "measured", n


def _side_figures(sides: list[Side], samples: int) -> SideFigures:
    ok = [s for s in sides if s.ok]
    f = SideFigures(successes=len(ok), success_rate=len(ok) / samples if samples else None)
    for attr in ("total_s", "queued_s", "executing_s"):
        values = [getattr(s, attr) for s in ok if getattr(s, attr) is not None]
        setattr(f, f"p50_{attr}", percentile(values, 50))
        setattr(f, f"p95_{attr}", percentile(values, 95))
    f.latency_missing = sum(s.total_s is None for s in ok)
    f.images = sum(s.images for s in ok)
    costed = [s for s in sides if s.cost_usd is not None]
    f.billed_failures = sum(not s.ok for s in costed)
    f.cost_missing = sum(s.cost_usd is None for s in ok)
    if costed:
        f.cost_usd = sum(s.cost_usd for s in costed)  # type: ignore[misc]
        delivered = sum(s.images for s in costed if s.ok)
        f.cost_per_image = f.cost_usd / delivered if delivered else None
    return f


def _statuses(records: list[Comparison], thresholds: dict[str, float]) -> list[str | None]:
    return [pair_status(r, thresholds[r.workflow]) for r in records]


def _group(
    name: str,
    records: list[Comparison],
    thresholds_by_workflow: dict[str, float],
) -> GroupFigures:
    g = GroupFigures(workflow=name, samples=len(records))
    counts = {o.value: 0 for o in Outcome}
    for r in records:
        counts[r.outcome.value] += 1
    g.outcomes = counts
    both_failed = [r for r in records if r.outcome is Outcome.BOTH_FAILED]
    if both_failed:
        g.error_class_parity = sum(bool(r.error_match) for r in both_failed) / len(both_failed)
    g.control = _side_figures([r.control for r in records], len(records))
    g.candidate = _side_figures([r.candidate for r in records], len(records))
    kinds: Counter[str] = Counter()
    for r, status in zip(records, _statuses(records, thresholds_by_workflow), strict=True):
        if r.outcome is Outcome.BOTH_OK:
            kinds.update(r.not_compared)
        if status == "not-compared":
            g.not_compared += 1
        elif status is not None:
            g.compared += 1
            g.mismatches += status == "mismatch"
    g.not_compared_kinds = dict(sorted(kinds.items()))
    g.mismatch_rate = g.mismatches / g.compared if g.compared else None
    g.p95_latency_ratio = _ratio(g.candidate.p95_total_s, g.control.p95_total_s)
    g.cost_per_image_ratio = _ratio(g.candidate.cost_per_image, g.control.cost_per_image)
    return g


def _needed_scaled(total: int, t: ShadowThresholds, estimate: float, lower: float, upper: float, n: int,
                   limit: float) -> int | None:
    """Pairs needed if the bounds' widths shrink as ``1/sqrt(n)`` around the same estimate."""
    k0, _, _ = look(total, t.first_look, t.alpha)
    for kk in range(k0 + 1, MAX_LOOKS + 1):
        m = look_size(kk, t.first_look)
        shrink = math.sqrt(n / m)
        lo = estimate - (estimate - lower) * shrink if math.isfinite(lower) else lower
        hi = estimate + (upper - estimate) * shrink if math.isfinite(upper) else upper
        if judge_bounds(lo, hi, limit) is not Verdict.INSUFFICIENT_DATA:
            return max(m - total, 1)
    return None


def _criteria(records: list[Comparison], thresholds: dict[str, float], t: ShadowThresholds
              ) -> tuple[int, list[Criterion]]:
    """Judge each configured criterion on the first ``n_k`` pairs (``records`` oldest first)."""
    total = len(records)
    k, size, a = look(total, t.first_look, t.alpha)
    used = records[:size]
    out: list[Criterion] = []
    if t.max_success_rate_drop is not None:
        ctl_ok = sum(r.control.ok for r in used)
        cand_ok = sum(r.candidate.ok for r in used)
        out.append(judge_rate_drop(ctl_ok, cand_ok, size, t.max_success_rate_drop, alpha=t.alpha,
                                   first_look=t.first_look, total=total))
    if t.max_mismatch_rate is not None:
        statuses = _statuses(used, thresholds)
        compared = sum(s in ("match", "mismatch") for s in statuses)
        bad = sum(s == "mismatch" for s in statuses)
        c = judge_rate(bad, compared, t.max_mismatch_rate, name="mismatch_rate", alpha=t.alpha,
                       first_look=t.first_look, total=total, look_n=size)
        skipped = sum(s == "not-compared" for s in statuses)
        if skipped and c.verdict is not Verdict.NO_GO:
            c.reason = (f"{skipped} of {skipped + compared} pairs where both succeeded were not compared "
                        f"(outputs not compared count as neither match nor mismatch)")
        out.append(c)
    if t.max_p95_latency_ratio is not None:
        limit = t.max_p95_latency_ratio
        c = Criterion(name="p95_latency_ratio", limit=limit, n=size, look=k, alpha=a or None)
        ok_sides = [s for r in used for s in (r.control, r.candidate) if s.ok]
        missing = sum(s.total_s is None for s in ok_sides)
        ctl = [r.control.total_s for r in used if r.control.ok and r.control.total_s is not None]
        cand = [r.candidate.total_s for r in used if r.candidate.ok and r.candidate.total_s is not None]
        if k == 0:
            c.reason = f"{total} pairs, fewer than the first look ({t.first_look})"
            c.pairs_needed = t.first_look - total
        elif missing:
            c.reason = f"{missing} successful jobs report no latency: the p95 ratio cannot be checked"
        elif not ctl or not cand:
            c.reason = "no successful job on one side: no latency to compare"
        else:
            c.estimate, c.lower, c.upper = p95_ratio_bounds(ctl, cand, a)
            c.verdict = judge_bounds(c.lower, c.upper, limit)
            if c.verdict is Verdict.INSUFFICIENT_DATA:
                c.pairs_needed = _p95_needed(ctl, cand, total, size, t, limit)
        out.append(c)
    if t.max_cost_per_image_ratio is not None:
        limit = t.max_cost_per_image_ratio
        c = Criterion(name="cost_per_image_ratio", limit=limit, n=size, look=k, alpha=a or None)
        missing_ctl = sum(r.control.ok and r.control.cost_usd is None for r in used)
        missing_cand = sum(r.candidate.ok and r.candidate.cost_usd is None for r in used)
        if k == 0:
            c.reason = f"{total} pairs, fewer than the first look ({t.first_look})"
            c.pairs_needed = t.first_look - total
        elif missing_ctl or missing_cand:
            c.reason = (f"cost missing for {missing_cand} successful candidate and {missing_ctl} control "
                        f"jobs: the cost threshold cannot be checked")
        else:
            def cost(s: Side) -> float:
                return s.cost_usd or 0.0

            def images(s: Side) -> int:
                return s.images if s.ok else 0

            est, lo, hi = cost_ratio_bounds(
                [cost(r.control) for r in used], [images(r.control) for r in used],
                [cost(r.candidate) for r in used], [images(r.candidate) for r in used], a)
            if est is None:
                c.reason = "no image delivered on one side: no cost per image"
            else:
                c.estimate, c.lower, c.upper = est, lo, hi
                c.verdict = judge_bounds(lo, hi, limit)
                if c.verdict is Verdict.INSUFFICIENT_DATA and lo is not None and hi is not None:
                    c.pairs_needed = _needed_scaled(total, t, est, lo, hi, size, limit)
        out.append(c)
    return size, out


def _p95_needed(ctl: list[float], cand: list[float], total: int, size: int, t: ShadowThresholds,
                limit: float) -> int | None:
    """Pairs needed if both latency distributions stay as observed (bounds read off the empirical
    quantiles at the ranks a larger sample would use)."""
    import numpy as np

    a, b = np.sort(np.asarray(ctl)), np.sort(np.asarray(cand))
    k0, _, _ = look(total, t.first_look, t.alpha)
    for kk in range(k0 + 1, MAX_LOOKS + 1):
        m = look_size(kk, t.first_look)
        am = spent_alpha(kk, t.alpha)
        ma, mb = max(1, round(m * len(a) / size)), max(1, round(m * len(b) / size))
        la, ua = quantile_ranks(ma, 0.95, am / 2)
        lb, ub = quantile_ranks(mb, 0.95, am / 2)
        if None in (la, ua, lb, ub):
            continue
        q = lambda xs, r, n: float(np.quantile(xs, min(1.0, r / n)))  # noqa: E731
        lo = q(b, lb, mb) / q(a, ua, ma)
        hi = q(b, ub, mb) / q(a, la, ma)
        if judge_bounds(lo, hi, limit) is not Verdict.INSUFFICIENT_DATA:
            return max(m - total, 1)
    return None


def _judge(g: GroupFigures, records: list[Comparison], thresholds: dict[str, float],
           t: ShadowThresholds) -> None:
    g.look_pairs, g.criteria = _criteria(records, thresholds, t)
    reasons: list[str] = []
    for c in g.criteria:
        if c.verdict is Verdict.NO_GO:
            reasons.append(f"{c.name}: {_fmt(c.name, c.lower)} (lower bound, {c.n} pairs) is above "
                           f"{_fmt(c.name, c.limit)}")
    if reasons:
        g.verdict, g.reasons = Verdict.NO_GO, reasons
        return
    undecided = [c for c in g.criteria if c.verdict is not Verdict.GO]
    for c in undecided:
        why = c.reason or (f"{_fmt(c.name, c.estimate)} in [{_fmt(c.name, c.lower)}, {_fmt(c.name, c.upper)}]"
                           f" on {c.n} pairs: not yet shown within {_fmt(c.name, c.limit)}")
        reasons.append(f"{c.name}: {why}")
    if g.samples < t.min_samples:
        reasons.append(f"{g.samples} pairs, fewer than min_samples={t.min_samples}")
    if reasons:
        g.verdict, g.reasons = Verdict.INSUFFICIENT_DATA, reasons
        needs = [c.pairs_needed for c in undecided]
        if g.samples < t.min_samples:
            needs.append(t.min_samples - g.samples)
        g.pairs_needed = None if any(x is None for x in needs) else max(needs, default=None)
        return
    g.verdict, g.reasons = Verdict.GO, []


def _fmt(name: str, x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2%}" if name.endswith("rate") or name.endswith("drop") else f"{x:.2f}"


def _timeline(records: list[Comparison], thresholds: dict[str, float]) -> tuple[float, list[TimelinePoint]]:
    judged = [(r.created_at, pair_status(r, thresholds[r.workflow])) for r in records]
    judged = [(t, m == "mismatch") for t, m in judged if m in ("match", "mismatch")]
    if not judged:
        return 3600.0, []
    span = max(t for t, _ in judged) - min(t for t, _ in judged)
    bucket = 3600.0 if span <= 2 * 86400 else 86400.0
    buckets: dict[float, list[bool]] = defaultdict(list)
    for t, m in judged:
        buckets[math.floor(t / bucket) * bucket].append(m)
    points = [
        TimelinePoint(start=start, compared=len(ms), mismatches=sum(ms), mismatch_rate=sum(ms) / len(ms))
        for start, ms in sorted(buckets.items())
    ]
    return bucket, points


def _histogram(
    control: list[float], candidate: list[float], bins: int = 20
) -> tuple[list[float], list[int], list[int]]:
    values = control + candidate
    if not values:
        return [], [], []
    hi = max(values)
    lo = 0.0
    width = (hi - lo) / bins if hi > lo else 1.0
    edges = [lo + i * width for i in range(bins + 1)]

    def counts(xs: list[float]) -> list[int]:
        out = [0] * bins
        for x in xs:
            out[min(bins - 1, int((x - lo) / width))] += 1
        return out

    return edges, counts(control), counts(candidate)


def _pair_name(control: str | None, candidate: str | None) -> str:
    return f"{control or '?'} -> {candidate or '?'}"


def select_pair(
    records: Sequence[Comparison], control: str | None = None, candidate: str | None = None
) -> tuple[str | None, str | None]:
    """The (control, candidate) pair a report is about: the one given, else (filling in what is not
    given) the pair of the most recent matching candidate record."""
    matching = [r for r in records if r.kind == "candidate"
                and (control is None or r.control.provider == control)
                and (candidate is None or r.candidate.provider == candidate)]
    if not matching:
        return control, candidate
    latest = max(matching, key=lambda r: r.created_at)
    return (control if control is not None else latest.control.provider,
            candidate if candidate is not None else latest.candidate.provider)


def build_report(
    records: Iterable[Comparison],
    options: ShadowOptions | None = None,
    *,
    since: float | None = None,
    until: float | None = None,
    control: str | None = None,
    candidate: str | None = None,
    configured: tuple[str | None, str | None] = (None, None),
) -> ShadowReport:
    """Aggregate records of one (control, candidate) pair into a :class:`ShadowReport` (see the module
    docstring; thresholds and noise settings from ``options``). ``configured`` (the configured provider
    and shadow) names the pair when no record does."""
    options = options or ShadowOptions()
    t = options.thresholds
    records = sorted(records, key=lambda r: r.created_at)
    available = Counter(_pair_name(r.control.provider, r.candidate.provider)
                        for r in records if r.kind == "candidate")
    control, candidate = select_pair(records, control, candidate)
    control = control if control is not None else configured[0]
    candidate = candidate if candidate is not None else configured[1]
    candidates = [r for r in records if r.kind == "candidate" and r.control.provider == control
                  and r.candidate.provider == candidate]
    noise_by_wf: dict[str, list[Comparison]] = defaultdict(list)
    for r in records:
        if r.kind == "noise" and (r.control.provider == control or r.control.provider is None):
            noise_by_wf[r.workflow].append(r)
    workflows = sorted({r.workflow for r in candidates})
    floors = {wf: noise_floor(noise_by_wf.get(wf, []), options) for wf in workflows}
    thresholds = {wf: floor + options.noise_margin for wf, (floor, _, _) in floors.items()}

    groups = []
    for wf in workflows:
        mine = [r for r in candidates if r.workflow == wf]
        g = _group(wf, mine, thresholds)
        g.noise_floor, g.floor_source, g.noise_pairs = floors[wf]
        g.threshold = thresholds[wf]
        _judge(g, mine, thresholds, t)
        groups.append(g)
    overall = _group(OVERALL, candidates, thresholds)
    overall.noise_pairs = sum(g.noise_pairs for g in groups)
    _judge(overall, candidates, thresholds, t)

    judged = [overall, *groups]
    if any(g.verdict is Verdict.NO_GO for g in judged):
        verdict = Verdict.NO_GO
        reasons = [f"{g.workflow}: {reason}" for g in judged if g.verdict is Verdict.NO_GO
                   for reason in g.reasons]
        needed = None
    elif all(g.verdict is Verdict.GO for g in judged):
        verdict, reasons, needed = Verdict.GO, [], None
    else:
        verdict = Verdict.INSUFFICIENT_DATA
        pending = [g for g in judged if g.verdict is not Verdict.GO]
        reasons = [f"{g.workflow}: {reason}" for g in pending for reason in g.reasons]
        needs = [g.pairs_needed for g in pending]
        needed = None if any(x is None for x in needs) else max(needs, default=None)
    if len(available) > 1:
        others = ", ".join(f"{k} ({v})" for k, v in sorted(available.items())
                           if k != _pair_name(control, candidate))
        reasons.append(f"only {_pair_name(control, candidate)} is judged; other pairs in the window: "
                       f"{others}")

    bucket, timeline = _timeline(candidates, thresholds)
    edges, hc, hk = _histogram(
        [r.control.total_s for r in candidates if r.control.ok and r.control.total_s is not None],
        [r.candidate.total_s for r in candidates if r.candidate.ok and r.candidate.total_s is not None],
    )
    return ShadowReport(
        since=since,
        until=until,
        control=[control] if control else [],
        candidate=[candidate] if candidate else [],
        pairs_available=dict(sorted(available.items())),
        thresholds=t,
        noise_margin=options.noise_margin,
        overall=overall,
        workflows=groups,
        verdict=verdict,
        reasons=reasons,
        pairs_needed=needed,
        timeline_bucket_s=bucket,
        timeline=timeline,
        latency_edges=edges,
        latency_control=hc,
        latency_candidate=hk,
    )


# ------------------------------------------------------------------------------------------- rendering


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _usd(x: float | None) -> str:
    return "-" if x is None else f"${x:.5f}"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _rows(report: ShadowReport) -> list[tuple[GroupFigures, list[str]]]:
    rows = []
    for g in [*report.workflows, report.overall]:
        rows.append((g, [
            g.workflow,
            str(g.samples),
            f"{_pct(g.control.success_rate)} / {_pct(g.candidate.success_rate)}",
            f"{_secs(g.control.p50_total_s)} / {_secs(g.candidate.p50_total_s)}",
            f"{_secs(g.control.p95_total_s)} / {_secs(g.candidate.p95_total_s)}",
            f"{_usd(g.control.cost_per_image)} / {_usd(g.candidate.cost_per_image)}",
            "-" if g.noise_floor is None else f"{g.noise_floor:g} ({g.floor_source}, n={g.noise_pairs})",
            f"{_pct(g.mismatch_rate)} ({g.mismatches}/{g.compared})",
            _not_compared(g),
            "-" if g.verdict is not Verdict.INSUFFICIENT_DATA else _needed(g.pairs_needed),
            g.verdict.value,
        ]))
    return rows


def _not_compared(g: GroupFigures) -> str:
    if not g.not_compared and not g.not_compared_kinds:
        return "0"
    kinds = ", ".join(f"{k} {v}" for k, v in g.not_compared_kinds.items())
    return f"{g.not_compared}" + (f" ({kinds})" if kinds else "")


def _needed(n: int | None) -> str:
    return "unknown" if n is None else f"+{n}"


def _criteria_rows(report: ShadowReport) -> list[tuple[GroupFigures, Criterion, list[str]]]:
    rows = []
    for g in [*report.workflows, report.overall]:
        for c in g.criteria:
            rows.append((g, c, [
                g.workflow,
                c.name,
                _fmt(c.name, c.estimate),
                f"[{_fmt(c.name, c.lower)}, {_fmt(c.name, c.upper)}]",
                f"<= {_fmt(c.name, c.limit)}",
                f"{c.n} (look {c.look}, alpha {c.alpha:.2g})" if c.alpha else f"{c.n}",
                "-" if c.verdict is not Verdict.INSUFFICIENT_DATA else _needed(c.pairs_needed),
                c.verdict.value + (f": {c.reason}" if c.reason else ""),
            ]))
    return rows


_HEADERS = ["workflow", "pairs", "success ctl / cand", "p50 ctl / cand", "p95 ctl / cand",
            "$/image ctl / cand", "noise floor (bits)", "mismatch", "not compared", "pairs needed", "verdict"]
_CRITERIA_HEADERS = ["workflow", "criterion", "estimate", "one-sided bounds", "limit", "pairs judged",
                     "pairs needed", "verdict"]
_COLOURS = {Verdict.GO: "green", Verdict.NO_GO: "red", Verdict.INSUFFICIENT_DATA: "yellow"}


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


WIDE_TABLE = 150  # columns the one-row-per-workflow table needs; narrower consoles get one block per workflow


def render_table(report: ShadowReport, width: int | None = None):
    """A rich renderable: the figures table and the verdict. On a console narrower than ``WIDE_TABLE``
    columns (an 80-column terminal) each workflow gets a block of its own, so no figure is cut off."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = (f"shadow report: {', '.join(report.control) or '?'} (control) vs "
             f"{', '.join(report.candidate) or '?'} (candidate), since {_when(report.since)}")
    if width is not None and width < WIDE_TABLE:
        return _render_narrow(report, title)
    table = Table(title=title, title_justify="left")
    for h in _HEADERS:
        table.add_column(h, justify="left" if h in ("workflow", "verdict") else "right")
    for g, cells in _rows(report):
        style = "bold" if g.workflow == OVERALL else None
        cells = [*cells[:-1], f"[{_COLOURS[g.verdict]}]{cells[-1]}[/]"]
        table.add_row(*cells, style=style)
    crit = Table(title="criteria (one-sided bounds at the look's alpha; go when the upper bound is within "
                 "the limit, no-go when the lower bound is beyond it)", title_justify="left")
    for h in _CRITERIA_HEADERS:
        crit.add_column(h, justify="left" if h in ("workflow", "criterion", "verdict") else "right")
    for _, c, cells in _criteria_rows(report):
        crit.add_row(*cells[:-1], f"[{_COLOURS[c.verdict]}]{cells[-1]}[/]")
    needed = "" if report.pairs_needed is None else f" (about {report.pairs_needed} more pairs needed)"
    verdict = Text.from_markup(f"verdict: [bold {_COLOURS[report.verdict]}]{report.verdict.value}[/]{needed}")
    parts: list[Any] = [table, crit, verdict]
    parts.extend(Text(f"  - {reason}") for reason in report.reasons)
    return Group(*parts)


def _render_narrow(report: ShadowReport, title: str):
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    control = ", ".join(report.control) or "control"
    candidate = ", ".join(report.candidate) or "candidate"
    parts: list[Any] = [Text(title)]
    for g, cells in _rows(report):
        colour = _COLOURS[g.verdict]
        figures = Table(box=box.SIMPLE_HEAD, title_justify="left", title=Text.from_markup(
            f"[bold]{g.workflow}[/]: {g.samples} pairs, [{colour}]{g.verdict.value}[/]"))
        figures.add_column("", overflow="fold")
        figures.add_column(control, justify="right", overflow="fold")
        figures.add_column(candidate, justify="right", overflow="fold")
        for label, cell in zip(("success", "p50 total", "p95 total", "$/image"), cells[2:6], strict=True):
            ctl, _, cand = cell.partition(" / ")
            figures.add_row(label, ctl, cand)
        rest = ("noise floor (bits)", "mismatch", "not compared", "pairs needed")
        for label, cell in zip(rest, cells[6:10], strict=True):
            figures.add_row(label, cell, "")
        parts.append(figures)
        for c, crit in ((c, cells) for g2, c, cells in _criteria_rows(report) if g2 is g):
            needed = f", pairs needed {crit[6]}" if crit[6] != "-" else ""
            parts.append(Text.from_markup(
                f"  {c.name}: [{_COLOURS[c.verdict]}]{c.verdict.value}[/]; estimate {crit[2]}, "
                f"one-sided bounds {crit[3]}, limit {crit[4]}, pairs judged {crit[5]}{needed}"))
        parts.append(Text(""))
    needed = "" if report.pairs_needed is None else f" (about {report.pairs_needed} more pairs needed)"
    colour = _COLOURS[report.verdict]
    parts.append(Text.from_markup(f"verdict: [bold {colour}]{report.verdict.value}[/]{needed}"))
    parts.extend(Text(f"  - {reason}") for reason in report.reasons)
    return Group(*parts)


def render_json(report: ShadowReport) -> str:
    return report.model_dump_json(indent=2)


# ------------------------------------------------------------------------------------------------- html


def _svg_histogram(
    edges: list[float], a: list[int], b: list[int], width: int = 640, height: int = 240
) -> str:
    if not edges:
        return "<p>No successful jobs with a latency.</p>"
    pad_l, pad_b, pad_t = 44, 36, 12
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    top = max(max(a), max(b), 1)
    n = len(a)
    bw = plot_w / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="latency distribution">']
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" '
                 f'stroke="#444"/>')
    for i in range(n):
        for j, (counts, colour) in enumerate(((a, "#4c78a8"), (b, "#f58518"))):
            h = counts[i] / top * plot_h
            x = pad_l + i * bw + j * bw / 2
            parts.append(f'<rect x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bw / 2 - 1:.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{_secs(edges[i])}–'
                         f'{_secs(edges[i + 1])}: {counts[i]}</title></rect>')
    for i in (0, n // 2, n):
        x = pad_l + i * bw
        parts.append(f'<text x="{x:.1f}" y="{height - 18}" font-size="11" text-anchor="middle">'
                     f'{html.escape(_secs(edges[i]))}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="11" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" font-size="11" text-anchor="end">0</text>')
    parts.append(f'<rect x="{pad_l}" y="{height - 12}" width="10" height="10" fill="#4c78a8"/>'
                 f'<text x="{pad_l + 14}" y="{height - 3}" font-size="11">control</text>'
                 f'<rect x="{pad_l + 80}" y="{height - 12}" width="10" height="10" fill="#f58518"/>'
                 f'<text x="{pad_l + 94}" y="{height - 3}" font-size="11">candidate</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_timeline(points: list[TimelinePoint], bucket: float, width: int = 640, height: int = 220) -> str:
    if not points:
        return "<p>No pairs where both sides succeeded.</p>"
    pad_l, pad_b, pad_t = 44, 30, 12
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    t0, t1 = points[0].start, points[-1].start
    span = max(t1 - t0, bucket)

    def xy(p: TimelinePoint) -> tuple[float, float]:
        x = pad_l + (p.start - t0) / span * plot_w
        y = pad_t + plot_h - (p.mismatch_rate or 0.0) * plot_h
        return x, y

    coords = [xy(p) for p in points]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="mismatch rate over time">']
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" '
                 f'stroke="#444"/><line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" '
                 f'stroke="#444"/>')
    parts.append('<polyline fill="none" stroke="#e45756" stroke-width="2" points="'
                 + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
    for (x, y), p in zip(coords, points, strict=True):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#e45756"><title>{_when(p.start)}: '
                     f'{p.mismatches}/{p.compared}</title></circle>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="11" text-anchor="end">100%</text>'
                 f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" font-size="11" text-anchor="end">0%</text>')
    parts.append(f'<text x="{pad_l}" y="{height - 8}" font-size="11">{html.escape(_when(t0))}</text>'
                 f'<text x="{pad_l + plot_w}" y="{height - 8}" font-size="11" text-anchor="end">'
                 f'{html.escape(_when(t1))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: ShadowReport) -> str:
    """A self-contained HTML page: figures, verdict, latency distribution and mismatch rate over time."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEADERS)
    body = []
    for g, cells in _rows(report):
        cls = f' class="{g.verdict.value}"'
        bold = ' style="font-weight:bold"' if g.workflow == OVERALL else ""
        body.append(f"<tr{bold}>" + "".join(f"<td>{esc(c)}</td>" for c in cells[:-1])
                    + f"<td{cls}>{esc(cells[-1])}</td></tr>")
    reasons = "".join(f"<li>{esc(r)}</li>" for r in report.reasons)
    crit_head = "".join(f"<th>{esc(h)}</th>" for h in _CRITERIA_HEADERS)
    crit_body = "".join(
        "<tr>" + "".join(f"<td>{esc(x)}</td>" for x in cells[:-1])
        + f'<td class="{c.verdict.value}">{esc(cells[-1])}</td></tr>'
        for _, c, cells in _criteria_rows(report)
    )
    needed = "" if report.pairs_needed is None else f" (about {report.pairs_needed} more pairs needed)"
    bucket = "hour" if report.timeline_bucket_s < 86400 else "day"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gpubridge shadow report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}
.go{{color:#2a7d2a}} .no-go{{color:#c0392b}} .insufficient-data{{color:#b7950b}}
</style></head><body>
<h1>Shadow report</h1>
<p>Control: {esc(", ".join(report.control) or "?")}; candidate: {esc(", ".join(report.candidate) or "?")}.
Window: {esc(_when(report.since))} to {esc(_when(report.until))};
generated {esc(_when(report.generated_at))}.</p>
<h2>Verdict: <span class="{report.verdict.value}">{esc(report.verdict.value)}</span>{esc(needed)}</h2>
<ul>{reasons}</ul>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
<h2>Criteria</h2>
<p>Each criterion is judged with a one-sided bound at the look's error level (alpha spent over repeated
looks): go when the upper bound is within the limit, no-go when the lower bound is beyond it.</p>
<table class="criteria"><thead><tr>{crit_head}</tr></thead><tbody>{crit_body}</tbody></table>
<h2>Latency distribution (total, successful jobs)</h2>
{_svg_histogram(report.latency_edges, report.latency_control, report.latency_candidate)}
<h2>Mismatch rate over time (per {bucket})</h2>
{_svg_timeline(report.timeline, report.timeline_bucket_s)}
<script type="application/json" id="report">{esc(json.dumps(report.model_dump(mode="json")))}</script>
</body></html>
"""
