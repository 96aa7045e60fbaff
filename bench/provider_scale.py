"""Scale through the remote providers: N concurrent jobs in one process through one Modal provider (the job
API under uvicorn, in front of the ComfyUI double) and through one RunPod provider (the endpoint double
running the real worker handler, in front of the ComfyUI double). Every server is a process of its own, so
this process's CPU time is the client's.

    python -m bench.provider_scale [--quick] [--jobs 1000]

Per provider: throughput (jobs/s over the whole batch), this process's CPU ms per job, and its peak RSS
growth. Informational rows: the servers (one ComfyUI double running one prompt at a time) bound throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from bench._harness import (
    RUNPOD_API_KEY,
    Counter,
    Row,
    comfy_server,
    modal_api,
    quiet_logs,
    reset_peak_rss,
    runpod_endpoint,
    table,
    tiny_workflow,
    vm_mb,
)


async def _batch(runner: Any, jobs: int) -> dict[str, float]:
    nxt = Counter(start=int(time.time() * 1000) % 1_000_000)
    for _ in range(3):  # warm-up: connections, caches
        await runner.run(tiny_workflow(nxt()), timeout=600)
    reset_peak_rss()
    before = vm_mb().get("VmRSS", 0.0)
    c0, t0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(runner.run(tiny_workflow(nxt()), timeout=600) for _ in range(jobs)),
                                   return_exceptions=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    failed = [r for r in results if isinstance(r, BaseException)]
    return {"jobs": jobs, "failed": len(failed), "wall_s": wall, "jobs_per_s": jobs / wall,
            "cpu_ms_per_job": cpu / jobs * 1000, "peak_rss_growth_mb": vm_mb().get("VmHWM", 0.0) - before,
            "first_error": repr(failed[0])[:200] if failed else None}


async def _modal(url: str, jobs: int) -> dict[str, float]:
    from gpubridge.providers.modal import ModalRunner

    runner = ModalRunner(url, token="unused")
    try:
        return await _batch(runner, jobs)
    finally:
        await runner.aclose()


async def _runpod(rp: dict[str, Any], jobs: int) -> dict[str, float]:
    from gpubridge.providers.runpod import RunPodRunner

    runner = RunPodRunner(rp["endpoint_id"], api_key=RUNPOD_API_KEY, base_url=rp["base_url"])
    try:
        return await _batch(runner, jobs)
    finally:
        await runner.aclose()


def run(quick: bool = False, jobs: int | None = None) -> list[Row]:
    quiet_logs()
    jobs = jobs or (200 if quick else 1000)
    rows = []
    with comfy_server(cache=False) as comfy, modal_api(comfy.url) as modal_url:
        found = asyncio.run(_modal(modal_url, jobs))
    rows.append(_row("Modal", found))
    with comfy_server(cache=False) as comfy, runpod_endpoint(comfy.url, workers=4) as rp:
        found = asyncio.run(_runpod(rp, jobs))
    rows.append(_row("RunPod", found))
    return rows


def _row(name: str, found: dict[str, Any]) -> Row:
    return Row("provider_scale", f"{found['jobs']} concurrent jobs through one {name} provider: client CPU per job "
               f"({found['jobs_per_s']:.0f} jobs/s, {found['failed']} failed, peak RSS +{found['peak_rss_growth_mb']:.0f} MB)",
               "", f"{found['cpu_ms_per_job']:.2f} ms", None, "", "info" if not found["failed"] else "FAIL", found)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.provider_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    rows = run(args.quick, args.jobs)
    print(table(rows))
    sys.exit(0 if all(r.result != "FAIL" for r in rows) else 1)


if __name__ == "__main__":
    main()
