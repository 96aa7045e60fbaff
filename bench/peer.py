"""Peer: gpubridge's RunPod provider against ``runpod.Endpoint(...).run_sync``, on the same endpoint double.

    python -m bench.peer [--quick] [--jobs N] [--node-delay S]

The endpoint double (running the real worker handler) and the ComfyUI double each run in a process of their
own. The workflow and the clients are those of ``bench.runpod_vs_sdk`` (its functions are reused):
workflows/model_free_invert.json, 3 nodes of ``--node-delay`` seconds each, one job at a time.
Blocks alternate between ``gpubridge`` (default: ``POST /run`` + adaptive polling), ``sdk.run_sync``
(``POST /runsync``) and ``gpubridge+sync`` (``sync_wait=90``: ``POST /runsync?wait=``); every block builds
its client afresh and runs one uncounted warm-up job first. ``python -m bench.runpod_vs_sdk`` adds the
SDK's polling mode and the error-preservation comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
from types import SimpleNamespace
from typing import Any

from bench._harness import Row, comfy_server, ms, quiet_logs, runpod_endpoint, table, verdict

TARGET = 1.05
SIZES = {"full": {"jobs": 60, "block": 10, "node_delay": 0.05}, "quick": {"jobs": 10, "block": 5, "node_delay": 0.05}}


def measure(rp: Any, jobs: int, block: int) -> dict[str, Any]:
    from bench.runpod_vs_sdk import bench_gpubridge, bench_sdk

    arms = {
        "gpubridge": lambda n: bench_gpubridge(rp, n, 1),
        "sdk.run_sync": lambda n: bench_sdk(rp, n, 1, "run_sync"),
        "gpubridge+sync": lambda n: bench_gpubridge(rp, n, 1, sync_wait=90),
    }
    found: dict[str, list[float]] = {name: [] for name in arms}
    order = list(arms)
    with contextlib.redirect_stdout(io.StringIO()):  # the SDK's job logger prints to stdout
        while min(len(v) for v in found.values()) < jobs:
            for name in order:
                latencies, _total = arms[name](min(block, jobs - len(found[name])))
                found[name] += latencies
            order.reverse()
    return {name: {"p50": statistics.median(v), "mean": statistics.fmean(v), "n": len(v)} for name, v in found.items()}


def run(quick: bool = False, jobs: int | None = None, node_delay: float | None = None) -> list[Row]:
    import runpod  # noqa: F401  (configures logging on import: quiet it afterwards)

    quiet_logs()
    size = SIZES["quick" if quick else "full"]
    delay = size["node_delay"] if node_delay is None else node_delay
    with comfy_server(cache=False, node_delay=delay) as comfy, runpod_endpoint(comfy.url) as info:
        rp = SimpleNamespace(endpoint_id=info["endpoint_id"], base_url=info["base_url"])
        found = measure(rp, jobs or size["jobs"], size["block"])
    sdk = found["sdk.run_sync"]
    job = f"3 nodes x {delay * 1000:g} ms, n={sdk['n']}"
    ours, sync = found["gpubridge"], found["gpubridge+sync"]
    return [
        Row("peer", f"RunPod provider sync_wait=90 vs runpod run_sync, p50 ({job})", ms(sdk["p50"], 1),
            ms(sync["p50"], 1), sync["p50"] / sdk["p50"], f"<= {TARGET:.2f}x", verdict(sync["p50"] / sdk["p50"] <= TARGET),
            found),
        Row("peer", f"RunPod provider default (polling) vs runpod run_sync, p50 ({job})", ms(sdk["p50"], 1),
            ms(ours["p50"], 1), ours["p50"] / sdk["p50"], "", "info"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per client")
    parser.add_argument("--node-delay", type=float, default=None, help="seconds per node (3 nodes)")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.jobs, args.node_delay)
    print(table(rows))
    return 0 if all(r.result != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
