"""Per-job overhead on every path: the Modal and RunPod providers, each against the raw client on the same ComfyUI.

    python -m bench.paths [--quick] [--comfy-url URL] [--jobs N]

One ComfyUI (the double, or ``--comfy-url``) serves all of it, each server in a process of its own:

- ``raw``: the minimal raw client straight to ComfyUI (the baseline);
- ``modal``: ``ModalRunner`` -> the Modal job API (``python -m modal_app.serve``, the in-process backend,
  under uvicorn) -> ComfyUI. One extra HTTP hop, the result (with the image, base64) in a long-poll answer;
- ``runpod``: ``RunPodRunner`` with default settings -> the RunPod endpoint double running the real worker
  handler (contrib/runpod_worker) -> ComfyUI. ``POST /run``, then adaptive ``GET /status`` polling (first
  poll after 50 ms, x1.3 per poll): a job shorter than the first interval still costs one interval;
- ``runpod+sync``: the same with ``sync_wait=90``: ``POST /runsync?wait=90000`` answers when the job ends.

Same tiny workflow as ``bench.overhead``, one job at a time, alternating blocks after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from typing import Any

from bench._harness import (
    Arm,
    Counter,
    RawClient,
    Row,
    alternate,
    comfy_or,
    modal_api,
    ms,
    quiet_logs,
    runpod_endpoint,
    table,
    tiny_workflow,
)

SIZES = {"full": {"jobs": 150, "block": 15}, "quick": {"jobs": 30, "block": 10}}


async def measure(comfy_url: str, modal_url: str, rp: dict[str, Any], jobs: int, block: int) -> dict[str, Any]:
    from gpubridge.providers.modal import ModalRunner
    from gpubridge.providers.runpod import RunPodRunner

    nxt = Counter()
    raw = RawClient(comfy_url)
    await raw.start()
    modal = ModalRunner(modal_url, name="modal")
    runpod = RunPodRunner(rp["endpoint_id"], api_key=rp["api_key"], base_url=rp["base_url"], name="runpod")
    runpod_sync = RunPodRunner(rp["endpoint_id"], api_key=rp["api_key"], base_url=rp["base_url"],
                               name="runpod-sync", sync_wait=90)

    async def run_raw() -> None:
        assert len(await raw.run(tiny_workflow(nxt()))) == 1

    def through(runner: Any) -> Any:
        async def one() -> None:
            result = await runner.run(tiny_workflow(nxt()), timeout=60)
            assert len(result.images) == 1, result
        return one

    arms = [Arm("raw", run_raw), Arm("modal", through(modal)), Arm("runpod", through(runpod)),
            Arm("runpod+sync", through(runpod_sync))]
    try:
        await alternate(arms, jobs, block)
    finally:
        await raw.close()
        for r in (modal, runpod, runpod_sync):
            await r.aclose()
    return {a.name: {"p50": statistics.median(a.latencies), "mean": statistics.fmean(a.latencies),
                     "cpu": statistics.fmean(a.cpu), "n": len(a.latencies)} for a in arms}


def run(quick: bool = False, comfy_url: str | None = None, jobs: int | None = None) -> list[Row]:
    quiet_logs()
    size = SIZES["quick" if quick else "full"]
    with comfy_or(comfy_url) as server, modal_api(server.url) as modal_url, runpod_endpoint(server.url) as rp:
        found = asyncio.run(measure(server.url, modal_url, rp, jobs or size["jobs"], size["block"]))
    raw = found["raw"]
    where = "real ComfyUI" if comfy_url else "ComfyUI double"
    notes = {
        "modal": "Modal provider (job API under uvicorn) vs raw client",
        "runpod": "RunPod provider, default (POST /run + polling) vs raw",
        "runpod+sync": "RunPod provider, sync_wait=90 (POST /runsync) vs raw",
    }
    rows = []
    for name, what in notes.items():
        arm = found[name]
        rows.append(Row("paths", f"{what}, p50 ({where}, n={arm['n']}; +{(arm['p50'] - raw['p50']) * 1000:.1f} ms)",
                        ms(raw["p50"]), ms(arm["p50"]), arm["p50"] / raw["p50"], "", "info",
                        {"raw": raw, name: arm}))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paths", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--comfy-url", default=None, help="a running ComfyUI (default: start the double)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per arm")
    args = parser.parse_args(argv)
    print(table(run(args.quick, args.comfy_url, args.jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
