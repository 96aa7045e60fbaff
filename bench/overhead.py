"""Per-job overhead: gpubridge's local provider against the stdlib floor and a raw client, on the same ComfyUI.

    python -m bench.overhead [--quick] [--comfy-url URL] [--jobs N]

The stdlib floor (``bench._harness.StdlibClient``: blocking ``http.client`` and a hand-spoken websocket) and
the raw httpx + websockets client (``bench._harness.RawClient``) do the least a client must: ``POST /prompt``,
wait on the websocket for ``executing`` with ``node: null``, ``GET /history``, ``GET /view``. gpubridge's local
provider does everything it always does (validation against the cached ``/object_info``, a per-job output
folder, events, the ``JobResult`` with artifacts and timings); a fourth arm runs it without the per-job
output folder (``output_prefix=None``), to show what that folder costs ComfyUI; a fifth is the peer
comfy-api-simplified (``queue_prompt_and_wait``, then ``/history`` and ``/view``, as its
``queue_and_wait_images`` does). Every other arm gets its own
per-job output folder too (``stdlib/<n>/``, ``raw/<n>/``, gpubridge's ``gpubridge/<job>/``): a directory per
job costs ComfyUI the same for each arm, and no arm's SaveImage scans a folder that grows with every job (a
real ComfyUI lists the folder it saves into). All run the same tiny workflow
(EmptyImage 64x64 -> SaveImage, a new colour each job so nothing is cached), one job at a time, in
alternating blocks after a warm-up; the server is a process of its own (the ComfyUI double by default, or
the ComfyUI at ``--comfy-url``), so this process's CPU time is the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from typing import Any

from bench._harness import (
    QUICK_NOTE,
    Arm,
    Counter,
    RawClient,
    Row,
    StdlibClient,
    alternate,
    comfy_or,
    ms,
    table,
    tiny_workflow,
    verdict,
)

TARGET = 1.05
CPU_TARGET = 1.10
PEER_TARGET = 0.60
"""The brief's: the local provider ahead of comfy-api-simplified by 0.6x or better, per job."""
SIZES = {"full": {"jobs": 400, "block": 25}, "quick": {"jobs": 100, "block": 20}}


async def measure(url: str, jobs: int, block: int) -> dict[str, Any]:
    from gpubridge.providers.local import LocalRunner

    nxt = Counter()
    raw = RawClient(url)
    await raw.start()
    std = StdlibClient(url)
    std.start()
    runner = LocalRunner(url)
    # The same provider without the per-job output folder (output_prefix=None): the folder costs ComfyUI a
    # directory per job (makedirs, and a scan of an empty folder), which no other arm asks for.
    flat = LocalRunner(url, output_prefix=None)

    async def run_std() -> None:
        # blocking, on purpose: the floor has no event loop at all
        images = std.run(tiny_workflow(nxt(), folder="stdlib"))
        assert len(images) == 1

    async def run_raw() -> None:
        images = await raw.run(tiny_workflow(nxt(), folder="raw"))
        assert len(images) == 1

    async def run_ours() -> None:
        result = await runner.run(tiny_workflow(nxt()))
        assert len(result.images) == 1

    async def run_flat() -> None:
        result = await flat.run(tiny_workflow(nxt()))
        assert len(result.images) == 1

    from comfy_api_simplified import ComfyApiWrapper

    peer = ComfyApiWrapper(url)

    async def run_peer() -> None:
        # comfy-api-simplified's own path (queue_and_wait_images without its asyncio.run): POST /prompt with
        # requests, a websocket per job until `executing` with node null, then /history and /view.
        wf = tiny_workflow(nxt(), folder="simplified")
        wf["2"]["_meta"] = {"title": "Save"}
        prompt_id, _ = await peer.queue_prompt_and_wait(wf)
        history = peer.get_history(prompt_id)
        images = [peer.get_image(i["filename"], i["subfolder"], i["type"])
                  for i in history[prompt_id]["outputs"]["2"]["images"]]
        assert len(images) == 1

    arms = [Arm("stdlib", run_std), Arm("raw", run_raw), Arm("gpubridge", run_ours), Arm("flat", run_flat),
            Arm("simplified", run_peer)]
    try:
        await alternate(arms, jobs, block)
    finally:
        std.close()
        await raw.close()
        await runner.aclose()
        await flat.aclose()
    return {a.name: {"p50": statistics.median(a.latencies), "mean": statistics.fmean(a.latencies),
                     "cpu": statistics.fmean(a.cpu), "n": len(a.latencies)} for a in arms}


def run(quick: bool = False, comfy_url: str | None = None, jobs: int | None = None) -> list[Row]:
    size = SIZES["quick" if quick else "full"]
    with comfy_or(comfy_url) as server:
        found = asyncio.run(measure(server.url, jobs or size["jobs"], size["block"]))
    std, raw, ours, flat, peer = (found[k] for k in ("stdlib", "raw", "gpubridge", "flat", "simplified"))
    where = "real ComfyUI" if comfy_url else "ComfyUI double"
    ratio = ours["p50"] / std["p50"]
    cpu_ratio = ours["cpu"] / std["cpu"]
    return [
        Row("overhead", f"local provider vs the stdlib floor, p50 per job ({where}, n={std['n']})",
            ms(std["p50"]), ms(ours["p50"]), ratio, f"<= {TARGET:.2f}x", verdict(ratio <= TARGET), found),
        # CPU per job in --quick (100 jobs an arm) moved 1.05x -> 1.12x between runs on a quiet machine where
        # the full run (400) read 1.05x twice: --quick reports it, the full run gates it.
        Row("overhead", f"client CPU per job, local vs the stdlib floor ({where})", ms(std["cpu"]),
            ms(ours["cpu"]), cpu_ratio, f"<= {CPU_TARGET:.2f}x" + (QUICK_NOTE if quick else ""),
            "info" if quick else verdict(cpu_ratio <= CPU_TARGET)),
        Row("overhead", f"local provider without its per-job output folder vs the stdlib floor, p50 ({where})",
            ms(std["p50"]), ms(flat["p50"]), flat["p50"] / std["p50"], "", "info"),
        Row("overhead", f"client CPU per job, local without the per-job folder vs the stdlib floor ({where})",
            ms(std["cpu"]), ms(flat["cpu"]), flat["cpu"] / std["cpu"], "", "info"),
        Row("overhead", f"local provider vs a raw httpx + websockets client, p50 per job ({where})",
            ms(raw["p50"]), ms(ours["p50"]), ours["p50"] / raw["p50"], "", "info"),
        Row("overhead", f"client CPU per job, raw httpx client vs the stdlib floor ({where})", ms(std["cpu"]),
            ms(raw["cpu"]), raw["cpu"] / std["cpu"], "", "info"),
        Row("overhead", f"local provider vs comfy-api-simplified, p50 per job ({where})", ms(peer["p50"]),
            ms(ours["p50"]), ours["p50"] / peer["p50"], f"<= {PEER_TARGET:.2f}x",
            verdict(ours["p50"] / peer["p50"] <= PEER_TARGET)),
        Row("overhead", f"client CPU per job, comfy-api-simplified vs the stdlib floor ({where})", ms(std["cpu"]),
            ms(peer["cpu"]), peer["cpu"] / std["cpu"], "", "info"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--comfy-url", default=None, help="a running ComfyUI (default: start the double)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per arm")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.comfy_url, args.jobs)
    print(table(rows))
    return 0 if all(r.result != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
