"""The statistics behind the go/no-go verdict: one-sided bounds per criterion and an alpha-spending rule
over repeated looks. Pure functions of counts and samples (no records, no I/O), so a Monte Carlo run can
evaluate them on simulated counts.

Each criterion compares an estimate with a configured limit (``margin``) through a one-sided confidence
bound at level ``alpha_k``:

- ``go`` for the criterion when the *upper* bound is at most the limit (shown not worse by more than the
  margin);
- ``no-go`` when the *lower* bound is above it (shown worse by more than the margin);
- otherwise ``insufficient-data``, with an estimate of the pairs still needed.

Criteria and their bounds (all from :mod:`scipy.stats`):

- success-rate drop (control success rate minus candidate's): Newcombe's hybrid score interval for a
  difference of proportions, built from the two Wilson intervals of ``scipy.stats.binomtest``;
- mismatch rate: exact Clopper-Pearson bounds (beta quantiles, ``scipy.stats.beta.ppf``);
- p95 latency ratio: distribution-free order-statistic bounds of each side's p95 (ranks from
  ``scipy.stats.binom``), the ratio's bound from the two sides' bounds at ``alpha_k / 2`` each;
- cost per delivered image ratio: a paired percentile bootstrap (``scipy.stats.bootstrap``, seeded).

Repeated looks: the verdict is only ever taken at the look sizes ``n_k = first_look * 2**(k-1)`` (5, 10,
20, 40, ... pairs by default), on the first ``n_k`` pairs of the window, at level
``alpha_k = alpha * 6 / (pi**2 * k**2)``. The ``alpha_k`` sum to ``alpha``, so however often the report is
run on a growing window, the chance that a criterion ever says ``go`` while the candidate is in truth worse
than the margin is at most ``alpha`` (Bonferroni over the looks), and likewise for a wrong ``no-go``.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Sequence

from pydantic import BaseModel

__all__ = [
    "Verdict",
    "Criterion",
    "look_index",
    "look_size",
    "spent_alpha",
    "look",
    "wilson_interval",
    "exact_interval",
    "rate_drop_bounds",
    "quantile_ranks",
    "p95_ratio_bounds",
    "cost_ratio_bounds",
    "judge_bounds",
    "judge_rate_drop",
    "judge_rate",
    "MAX_LOOKS",
]

MAX_LOOKS = 40
"""Look sizes are searched up to ``first_look * 2**(MAX_LOOKS-1)`` pairs for the pairs-needed estimate."""


class Verdict(str, enum.Enum):
    GO = "go"
    NO_GO = "no-go"
    INSUFFICIENT_DATA = "insufficient-data"

    def __str__(self) -> str:
        return self.value


class Criterion(BaseModel):
    """One criterion of one group: its estimate, one-sided bounds, limit and verdict."""

    name: str
    limit: float
    estimate: float | None = None
    lower: float | None = None
    upper: float | None = None
    n: int = 0
    """Pairs the bounds were computed on (the look size, see the module docstring)."""
    look: int = 0
    alpha: float | None = None
    """The one-sided error level spent at this look."""
    verdict: Verdict = Verdict.INSUFFICIENT_DATA
    pairs_needed: int | None = None
    """More pairs likely needed for a decision if the current estimate holds (None: decided, or unknown)."""
    reason: str | None = None


# ---------------------------------------------------------------------------------------- looks, alpha


def look_index(n: int, first_look: int) -> int:
    """The look ``k`` (1-based) whose size is the largest ``n_k <= n``; 0 when ``n < first_look``."""
    if n < first_look:
        return 0
    return int(math.floor(math.log2(n / first_look) + 1e-12)) + 1


def look_size(k: int, first_look: int) -> int:
    return 0 if k <= 0 else first_look * 2 ** (k - 1)


def spent_alpha(k: int, alpha: float) -> float:
    """The error level of look ``k``: ``alpha * 6 / (pi^2 k^2)`` (these sum to ``alpha`` over all looks)."""
    return alpha * 6.0 / (math.pi**2 * k * k)


def look(n: int, first_look: int, alpha: float) -> tuple[int, int, float]:
    """``(k, n_k, alpha_k)`` for a window of ``n`` pairs (``(0, 0, 0.0)`` before the first look)."""
    k = look_index(n, first_look)
    if k == 0:
        return 0, 0, 0.0
    return k, look_size(k, first_look), spent_alpha(k, alpha)


# ------------------------------------------------------------------------------------------- bounds


@functools.lru_cache(maxsize=65536)
def wilson_interval(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided-``alpha`` Wilson bounds of a proportion (scipy's two-sided interval at ``1 - 2 alpha``)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=1.0 - 2.0 * alpha, method="wilson")
    return float(ci.low), float(ci.high)


@functools.lru_cache(maxsize=65536)
def exact_interval(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided-``alpha`` Clopper-Pearson bounds of a proportion: the beta quantiles
    (``scipy.stats.beta.ppf``), the same interval as ``binomtest(...).proportion_ci(method="exact")``
    without its root finding (a hundred times faster)."""
    from scipy.stats import beta

    low = 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k >= n else float(beta.ppf(1.0 - alpha, k + 1, n - k))
    return low, high


