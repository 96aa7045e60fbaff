"""Primary-path latency with shadow traffic at 100 % against without, in one process.

Two ComfyUI test doubles run as separate processes on loopback (control and candidate), each behind a
:class:`~gpubridge.providers.local.LocalRunner`. The same control runner serves both arms; blocks of jobs
alternate between the arms (plain control, then ``ShadowRunner`` at rate 1.0 with a SQLite sink), so drift
hits both alike. Latency is the caller's ``run()`` time. Every job gets a new seed, so nothing is served
from ComfyUI's cache; outputs are 1024x1024 PNGs, so the comparator does real decoding work.

    python -m bench.shadow_overhead [--jobs 200] [--block 20] [--concurrency 1] [--step-delay 0.02]
                                    [--noise-rate 0.05] [--noise-warmup 10]

The noise-floor pairs (control run twice) load the control itself: ``--noise-rate 0 --noise-warmup 0``
measures the shadow machinery alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpubridge.models import JobRequest, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.shadow.runner import ShadowRunner
from gpubridge.shadow.store import SQLiteSink, read_records

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "workflows" / "flux_schnell_t2i.json"


def start_double(node_delay: float, step_delay: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubridge.testing.comfy", "--port", "0",
         "--node-delay", str(node_delay), "--step-delay", str(step_delay)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"the ComfyUI double did not start (printed {url!r})")
    return proc, url


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


async def timed_runs(runner, base: Workflow, n: int, concurrency: int, rng: random.Random) -> list[float]:
    out: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        wf = base.with_values({"KSampler.seed": rng.randrange(2**31)})
        async with sem:
            t = time.perf_counter()
            await runner.run(JobRequest(workflow=wf, timeout=120))
            out.append(time.perf_counter() - t)

    await asyncio.gather(*(one() for _ in range(n)))
    return out


async def main(args: argparse.Namespace) -> dict:
    ctl_proc, ctl_url = start_double(args.node_delay, args.step_delay)
    cand_proc, cand_url = start_double(args.node_delay, args.step_delay)
    tmp = tempfile.TemporaryDirectory()
    try:
        base = Workflow.load(WORKFLOW)
        control = LocalRunner(ctl_url, name="control")
        candidate = LocalRunner(cand_url, name="candidate")
        db = Path(tmp.name) / "shadow.sqlite3"
        shadow = ShadowRunner(
            control, candidate, 1.0, sink=SQLiteSink(db), max_inflight=args.max_inflight,
            noise_rate=args.noise_rate, noise_warmup=args.noise_warmup, rng=random.Random(0),
        )
        rng = random.Random(1)
        await timed_runs(control, base, args.warmup, args.concurrency, rng)  # connections, object_info
        await timed_runs(candidate, base, args.warmup, args.concurrency, rng)
        plain: list[float] = []
        shadowed: list[float] = []
        while len(plain) < args.jobs:
            n = min(args.block, args.jobs - len(plain))
            plain += await timed_runs(control, base, n, args.concurrency, rng)
            shadowed += await timed_runs(shadow, base, n, args.concurrency, rng)
        await shadow.drain(60)
        metrics = shadow.metrics.as_dict()
        await shadow.aclose()  # closes control, candidate and the sink
        records = read_records(db)
    finally:
        for proc in (ctl_proc, cand_proc):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()

    def summary(xs: list[float]) -> dict:
        return {"n": len(xs), "p50_ms": pct(xs, 50) * 1e3, "p99_ms": pct(xs, 99) * 1e3,
                "mean_ms": statistics.fmean(xs) * 1e3}

    a, b = summary(plain), summary(shadowed)
    return {
        "jobs_per_arm": args.jobs,
        "concurrency": args.concurrency,
        "without_shadow": a,
        "with_shadow_100pct": b,
        "ratio_p50": b["p50_ms"] / a["p50_ms"],
        "ratio_p99": b["p99_ms"] / a["p99_ms"],
        "shadow_metrics": metrics,
        "records": {"candidate": sum(r.kind == "candidate" for r in records),
                    "noise": sum(r.kind == "noise" for r in records)},
    }


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200, help="jobs per arm")
    p.add_argument("--block", type=int, default=20, help="jobs per alternating block")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-inflight", type=int, default=16)
    p.add_argument("--noise-rate", type=float, default=0.05,
                   help="share of shadowed jobs run twice on the control")
    p.add_argument("--noise-warmup", type=int, default=10)
    p.add_argument("--node-delay", type=float, default=0.005, help="seconds per node in the doubles")
    p.add_argument("--step-delay", type=float, default=0.02, help="seconds per sampler step in the doubles")
    args = p.parse_args()
    result = asyncio.run(main(args))
    print(json.dumps(result, indent=2))
    a, b = result["without_shadow"], result["with_shadow_100pct"]
    print(f"without shadow: p50 {a['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms", file=sys.stderr)
    print(f"shadow at 100%: p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms", file=sys.stderr)
    print(f"ratio: p50 {result['ratio_p50']:.3f}, p99 {result['ratio_p99']:.3f}", file=sys.stderr)


if __name__ == "__main__":
    cli()
