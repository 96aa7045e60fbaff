"""Shadow records to figures, a go/no-go verdict, and renderings (rich table, JSON, HTML with inline SVG).

Figures, per workflow and overall, over the candidate records (``kind="candidate"``):

- ``samples``: pairs; success rates: share of pairs where that side succeeded.
- latency: p50/p95 of queue, execution and total seconds over that side's *successful* jobs.
  Percentiles are nearest-rank: the value at position ``ceil(p/100 * n)`` of the sorted sample.
- cost per image: the USD cost summed over that side's successful jobs that report a cost, over the images
  those jobs produced.
- mismatch rate: of the pairs where both succeeded (``compared``), the share whose outputs differ in
  structure (artifact count, kinds, image sizes) or by a pHash distance above the workflow's threshold.

Noise floor (per workflow): the nearest-rank p95 of the pHash distances of its control-against-control
pairs (``kind="noise"``, both succeeded, with images) in the same window; with fewer than
``min_noise_pairs`` of them, ``default_floor``. The threshold is the floor plus ``noise_margin``, and a
pair is a mismatch only when its distance is *strictly* above it. p95 rather than the maximum, so that one
freak control-vs-control pair does not hide real regressions; the margin absorbs the floor's own sampling
error on small samples.

Verdict: ``insufficient-data`` with fewer than ``min_samples`` pairs overall; else ``no-go`` when the
overall figures, or those of any workflow with at least ``min_samples`` pairs, break a threshold; else ``go``.
"""

from __future__ import annotations

import enum
import html
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from .compare import Comparison, Outcome, Side, is_mismatch
from .settings import ShadowOptions, ShadowThresholds

__all__ = [
    "Verdict",
    "SideFigures",
    "GroupFigures",
    "TimelinePoint",
    "ShadowReport",
    "build_report",
    "percentile",
    "noise_floor",
    "render_table",
    "render_json",
    "render_html",
]

OVERALL = "(all)"
_EPS = 1e-9


class Verdict(str, enum.Enum):
    GO = "go"
    NO_GO = "no-go"
    INSUFFICIENT_DATA = "insufficient-data"

    def __str__(self) -> str:
        return self.value


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
    noise_pairs: int = 0
    noise_floor: float | None = None
    floor_source: str | None = None
    """``measured`` or ``default``; None for the overall group (each workflow has its own)."""
    threshold: float | None = None
    p95_latency_ratio: float | None = None
    cost_per_image_ratio: float | None = None
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
    thresholds: ShadowThresholds
    noise_margin: float
    overall: GroupFigures
    workflows: list[GroupFigures] = Field(default_factory=list)
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    timeline_bucket_s: float = 3600.0
    timeline: list[TimelinePoint] = Field(default_factory=list)
    latency_edges: list[float] = Field(default_factory=list)
    latency_control: list[int] = Field(default_factory=list)
    latency_candidate: list[int] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------- aggregation


def noise_floor(noise: Iterable[Comparison], options: ShadowOptions) -> tuple[float, str, int]:
    """``(floor, source, pairs)`` for one workflow's noise records (see the module docstring)."""
    distances = [
        r.phash_distance for r in noise if r.outcome is Outcome.BOTH_OK and r.phash_distance is not None
    ]
    if len(distances) >= options.min_noise_pairs:
        return float(percentile(distances, 95)), "measured", len(distances)  # type: ignore[arg-type]
    return options.default_floor, "default", len(distances)


def _side_figures(sides: list[Side], samples: int) -> SideFigures:
    ok = [s for s in sides if s.ok]
    f = SideFigures(successes=len(ok), success_rate=len(ok) / samples if samples else None)
    for attr in ("total_s", "queued_s", "executing_s"):
        values = [getattr(s, attr) for s in ok if getattr(s, attr) is not None]
        setattr(f, f"p50_{attr}", percentile(values, 50))
        setattr(f, f"p95_{attr}", percentile(values, 95))
    costed = [s for s in ok if s.cost_usd is not None]
    f.images = sum(s.images for s in ok)
    if costed:
        f.cost_usd = sum(s.cost_usd for s in costed)  # type: ignore[misc]
        images = sum(s.images for s in costed)
        f.cost_per_image = f.cost_usd / images if images else None
    return f


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
    for r in records:
        verdict = is_mismatch(r, thresholds_by_workflow[r.workflow])
        if verdict is None:
            continue
        g.compared += 1
        g.mismatches += verdict
    g.mismatch_rate = g.mismatches / g.compared if g.compared else None
    g.p95_latency_ratio = _ratio(g.candidate.p95_total_s, g.control.p95_total_s)
    g.cost_per_image_ratio = _ratio(g.candidate.cost_per_image, g.control.cost_per_image)
    return g