def rate_drop_bounds(ctl_ok: int, cand_ok: int, n: int, alpha: float) -> tuple[float, float, float]:
    """``(estimate, lower, upper)`` of control success rate minus candidate success rate over ``n`` pairs
    (Newcombe's hybrid score method from the Wilson bounds of each rate)."""
    p1, p2 = ctl_ok / n, cand_ok / n
    l1, u1 = wilson_interval(ctl_ok, n, alpha)
    l2, u2 = wilson_interval(cand_ok, n, alpha)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, lower, upper


@functools.lru_cache(maxsize=4096)
def quantile_ranks(n: int, q: float, alpha: float) -> tuple[int | None, int | None]:
    """1-based ranks ``(l, u)`` such that ``X_(l) <= xi_q`` and ``X_(u) >= xi_q``, each with probability at
    least ``1 - alpha`` for any continuous distribution (None where ``n`` is too small for one)."""
    from scipy.stats import binom

    # X_(l) <= xi  iff  Bin(n, q) >= l : want P(Bin <= l - 1) <= alpha.
    j = int(binom.ppf(alpha, n, q))
    if binom.cdf(j, n, q) > alpha:
        j -= 1
    lower = j + 1 if j + 1 >= 1 else None
    # X_(u) >= xi  iff  Bin(n, q) <= u - 1 : want P(Bin <= u - 1) >= 1 - alpha.
    u = int(binom.ppf(1.0 - alpha, n, q)) + 1
    upper = u if u <= n else None
    return lower, upper


def p95_ratio_bounds(
    control: Sequence[float], candidate: Sequence[float], alpha: float
) -> tuple[float | None, float | None, float | None]:
    """``(estimate, lower, upper)`` of candidate p95 over control p95 (distribution-free; upper is
    ``inf`` when the samples are too small to bound the candidate's p95 from above)."""
    a, b = sorted(control), sorted(candidate)
    if not a or not b:
        return None, None, None
    est_a, est_b = a[max(1, math.ceil(0.95 * len(a))) - 1], b[max(1, math.ceil(0.95 * len(b))) - 1]
    estimate = est_b / est_a if est_a > 0 else None
    la, ua = quantile_ranks(len(a), 0.95, alpha / 2)
    lb, ub = quantile_ranks(len(b), 0.95, alpha / 2)
    ctl_low = a[la - 1] if la else 0.0
    ctl_high = a[ua - 1] if ua else math.inf
    cand_low = b[lb - 1] if lb else 0.0
    cand_high = b[ub - 1] if ub else math.inf
    upper = cand_high / ctl_low if ctl_low > 0 else math.inf
    lower = cand_low / ctl_high if ctl_high > 0 else 0.0
    return estimate, lower, upper


