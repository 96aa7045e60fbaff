"""The ``comfy`` provider against Comfy Org's own client, ``comfy-sdk``, on the same comfy-api-proxy
(issue 15): p50 per job, submit to output bytes in hand, alternating one job of each.

    python -m bench.comfy_api [--quick] [--jobs N]

The ComfyUI double (a short job: three nodes of 50 ms) and the real comfy-api-proxy each run in a process of
their own. comfy-sdk's ``run`` polls the job with a backoff that starts at 0.5 s; the provider follows the
job's SSE events and confirms the end on the job resource. Bound: the provider at 0.5x comfy-sdk or better.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench._harness import Row, _wait_http, comfy_server, free_port, stop, summary, table, tiny_workflow, verdict

BOUND = 0.5


@contextlib.contextmanager
def proxy(comfy_url: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comfy_api_proxy.cli", "run", "--comfyui", comfy_url, "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/api/v2/health", proc, "comfy-api-proxy")
        yield url
    finally:
        stop(proc)


async def _arms(url: str, jobs: int) -> tuple[list[float], list[float]]:
    from comfy_sdk import AsyncComfy

    from gpubridge.providers.comfy_api import ComfyApiRunner

    os.environ["COMFY_BASE_URL"] = url
    sdk = AsyncComfy()
    ours = ComfyApiRunner(url)
    mine: list[float] = []
    theirs: list[float] = []
    try:
        for i in range(jobs + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            result = await ours.run(tiny_workflow(10_000 + i), timeout=60)
            assert result.artifacts[0].data
            t1 = time.perf_counter()
            job = await sdk.run(sdk.workflows.from_json(tiny_workflow(20_000 + i)))
            assert await job.outputs[0].to_bytes()
            t2 = time.perf_counter()
            if i >= 2:
                mine.append(t1 - t0)
                theirs.append(t2 - t1)
    finally:
        await ours.aclose()
        await sdk.aclose()
    return mine, theirs


def run(quick: bool = False, jobs: int | None = None) -> list[Row]:
    jobs = jobs or (10 if quick else 30)
    with comfy_server(cache=False, node_delay=0.05) as comfy, proxy(comfy.url) as url:
        mine, theirs = asyncio.run(_arms(url, jobs))
    a, b = summary(mine), summary(theirs)
    ratio = a["p50_ms"] / b["p50_ms"]
    return [Row("comfy_api", f"provider `comfy` vs comfy-sdk on comfy-api-proxy, p50 per job (short job, n={jobs})",
                f"{b['p50_ms']:.1f} ms", f"{a['p50_ms']:.1f} ms", round(ratio, 3), f"<= {BOUND}x",
                verdict(ratio <= BOUND), {"comfy_sdk": b, "gpubridge": a})]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.comfy_api", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    rows = run(args.quick, args.jobs)
    print(table(rows))
    sys.exit(0 if all(r.result != "FAIL" for r in rows) else 1)


if __name__ == "__main__":
    main()
