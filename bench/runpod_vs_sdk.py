"""gpubridge's RunPod provider vs the runpod SDK, side by side against the same doubles.

    python -m bench.runpod_vs_sdk [--jobs 50] [--node-delay 0.05] [--concurrency 1]

One process: the ComfyUI double and the RunPod endpoint double (running the real worker handler from
contrib/runpod_worker) each serve from a background thread on 127.0.0.1. The same short workflow
(workflows/model_free_invert.json, 3 nodes, ``--node-delay`` seconds per node) runs ``--jobs``
times through:

- ``gpubridge``: ``RunPodRunner.run`` with default settings (POST /run, then adaptive GET /status polling);
- ``gpubridge+sync``: the same with ``sync_wait=90`` (POST /runsync?wait=90000, polling only after that);
- ``sdk.run_sync``: ``runpod.Endpoint(...).run_sync`` (POST /runsync, which waits server-side);
- ``sdk.run+output``: ``runpod.Endpoint(...).run(...).output(timeout)`` (POST /run, then 1 s polling).

It reports per-job latency p50/p95, total wall time and requests sent, then error preservation: one job
whose node fails, through each client. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("RUNPOD_LOG_LEVEL", "ERROR")  # the SDK prints every job's output at DEBUG

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = json.loads((ROOT / "workflows" / "model_free_invert.json").read_text())
API_KEY = "bench-key"


def load_handler() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpubridge_runpod_worker", ROOT / "contrib" / "runpod_worker" /
                                                  "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarise(name: str, latencies: list[float], total: float, requests: dict[str, int]) -> dict[str, Any]:
    return {
        "client": name,
        "jobs": len(latencies),
        "p50_ms": round(pct(latencies, 0.50) * 1000, 1),
        "p95_ms": round(pct(latencies, 0.95) * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1),
        "total_s": round(total, 3),
        "requests": requests,
    }


def counted(rp: Any, fn: Callable[[], tuple[list[float], float]]) -> tuple[list[float], float, dict[str, int]]:
    before = dict(rp.counters)
    lat, total = fn()
    after = dict(rp.counters)
    routes = ("run", "runsync", "status")
    return lat, total, {r: after.get(r, 0) - before.get(r, 0) for r in routes}


def bench_gpubridge(rp: Any, jobs: int, concurrency: int, **options: Any) -> tuple[list[float], float]:
    from gpubridge.models import JobRequest
    from gpubridge.providers.runpod import RunPodRunner

    async def main() -> tuple[list[float], float]:
        runner = RunPodRunner(rp.endpoint_id, api_key=API_KEY, base_url=rp.base_url, **options)
        sem = asyncio.Semaphore(concurrency)
        latencies: list[float] = []

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                result = await runner.run(JobRequest(workflow=WORKFLOW, timeout=120))
                latencies.append(time.perf_counter() - t0)
                assert len(result.images) == 2

        try:
            await one()  # warm-up (connections), not counted
            latencies.clear()
            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(jobs)))
            return latencies, time.perf_counter() - t0
        finally:
            await runner.aclose()

    return asyncio.run(main())


def bench_sdk(rp: Any, jobs: int, concurrency: int, mode: str) -> tuple[list[float], float]:
    import runpod

    runpod.endpoint_url_base = rp.base_url
    endpoint = runpod.Endpoint(rp.endpoint_id, api_key=API_KEY)

    def one() -> float:
        t0 = time.perf_counter()
        if mode == "run_sync":
            out = endpoint.run_sync({"input": {"workflow": WORKFLOW}}, timeout=120)
        else:
            out = endpoint.run({"input": {"workflow": WORKFLOW}}).output(timeout=120)
        assert out is not None and len(out["images"]) == 2, out
        return time.perf_counter() - t0

    one()  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda _: one(), range(jobs)))
    return latencies, time.perf_counter() - t0


def error_preservation(rp: Any, comfy: Any) -> dict[str, Any]:
    import runpod

    from gpubridge.errors import JobFailed
    from gpubridge.models import JobRequest
    from gpubridge.providers.runpod import RunPodRunner
    from gpubridge.testing import ErrorFault

    comfy.faults.error = ErrorFault(class_type="ImageInvert", exception_type="RuntimeError",
                                    exception_message="injected failure")
    try:
        runpod.endpoint_url_base = rp.base_url
        endpoint = runpod.Endpoint(rp.endpoint_id, api_key=API_KEY)
        sdk_out = endpoint.run_sync({"input": {"workflow": WORKFLOW}}, timeout=60)
        sdk_job = endpoint.run({"input": {"workflow": WORKFLOW}})
        sdk_polled = sdk_job.output(timeout=60)

        async def ours() -> dict[str, Any]:
            runner = RunPodRunner(rp.endpoint_id, api_key=API_KEY, base_url=rp.base_url)
            try:
                await runner.run(JobRequest(workflow=WORKFLOW))
            except JobFailed as exc:
                return {"raised": type(exc).__name__, "node_id": exc.node_id, "node_type": exc.node_type,
                        "exception_type": exc.exception_type, "message": exc.exception_message,
                        "traceback_lines": len(exc.traceback), "retryable": exc.retryable}
            finally:
                await runner.aclose()
            return {"raised": None}

        node = {
            "sdk.run_sync returns": _short(sdk_out),
            "sdk.run().output() returns": _short(sdk_polled),
            "sdk.run().status()": sdk_job.status(),
            "gpubridge raises": asyncio.run(ours()),
        }
        comfy.faults.error = None
        rp.crash_next = 1  # the worker dies: FAILED with the SDK's JSON error string and no output
        crash_sdk = endpoint.run_sync({"input": {"workflow": WORKFLOW}}, timeout=60)
        rp.crash_next = 1
        crash_ours = asyncio.run(ours())
        return {"node error": node,
                "worker crash": {"sdk.run_sync returns": crash_sdk, "gpubridge raises": crash_ours}}
    finally:
        comfy.faults.error = None


def _short(value: Any) -> Any:
    text = json.dumps(value, default=str)
    return value if len(text) < 300 else text[:297] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runpod_vs_sdk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--node-delay", type=float, default=0.05, help="seconds per ComfyUI node (3 nodes)")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs in flight (and endpoint workers)")
    parser.add_argument("--cold-start", type=float, default=0.0, help="endpoint double worker boot time (s)")
    parser.add_argument("--skip-polling-sdk", action="store_true", help="skip sdk.run+output (1 s polling)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    from gpubridge.testing import ComfyDouble
    from gpubridge.testing.runpod import RunPodEndpointDouble

    handler = load_handler()
    results = []
    with tempfile.TemporaryDirectory() as tmp, ComfyDouble(root=tmp, cache=False).run_in_thread() as comfy:
        comfy.faults.node_delay = args.node_delay
        handler.configure(comfy_url=comfy.url)
        with RunPodEndpointDouble(handler.handler, api_key=API_KEY, workers=args.concurrency,
                                  cold_start_s=args.cold_start) as rp:
            quiet = contextlib.redirect_stdout(io.StringIO())  # the SDK's job logger prints to stdout
            with quiet:
                runs = [("gpubridge", lambda: bench_gpubridge(rp, args.jobs, args.concurrency)),
                        ("sdk.run_sync", lambda: bench_sdk(rp, args.jobs, args.concurrency, "run_sync")),
                        ("gpubridge+sync", lambda: bench_gpubridge(rp, args.jobs, args.concurrency, sync_wait=90))]
                if not args.skip_polling_sdk:
                    runs.append(("sdk.run+output", lambda: bench_sdk(rp, args.jobs, args.concurrency, "output")))
                for name, fn in runs:
                    lat, total, reqs = counted(rp, fn)
                    results.append(summarise(name, lat, total, reqs))
                errors = error_preservation(rp, comfy)
            rp.call(handler.aclose())

    base = next(r for r in results if r["client"] == "sdk.run_sync")
    for r in results:
        r["p50_vs_run_sync"] = round(r["p50_ms"] / base["p50_ms"], 2) if base["p50_ms"] else None
        r["total_vs_run_sync"] = round(r["total_s"] / base["total_s"], 2) if base["total_s"] else None
    if args.json:
        print(json.dumps({"args": vars(args), "results": results, "errors": errors}, indent=2, default=str))
        return 0
    print(f"{args.jobs} jobs of model_free_invert (3 nodes x {args.node_delay:g} s), concurrency "
          f"{args.concurrency}, endpoint double + ComfyUI double on loopback\n")
    print(f"{'client':<16}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}{'total s':>9}{'p50/rs':>8}{'tot/rs':>8}  requests")
    for r in results:
        print(f"{r['client']:<16}{r['p50_ms']:>9}{r['p95_ms']:>9}{r['mean_ms']:>9}{r['total_s']:>9}"
              f"{r['p50_vs_run_sync']:>8}{r['total_vs_run_sync']:>8}  {r['requests']}")
    for case, found in errors.items():
        print(f"\nerror preservation ({case}):")
        for key, value in found.items():
            print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
