"""The pure decision objects, on seeded RNGs and a fake clock."""

from __future__ import annotations

import random

import pytest
from scipy.stats import binom

from gpubridge.shadow.sampling import Admission, NoiseFloorSampler, Sampler, WeightedChoice

ALPHA = 1e-6  # two-sided: a correct sampler falls outside the bounds once in a million runs


def bounds(n: int, p: float) -> tuple[int, int]:
    return int(binom.ppf(ALPHA / 2, n, p)), int(binom.isf(ALPHA / 2, n, p))


class CountingRandom(random.Random):
    draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_sampler_honours_rate_within_binomial_bounds(seed: int, rate: float):
    n = 20_000
    s = Sampler(rate, random.Random(seed))
    hits = sum(s.decide() for _ in range(n))
    lo, hi = bounds(n, rate)
    assert lo <= hits <= hi
    assert (s.seen, s.sampled) == (n, hits)


def test_sampler_rejects_a_biased_rate():
    # The bounds are tight enough to tell 0.1 from 0.12 (10 sigma apart): the test above can fail.
    hits = sum(Sampler(0.12, random.Random(0)).decide() for _ in range(20_000))
    lo, hi = bounds(20_000, 0.1)
    assert not lo <= hits <= hi


def test_sampler_edges_draw_nothing():
    rng = CountingRandom(0)
    assert [Sampler(0.0, rng).decide() for _ in range(100)] == [False] * 100
    assert [Sampler(1.0, rng).decide() for _ in range(100)] == [True] * 100
    assert rng.draws == 0
    with pytest.raises(ValueError):
        Sampler(1.5)


def test_admission_bounds_inflight_and_counts_drops():
    a = Admission(2)
    assert [a.try_acquire() for _ in range(4)] == [True, True, False, False]
    assert (a.inflight, a.admitted, a.dropped) == (2, 2, 2)
    a.release()
    assert a.try_acquire() is True
    a.release()
    a.release()
    assert a.inflight == 0
    with pytest.raises(RuntimeError):
        a.release()
    with pytest.raises(ValueError):
        Admission(0)


def test_noise_sampler_warmup_then_rate():
    ns = NoiseFloorSampler(rate=0.2, warmup=3, rng=random.Random(7), clock=lambda: 0.0)
    assert [ns.decide("a") for _ in range(3)] == [True] * 3
    assert ns.decide("b") is True  # warm-up is per workflow
    n = 20_000
    hits = sum(ns.decide("a") for _ in range(n))
    lo, hi = bounds(n, 0.2)
    assert lo <= hits <= hi
    assert ns.taken("a") == 3 + hits


def test_noise_sampler_refreshes_a_stale_floor():
    now = [1000.0]
    ns = NoiseFloorSampler(rate=0.0, warmup=1, refresh_s=60.0, rng=random.Random(0), clock=lambda: now[0])
    assert ns.decide("a") is True  # warm-up
    now[0] += 59
    assert ns.decide("a") is False
    now[0] += 1
    assert ns.decide("a") is True  # 60 s since the last pair
    assert ns.decide("a") is False


def test_weighted_choice_within_binomial_bounds_and_zero_weight():
    wc = WeightedChoice([("ctl", 0.9), ("cand", 0.1)], random.Random(3))
    n = 20_000
    picks = [wc.choose() for _ in range(n)]
    lo, hi = bounds(n, 0.1)
    assert lo <= picks.count("cand") <= hi
    assert wc.counts == [picks.count("ctl"), picks.count("cand")]
    never = WeightedChoice([("ctl", 1.0), ("cand", 0.0)], random.Random(3))
    assert {never.choose() for _ in range(1000)} == {"ctl"}
    always = WeightedChoice([("ctl", 0.0), ("cand", 1.0)], random.Random(3))
    assert {always.choose() for _ in range(1000)} == {"cand"}


def test_weighted_choice_is_sticky_by_key():
    a = WeightedChoice([("ctl", 0.5), ("cand", 0.5)], random.Random(1))
    b = WeightedChoice([("ctl", 0.5), ("cand", 0.5)], random.Random(2))
    keys = [f"key-{i}" for i in range(200)]
    assert [a.choose(k) for k in keys] == [b.choose(k) for k in keys]
    assert {a.choose("key-7") for _ in range(20)} == {a.choose("key-7")}
    lo, hi = bounds(200, 0.5)
    assert lo <= [a.choose(k) for k in keys].count("cand") <= hi
    with pytest.raises(ValueError):
        WeightedChoice([("x", 0.0)])
