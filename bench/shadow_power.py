"""Power and error rates of the shadow verdict (docs/shadow.md, "Guarantees and power").

Seeded Monte Carlo on simulated counts through the same decision functions the report uses
(:func:`gpubridge.shadow.decision.simulate`): one workflow, a growing window judged at every look size.

    python -m bench.shadow_power [--reps 500]

Prints two Markdown tables: the chance of ever getting ``go`` over all looks when the candidate is worse
(or exactly at the limit), and the chance of ``go`` at each window size when the providers are identical.
"""

from __future__ import annotations

import argparse

from gpubridge.shadow.decision import simulate

WORSE = [
    ("fails 3 % vs 1 % (limit: 1 point)", dict(ctl_fail=0.01, cand_fail=0.03, mismatch=0.0,
                                               max_mismatch_rate=None)),
    ("fails 2 % vs 1 % (at the limit)", dict(ctl_fail=0.01, cand_fail=0.02, mismatch=0.0,
                                             max_mismatch_rate=None)),
    ("mismatch 8 % (limit 5 %)", dict(ctl_fail=0.0, cand_fail=0.0, mismatch=0.08,
                                      max_success_rate_drop=None)),
    ("mismatch 5 % (at the limit)", dict(ctl_fail=0.0, cand_fail=0.0, mismatch=0.05,
                                         max_success_rate_drop=None)),
    ("p95 latency 1.6x (limit 1.5x)", dict(ctl_fail=0.0, cand_fail=0.0, mismatch=0.0,
                                           max_success_rate_drop=None, max_mismatch_rate=None,
                                           max_p95_latency_ratio=1.5, latency_scale=1.6)),
]

IDENTICAL = [
    ("0 % failures, 1 % mismatch", dict(ctl_fail=0.0, cand_fail=0.0, mismatch=0.01)),
    ("1 % failures, 1 % mismatch", dict(ctl_fail=0.01, cand_fail=0.01, mismatch=0.01)),
    ("1 % failures, 1 % mismatch, margin 2 points", dict(ctl_fail=0.01, cand_fail=0.01, mismatch=0.01,
                                                        max_success_rate_drop=0.02)),
    ("2 % failures, 2 % mismatch", dict(ctl_fail=0.02, cand_fail=0.02, mismatch=0.02)),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--max-pairs", type=int, default=10240)
    args = parser.parse_args()
    print(f"Defaults: alpha 0.05, first look 5 pairs, limits 1 point / 5 % / 1.5x; {args.reps} runs each.\n")
    print("P(go at any look up to N pairs) when the candidate is worse or at the limit:\n")
    sizes = None
    rows = []
    for i, (name, kw) in enumerate(WORSE):
        sim = simulate(reps=args.reps, max_pairs=args.max_pairs, seed=100 + i, **kw)
        sizes = sim["sizes"]
        rows.append((name, sim["ever_go"], sim["ever_no_go"]))
    cols = [j for j, s in enumerate(sizes) if s >= 80]
    print("| candidate | " + " | ".join(f"{int(sizes[j])}" for j in cols) + " | P(no-go) by the end |")
    print("|---|" + "---|" * len(cols) + "---|")
    for name, ever, nogo in rows:
        print(f"| {name} | " + " | ".join(f"{ever[j]:.3f}" for j in cols) + f" | {nogo[-1]:.2f} |")
    print("\nP(go at a window of N pairs) for identical providers (same latency distribution too):\n")
    print("| providers | " + " | ".join(f"{int(sizes[j])}" for j in cols) + " | P(no-go) ever |")
    print("|---|" + "---|" * len(cols) + "---|")
    for i, (name, kw) in enumerate(IDENTICAL):
        sim = simulate(reps=args.reps, max_pairs=args.max_pairs, seed=200 + i, max_p95_latency_ratio=1.5,
                       **kw)
        print(f"| {name} | " + " | ".join(f"{sim['go_at'][j]:.2f}" for j in cols)
              + f" | {sim['ever_no_go'][-1]:.3f} |")


if __name__ == "__main__":
    main()
