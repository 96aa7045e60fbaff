"""The gateway's cost: ``gpubridge serve`` against calling the same runner in-process, on one ComfyUI.

    python -m bench.gateway [--quick] [--comfy-url URL] [--jobs N] [--concurrent N]

- ``in-process``: ``LocalRunner.run()`` in this process (the baseline: what a Python caller pays);
- ``gateway``: ``POST /v1/run`` to ``gpubridge serve`` (a process of its own: the local provider over the same
  ComfyUI, job records in SQLite) with a plain keep-alive HTTP client (aiohttp, as lean as a TypeScript fetch). The difference is the gateway's
  per-job overhead: two HTTP hops, the job record writes, the result as base64 JSON. Target: +2 ms p50.
- ``concurrent``: N jobs at once through one gateway process (``POST /v1/run`` each): the gateway
  process's CPU time per job, and its wall time.

Same tiny workflow as ``bench.overhead``, one job at a time, alternating blocks after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench._harness import (
    QUICK_NOTE,
    ROOT,
    Arm,
    Counter,
    Row,
    Server,
    _wait_http,
    alternate,
    comfy_or,
    free_port,
    ms,
    quiet_logs,
    stop,
    table,
    tiny_workflow,
    verdict,
)

SIZES = {"full": {"jobs": 200, "block": 20, "concurrent": 500}, "quick": {"jobs": 40, "block": 10, "concurrent": 100}}
TOKEN = "bench-gateway-token"
BOUND_MS = 2.0


@contextlib.contextmanager
def gateway(comfy_url: str) -> Iterator[Server]:
    """``gpubridge serve`` over the local provider at ``comfy_url``, as a process; yields its :class:`Server`."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gpubridge-bench-gw-") as data:
        env = {**os.environ, "GPUBRIDGE_PROVIDER": "local", "GPUBRIDGE_COMFY_URL": comfy_url,
               "GPUBRIDGE_FALLBACKS": "", "GPUBRIDGE_API_TOKEN": TOKEN}
        cmd = [sys.executable, "-m", "gpubridge.cli", "serve", "--port", str(port), "--data-dir", data,
               "--drain", "0"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_http(f"{url}/openapi.json", proc, "the gateway")
            yield Server(url, proc)
        finally:
            stop(proc)


async def measure(comfy_url: str, gw: Server, jobs: int, block: int, concurrent: int) -> dict[str, Any]:
    import aiohttp

    from gpubridge.providers.local import LocalRunner

    nxt = Counter()
    local = LocalRunner(comfy_url)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    client = aiohttp.ClientSession(gw.url, headers=headers, timeout=aiohttp.ClientTimeout(total=120),
                                   connector=aiohttp.TCPConnector(limit=concurrent))

    async def in_process() -> None:
        result = await local.run(tiny_workflow(nxt()), timeout=60)
        assert len(result.images) == 1, result

    async def through_gateway() -> None:
        async with client.post("/v1/run", json={"workflow": tiny_workflow(nxt()), "timeout": 60}) as r:
            body = await r.json()
        assert r.status == 200 and body["status"]["state"] == "succeeded", body
        assert len(body["result"]["artifacts"]) == 1

    arms = [Arm("in-process", in_process), Arm("gateway", through_gateway)]
    try:
        await alternate(arms, jobs, block)
        cpu0, t0 = gw.cpu_s(), time.perf_counter()
        await asyncio.gather(*(through_gateway() for _ in range(concurrent)))
        wall, cpu = time.perf_counter() - t0, gw.cpu_s() - cpu0
    finally:
        await client.close()
        await local.aclose()
    out = {a.name: {"p50": statistics.median(a.latencies), "mean": statistics.fmean(a.latencies),
                    "n": len(a.latencies)} for a in arms}
    out["concurrent"] = {"n": concurrent, "wall_s": wall, "gateway_cpu_s": cpu, "cpu_per_job_s": cpu / concurrent}
    return out


def run(quick: bool = False, comfy_url: str | None = None, jobs: int | None = None,
        concurrent: int | None = None) -> list[Row]:
    quiet_logs()
    size = SIZES["quick" if quick else "full"]
    with comfy_or(comfy_url) as server, gateway(server.url) as gw:
        found = asyncio.run(measure(server.url, gw, jobs or size["jobs"], size["block"],
                                    concurrent or size["concurrent"]))
    base, arm, conc = found["in-process"], found["gateway"], found["concurrent"]
    extra = (arm["p50"] - base["p50"]) * 1000
    where = "real ComfyUI" if comfy_url else "ComfyUI double"
    return [
        Row("gateway", f"gpubridge serve POST /v1/run vs the runner in-process, p50 ({where}, n={arm['n']}; "
            f"+{extra:.2f} ms)", ms(base["p50"]), ms(arm["p50"]), arm["p50"] / base["p50"],
            f"<= +{BOUND_MS:g} ms" + (QUICK_NOTE if quick else ""), verdict(extra <= BOUND_MS, gate=not quick),
            found),
        Row("gateway", f"{conc['n']} concurrent jobs through one gateway: its CPU per job "
            f"(wall {conc['wall_s']:.1f} s)", "", ms(conc["cpu_per_job_s"]), None, "", "info", conc),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--comfy-url")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--concurrent", type=int)
    args = parser.parse_args(argv)
    rows = run(args.quick, args.comfy_url, args.jobs, args.concurrent)
    print(table(rows))
    return 0 if all(r.result != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