def _judge(g: GroupFigures, t: ShadowThresholds) -> None:
    if g.samples < t.min_samples:
        g.verdict = Verdict.INSUFFICIENT_DATA
        g.reasons = [f"{g.samples} pairs, fewer than min_samples={t.min_samples}"]
        return
    reasons = []
    cr, kr = g.control.success_rate, g.candidate.success_rate
    if t.max_success_rate_drop is not None and cr is not None and kr is not None:
        if cr - kr > t.max_success_rate_drop + _EPS:
            reasons.append(f"candidate success rate {kr:.2%} trails control {cr:.2%} by more than "
                           f"{t.max_success_rate_drop:.2%}")
    if t.max_mismatch_rate is not None and g.mismatch_rate is not None:
        if g.mismatch_rate > t.max_mismatch_rate + _EPS:
            reasons.append(f"mismatch rate {g.mismatch_rate:.2%} above {t.max_mismatch_rate:.2%}")
    if t.max_p95_latency_ratio is not None and g.p95_latency_ratio is not None:
        if g.p95_latency_ratio > t.max_p95_latency_ratio + _EPS:
            reasons.append(f"p95 latency ratio {g.p95_latency_ratio:.2f} above {t.max_p95_latency_ratio:.2f}")
    if t.max_cost_per_image_ratio is not None and g.cost_per_image_ratio is not None:
        if g.cost_per_image_ratio > t.max_cost_per_image_ratio + _EPS:
            reasons.append(f"cost per image ratio {g.cost_per_image_ratio:.2f} above "
                           f"{t.max_cost_per_image_ratio:.2f}")
    g.verdict = Verdict.NO_GO if reasons else Verdict.GO
    g.reasons = reasons


def _timeline(records: list[Comparison], thresholds: dict[str, float]) -> tuple[float, list[TimelinePoint]]:
    judged = [(r.created_at, is_mismatch(r, thresholds[r.workflow])) for r in records]
    judged = [(t, m) for t, m in judged if m is not None]
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


def build_report(
    records: Iterable[Comparison],
    options: ShadowOptions | None = None,
    *,
    since: float | None = None,
    until: float | None = None,
) -> ShadowReport:
    """Aggregate records into a :class:`ShadowReport` (thresholds and noise settings from ``options``)."""
    options = options or ShadowOptions()
    records = list(records)
    candidates = [r for r in records if r.kind == "candidate"]
    noise_by_wf: dict[str, list[Comparison]] = defaultdict(list)
    for r in records:
        if r.kind == "noise":
            noise_by_wf[r.workflow].append(r)
    workflows = sorted({r.workflow for r in candidates})
    floors = {wf: noise_floor(noise_by_wf.get(wf, []), options) for wf in workflows}
    thresholds = {wf: floor + options.noise_margin for wf, (floor, _, _) in floors.items()}

    groups = []
    for wf in workflows:
        g = _group(wf, [r for r in candidates if r.workflow == wf], thresholds)
        g.noise_floor, g.floor_source, g.noise_pairs = floors[wf]
        g.threshold = thresholds[wf]
        _judge(g, options.thresholds)
        groups.append(g)
    overall = _group(OVERALL, candidates, thresholds)
    overall.noise_pairs = sum(g.noise_pairs for g in groups)
    _judge(overall, options.thresholds)

    verdict, reasons = overall.verdict, list(overall.reasons)
    if verdict is not Verdict.INSUFFICIENT_DATA:
        for g in groups:
            if g.verdict is Verdict.NO_GO:
                verdict = Verdict.NO_GO
                reasons.extend(f"{g.workflow}: {reason}" for reason in g.reasons)

    bucket, timeline = _timeline(candidates, thresholds)
    edges, hc, hk = _histogram(
        [r.control.total_s for r in candidates if r.control.ok and r.control.total_s is not None],
        [r.candidate.total_s for r in candidates if r.candidate.ok and r.candidate.total_s is not None],
    )
    return ShadowReport(
        since=since,
        until=until,
        control=sorted({r.control.provider for r in candidates if r.control.provider}),
        candidate=sorted({r.candidate.provider for r in candidates if r.candidate.provider}),
        thresholds=options.thresholds,
        noise_margin=options.noise_margin,
        overall=overall,
        workflows=groups,
        verdict=verdict,
        reasons=reasons,
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
            g.verdict.value,
        ]))
    return rows


_HEADERS = ["workflow", "pairs", "success ctl / cand", "p50 ctl / cand", "p95 ctl / cand",
            "$/image ctl / cand", "noise floor (bits)", "mismatch", "verdict"]
_COLOURS = {Verdict.GO: "green", Verdict.NO_GO: "red", Verdict.INSUFFICIENT_DATA: "yellow"}


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_table(report: ShadowReport):
    """A rich renderable: the figures table and the verdict."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = (f"shadow report: {', '.join(report.control) or '?'} (control) vs "
             f"{', '.join(report.candidate) or '?'} (candidate), since {_when(report.since)}")
    table = Table(title=title, title_justify="left")
    for h in _HEADERS:
        table.add_column(h, justify="left" if h in ("workflow", "verdict") else "right")
    for g, cells in _rows(report):
        style = "bold" if g.workflow == OVERALL else None
        cells = [*cells[:-1], f"[{_COLOURS[g.verdict]}]{cells[-1]}[/]"]
        table.add_row(*cells, style=style)
    verdict = Text.from_markup(f"verdict: [bold {_COLOURS[report.verdict]}]{report.verdict.value}[/]")
    parts: list[Any] = [table, verdict]
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
<h2>Verdict: <span class="{report.verdict.value}">{esc(report.verdict.value)}</span></h2>
<ul>{reasons}</ul>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
<h2>Latency distribution (total, successful jobs)</h2>
{_svg_histogram(report.latency_edges, report.latency_control, report.latency_candidate)}
<h2>Mismatch rate over time (per {bucket})</h2>
{_svg_timeline(report.timeline, report.timeline_bucket_s)}
<script type="application/json" id="report">{esc(json.dumps(report.model_dump(mode="json")))}</script>
</body></html>
"""
