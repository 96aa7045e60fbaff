"""Shadow overhead on the primary path: ``bench.shadow_overhead``'s measurement, sized for the table.

    python -m bench.shadow [--quick] [--jobs N]

Two ComfyUI doubles in processes of their own (control and candidate), the Flux workflow (1024x1024 PNG
outputs, so the comparator decodes real images), blocks alternating between the control alone and
``ShadowRunner`` at rate 1.0 (SQLite sink, 5 % noise-floor pairs). The number is the caller's ``run()``
time on the primary path. See ``python -m bench.shadow_overhead --help`` for every knob.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from types import SimpleNamespace
from typing import Any

from bench._harness import QUICK_NOTE, Row, table, verdict

TARGET = 1.05
SIZES = {
    "full": {"jobs": 200, "block": 20, "warmup": 5, "node_delay": 0.005, "step_delay": 0.02},
    "quick": {"jobs": 30, "block": 10, "warmup": 3, "node_delay": 0.005, "step_delay": 0.02},
}


def measure(jobs: int, block: int, warmup: int, node_delay: float, step_delay: float) -> dict[str, Any]:
    from bench import shadow_overhead

    args = SimpleNamespace(jobs=jobs, block=block, warmup=warmup, concurrency=1, max_inflight=16, noise_rate=0.05,
                           noise_warmup=10, node_delay=node_delay, step_delay=step_delay)
    return asyncio.run(shadow_overhead.main(args))  # type: ignore[arg-type]


def run(quick: bool = False, jobs: int | None = None) -> list[Row]:
    """In ``--quick`` (15 jobs per arm) the p50 ratio moves by more than its 5 % bound from run to run
    (1.02x to 1.15x on 2 busy cores), so it is reported there and gated in the full run only."""
    size = dict(SIZES["quick" if quick else "full"])
    if jobs:
        size["jobs"] = jobs
    found = measure(**size)
    a, b = found["without_shadow"], found["with_shadow_100pct"]
    n = found["jobs_per_arm"]
    return [
        Row("shadow", f"primary path with shadow at 100% vs without, p50 (n={n})", f"{a['p50_ms']:.1f} ms",
            f"{b['p50_ms']:.1f} ms", found["ratio_p50"], f"<= {TARGET:.2f}x" + (QUICK_NOTE if quick else ""),
            verdict(found["ratio_p50"] <= TARGET, gate=not quick), found),
        Row("shadow", f"primary path with shadow at 100% vs without, p99 (n={n})", f"{a['p99_ms']:.1f} ms",
            f"{b['p99_ms']:.1f} ms", found["ratio_p99"], "", "info"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per arm")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.jobs)
    print(table(rows))
    return 0 if all(r.result != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
