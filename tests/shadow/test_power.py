"""Seeded Monte Carlo of the verdict on simulated counts (issue 22, acceptance): a worse candidate gets
`go` at most 5 % of the time over repeated looks up to 1,000 pairs; identical providers get `go` at least
80 % of the time at the window docs/shadow.md names (5,120 pairs)."""

from __future__ import annotations

from gpubridge.shadow.decision import look_index, simulate

DOCS_WINDOW = 5120  # docs/shadow.md, "Power"


def test_candidate_failing_3_percent_against_1_is_rarely_go_at_any_look():
    sim = simulate(reps=300, max_pairs=1000, ctl_fail=0.01, cand_fail=0.03, mismatch=0.0,
                   max_mismatch_rate=None, seed=22)
    assert sim["sizes"][-1] == 640 and look_index(1000, 5) == 8  # 1,000 pairs are judged on the first 640
    assert max(sim["ever_go"]) <= 0.05, sim


def test_mismatch_8_percent_against_5_is_rarely_go_at_any_look():
    sim = simulate(reps=400, max_pairs=1000, ctl_fail=0.0, cand_fail=0.0, mismatch=0.08,
                   max_success_rate_drop=None, seed=23)
    assert max(sim["ever_go"]) <= 0.05, sim
    assert sim["ever_no_go"][-1] >= 0.3  # and it is often caught by 640 pairs


def test_identical_providers_are_go_at_the_documented_window():
    sim = simulate(reps=400, max_pairs=DOCS_WINDOW, ctl_fail=0.01, cand_fail=0.01, mismatch=0.01,
                   max_p95_latency_ratio=1.5, seed=24)
    assert sim["sizes"][-1] == DOCS_WINDOW
    assert sim["go_at"][-1] >= 0.8, sim
    assert sim["ever_no_go"][-1] <= 0.05, sim