def cost_ratio_bounds(
    ctl_cost: Sequence[float], ctl_images: Sequence[int], cand_cost: Sequence[float],
    cand_images: Sequence[int], alpha: float, *, seed: int = 0, resamples: int = 999,
) -> tuple[float | None, float | None, float | None]:
    """``(estimate, lower, upper)`` of the candidate's cost per delivered image over the control's, paired
    per request (each job's cost, failed and billed ones included, over the images delivered)."""
    import numpy as np
    from scipy.stats import bootstrap

    data = [np.asarray(x, dtype=float) for x in (ctl_cost, ctl_images, cand_cost, cand_images)]
    n = len(data[0])

    def ratio(c1, i1, c2, i2, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            return (c2.sum(axis) / i2.sum(axis)) / (c1.sum(axis) / i1.sum(axis))

    if n == 0:
        return None, None, None
    estimate = float(ratio(*data))
    if not math.isfinite(estimate):
        return None, None, None
    if n < 2:
        return estimate, 0.0, math.inf
    if all(float(np.ptp(x)) == 0.0 for x in data):  # every pair alike: no sampling spread
        return estimate, estimate, estimate
    res = bootstrap(data, ratio, paired=True, vectorized=True, n_resamples=resamples,
                    confidence_level=1.0 - 2.0 * alpha, method="percentile",
                    rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    low = 0.0 if not math.isfinite(low) else low
    high = math.inf if not math.isfinite(high) else high
    return estimate, low, high


# ----------------------------------------------------------------------------------------- judging


def judge_bounds(lower: float | None, upper: float | None, limit: float) -> Verdict:
    if upper is not None and upper <= limit:
        return Verdict.GO
    if lower is not None and lower > limit:
        return Verdict.NO_GO
    return Verdict.INSUFFICIENT_DATA


def _needed(n: int, first_look: int, alpha: float, decides: Callable[[int, float], bool]) -> int | None:
    """Pairs beyond ``n`` after which ``decides(n_k, alpha_k)`` first holds at a later look, or None."""
    k = look_index(n, first_look)
    for kk in range(max(k, 0) + 1, MAX_LOOKS + 1):
        size = look_size(kk, first_look)
        if decides(size, spent_alpha(kk, alpha)):
            return max(size - n, 1)
    return None


def judge_rate_drop(
    ctl_ok: int, cand_ok: int, n: int, margin: float, *, alpha: float, first_look: int,
    total: int | None = None, estimate_needed: bool = True,
) -> Criterion:
    """The success-rate criterion on the first ``n`` pairs (already cut to a look size by the caller when
    ``total`` is given: ``total`` is the window's pairs, used for the pairs-needed estimate)."""
    total = n if total is None else total
    k, size, a = look(n, first_look, alpha)
    c = Criterion(name="success_rate_drop", limit=margin, n=n, look=k, alpha=a or None)
    if n == 0 or k == 0:
        c.reason = f"{n} pairs, fewer than the first look ({first_look})"
        c.pairs_needed = first_look - n
        return c
    c.estimate, c.lower, c.upper = rate_drop_bounds(ctl_ok, cand_ok, n, a)
    c.verdict = judge_bounds(c.lower, c.upper, margin)
    if c.verdict is Verdict.INSUFFICIENT_DATA and estimate_needed:
        p1, p2 = ctl_ok / n, cand_ok / n

        def decides(m: int, am: float) -> bool:
            _, lo, hi = rate_drop_bounds(round(p1 * m), round(p2 * m), m, am)
            return judge_bounds(lo, hi, margin) is not Verdict.INSUFFICIENT_DATA

        c.pairs_needed = _needed(total, first_look, alpha, decides)
    return c


def judge_rate(
    k_bad: int, n: int, limit: float, *, name: str, alpha: float, first_look: int, total: int | None = None,
    look_n: int | None = None, estimate_needed: bool = True,
) -> Criterion:
    """A rate criterion (bad events ``k_bad`` of ``n``) against ``limit``, exact bounds. ``look_n`` is the
    pairs count that fixed the look (default ``n``)."""
    total = n if total is None else total
    k, _, a = look(look_n if look_n is not None else n, first_look, alpha)
    c = Criterion(name=name, limit=limit, n=n, look=k, alpha=a or None)
    if k == 0 or n == 0:
        c.reason = f"{n} compared pairs" + (f", fewer than the first look ({first_look})" if k == 0 else "")
        c.pairs_needed = max(first_look - total, 1) if k == 0 else None
        return c
    c.estimate = k_bad / n
    c.lower, c.upper = exact_interval(k_bad, n, a)
    c.verdict = judge_bounds(c.lower, c.upper, limit)
    if c.verdict is Verdict.INSUFFICIENT_DATA and estimate_needed:
        p = k_bad / n
        share = n / max(look_n or n, 1)  # compared pairs per pair

        def decides(m: int, am: float) -> bool:
            mm = max(1, round(m * share))
            lo, hi = exact_interval(round(p * mm), mm, am)
            return judge_bounds(lo, hi, limit) is not Verdict.INSUFFICIENT_DATA

        c.pairs_needed = _needed(total, first_look, alpha, decides)
    return c


# ------------------------------------------------------------------------------------------ simulation


def simulate(
    *,
    reps: int,
    max_pairs: int,
    ctl_fail: float,
    cand_fail: float,
    mismatch: float,
    max_success_rate_drop: float | None = 0.01,
    max_mismatch_rate: float | None = 0.05,
    max_p95_latency_ratio: float | None = None,
    latency_scale: float = 1.0,
    alpha: float = 0.05,
    first_look: int = 5,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Monte Carlo of the verdict over a growing window (one workflow), on simulated counts.

    Each pair: the control fails with probability ``ctl_fail``, the candidate with ``cand_fail``
    (independently); a pair where both succeeded mismatches with probability ``mismatch``. With
    ``max_p95_latency_ratio`` set, both sides' latencies are log-normal (sigma 0.5), the candidate's scaled
    by ``latency_scale``. The verdict is evaluated at every look size up to ``max_pairs`` on the same
    growing window, exactly as the report does (same functions).

    Returns, per look size (``sizes``): ``go_at`` (share of runs with ``go`` at that look), ``ever_go``
    (share with ``go`` at that look or any earlier one), ``ever_no_go``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    ks = list(range(1, look_index(max_pairs, first_look) + 1))
    sizes = [look_size(k, first_look) for k in ks]
    inc = np.diff([0, *sizes])
    probs = [(1 - ctl_fail) * (1 - cand_fail), (1 - ctl_fail) * cand_fail, ctl_fail * (1 - cand_fail),
             ctl_fail * cand_fail]
    counts = np.cumsum(np.stack([rng.multinomial(int(m), probs, size=reps) for m in inc], axis=1), axis=1)
    both_ok_inc = np.diff(np.concatenate([np.zeros((reps, 1), dtype=int), counts[:, :, 0]], axis=1), axis=1)
    bad = np.cumsum(rng.binomial(both_ok_inc, mismatch), axis=1)
    go = np.zeros((reps, len(sizes)), dtype=bool)
    no_go = np.zeros_like(go)
    for j, (k, n) in enumerate(zip(ks, sizes, strict=True)):
        a = spent_alpha(k, alpha)
        cols = []
        if max_success_rate_drop is not None:
            ctl_ok = counts[:, j, 0] + counts[:, j, 1]
            cand_ok = counts[:, j, 0] + counts[:, j, 2]
            cols.append([judge_rate_drop(int(c), int(d), n, max_success_rate_drop, alpha=alpha,
                                         first_look=first_look, estimate_needed=False).verdict
                         for c, d in zip(ctl_ok, cand_ok)])
        if max_mismatch_rate is not None:
            compared = counts[:, j, 0]
            cols.append([judge_rate(int(b), int(m), max_mismatch_rate, name="mismatch_rate", alpha=alpha,
                                    first_look=first_look, look_n=n, estimate_needed=False).verdict
                         for b, m in zip(bad[:, j], compared)])
        if max_p95_latency_ratio is not None:
            m_ctl = max(1, round(n * (1 - ctl_fail)))
            m_cand = max(1, round(n * (1 - cand_fail)))
            la, ua = quantile_ranks(m_ctl, 0.95, a / 2)
            lb, ub = quantile_ranks(m_cand, 0.95, a / 2)
            x = np.sort(rng.lognormal(0.0, 0.5, size=(reps, m_ctl)), axis=1)
            y = np.sort(rng.lognormal(0.0, 0.5, size=(reps, m_cand)), axis=1) * latency_scale
            hi = (y[:, ub - 1] if ub else np.inf) / (x[:, la - 1] if la else 0.0)
            lo = (y[:, lb - 1] if lb else 0.0) / (x[:, ua - 1] if ua else np.inf)
            cols.append([judge_bounds(float(low), float(high), max_p95_latency_ratio)
                         for low, high in zip(np.broadcast_to(lo, reps), np.broadcast_to(hi, reps))])
        table = np.array(cols, dtype=object).T if cols else np.full((reps, 1), Verdict.GO, dtype=object)
        go[:, j] = (table == Verdict.GO).all(axis=1)
        no_go[:, j] = (table == Verdict.NO_GO).any(axis=1)
    return {
        "sizes": [float(s) for s in sizes],
        "go_at": go.mean(axis=0).tolist(),
        "ever_go": np.logical_or.accumulate(go, axis=1).mean(axis=0).tolist(),
        "ever_no_go": np.logical_or.accumulate(no_go, axis=1).mean(axis=0).tolist(),
    }
