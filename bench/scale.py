"""Scale: 1,000 concurrent jobs in one process through one ``LocalRunner`` (one ComfyClient).

    python -m bench.scale [--quick] [--jobs 1000] [--rounds 3] [--levels 1,10,100,1000] [--no-profile]

Against the ComfyUI double in a process of its own (which, like ComfyUI, runs one prompt at a time):

- rounds: after one uncounted round of the same size (the allocator's warm-up), ``--rounds`` times ``--jobs``
  jobs, all submitted at once. Per round: throughput, this process's
  CPU ms per job, the double's CPU ms per job, peak RSS (VmHWM, reset before each round) and RSS after it,
  and what the runner still holds (job records, background tasks, live asyncio tasks, gc-tracked objects).
  No growth between rounds means no leak;
- sweep: the same number of jobs at each concurrency in ``--levels``, to find where throughput stops
  growing, with both processes' CPU use (a process at ~100 % of one core is the limit);
- profile: cProfile of this process over one round at the top level, its own time grouped by layer, to
  say which part of the limit is ours;
- before/after (full mode): rounds at the top level alternating between ComfyClient as it was before issue
  16's fixes (httpx's pool of 64 connections, no request gate: every request queued inside httpx's pool; the
  client is handed an httpx client, so the lean HTTP transport is not used) and as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import httpx

from bench._harness import (
    Counter,
    Row,
    Server,
    comfy_server,
    reset_peak_rss,
    table,
    tiny_workflow,
    verdict,
    vm_mb,
)

SIZES = {
    "full": {"jobs": 1000, "rounds": 3, "levels": [1, 10, 100, 1000], "before_after": 2},
    "quick": {"jobs": 200, "rounds": 3, "levels": [1, 10, 200], "before_after": 0},
}
RSS_SLACK_MB = 2.0
"""RSS may move this much between rounds (allocator noise) before it counts as growth."""

_HTTP = "httpx/httpcore"
_IMPORT = "failed import sniffio"
_LOOP = "asyncio loop"
_LAYERS = (
    # httpcore tries "import sniffio" for every lock it sets up; when it is absent each try scans sys.path.
    ("importlib", _IMPORT),
    ("httpcore", _HTTP),
    ("httpx", _HTTP),
    ("h11", _HTTP),
    ("anyio", _HTTP),
    ("websockets", "websockets"),
    ("/json/", "JSON"),
    ("pydantic", "pydantic"),
    ("gpubridge", "gpubridge"),
    ("asyncio", _LOOP),
    ("selectors", _LOOP),
)


def _layer(func: tuple[str, int, str]) -> str:
    filename, _, name = func
    if name == "<built-in method posix.stat>" or "_distutils_hack" in filename:
        return _IMPORT  # the import system scanning sys.path
    if filename == "~":
        if "socket" in name or "send" in name or "recv" in name:
            return "socket calls"
        if "poll" in name or "select" in name:
            return _LOOP
        if "json" in name or "decode" in name or "encode" in name:
            return "JSON"
        return "other builtins"
    for needle, layer in _LAYERS:
        if needle in filename:
            return layer
    return "other"


def layers(profile: cProfile.Profile) -> dict[str, float]:
    """Share of this process's profiled time per layer (own time, not cumulative). The own time of builtins
    and of stdlib helpers (str methods, isinstance, contextlib, enum...) goes to the layer that called them."""
    stats = pstats.Stats(profile)
    totals: dict[str, float] = defaultdict(float)
    for func, (_cc, _nc, tottime, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        layer = _layer(func)
        if layer in ("other builtins", "other") and callers:
            edges = {caller: edge[2] for caller, edge in callers.items()}
            whole = sum(edges.values())
            if whole > 0:
                for caller, tt in edges.items():
                    totals[_layer(caller)] += tottime * tt / whole
                continue
        totals[layer] += tottime
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


async def _burst(runner: Any, nxt: Counter, jobs: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            result = await runner.run(tiny_workflow(nxt()), timeout=600)
            assert len(result.images) == 1

    await asyncio.gather(*(one() for _ in range(jobs)))


async def _timed(runner: Any, server: Server, nxt: Counter, jobs: int, concurrency: int,
                 profile: cProfile.Profile | None = None) -> dict[str, Any]:
    gc.collect()
    reset_peak_rss()
    c0, s0, t0 = time.process_time(), server.cpu_s(), time.perf_counter()
    if profile is not None:
        profile.enable()
    await _burst(runner, nxt, jobs, concurrency)
    if profile is not None:
        profile.disable()
    wall = time.perf_counter() - t0
    cpu, scpu = time.process_time() - c0, server.cpu_s() - s0
    peak = vm_mb().get("VmHWM", float("nan"))
    gc.collect()
    client = runner.client
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "jobs_per_s": round(jobs / wall, 1),
        "client_cpu_ms_per_job": round(cpu / jobs * 1000, 3),
        "server_cpu_ms_per_job": round(scpu / jobs * 1000, 3),
        "client_cpu_util": round(cpu / wall, 2),
        "server_cpu_util": round(scpu / wall, 2),
        "peak_rss_mb": round(peak, 1),
        "rss_after_mb": round(vm_mb().get("VmRSS", float("nan")), 1),
        "retained_jobs": len(client._jobs),
        "background_tasks": len(client._background),
        "asyncio_tasks": len(asyncio.all_tasks()) - 1,
        "gc_objects": len(gc.get_objects()),
    }


async def measure(server: Server, jobs: int, rounds: int, levels: list[int], profile: bool,
                  before_after: int = 0) -> dict[str, Any]:
    from gpubridge.providers.local import LocalRunner

    nxt = Counter()
    # The client keeps the final status of up to max_retained forgotten jobs (10,000 by default: about three
    # gc objects each). Sized to one round, that record is full after round 1, so what grows after it grows
    # without bound (with the default, 200-job rounds kept adding ~590 objects a round: issue 25, item 7).
    runner = LocalRunner(server.url, max_retained=jobs)
    out: dict[str, Any] = {}
    top = max(levels)
    try:
        await _burst(runner, nxt, 20, 20)  # warm-up: websocket, pool, /object_info, imports
        out["tasks_at_rest"] = len(asyncio.all_tasks()) - 1  # the websocket reader and its keepalive
        gc.collect()
        out["rss_at_rest_mb"] = round(vm_mb().get("VmRSS", float("nan")), 1)
        # One uncounted round at full size first: the allocator grows its arenas to the peak of `jobs` jobs in
        # flight during the first such round and settles in the second (measured: 68.8 -> 70.0 MiB, then flat
        # within +-0.6 MiB over 8 more rounds of 1,000), so a leak is looked for from there on.
        out["warmup_round"] = await _timed(runner, server, nxt, jobs, jobs)
        out["rounds"] = [await _timed(runner, server, nxt, jobs, jobs) for _ in range(rounds)]
        out["sweep"] = [await _timed(runner, server, nxt, jobs, c) for c in levels]
        if profile:
            prof = cProfile.Profile()
            out["profile"] = await _timed(runner, server, nxt, jobs, top, prof)
            out["profile"]["layers"] = layers(prof)
            out["profile"]["top"] = _top(prof)
    finally:
        await runner.aclose()
    if before_after:
        out["before_after"] = {"before": [], "after": []}
        for i in range(2 * before_after):
            which = ("before", "after")[(i + i // 2) % 2]  # before, after, after, before, ...
            # Before the fix: every request through httpx's own pool of 64 connections, queued inside it (no
            # gate). A client brought by the caller is used as it is: no gate, no lean transport.
            http = (httpx.AsyncClient(base_url=server.url, trust_env=False,
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
                    if which == "before" else None)
            other = LocalRunner(server.url, http=http)
            try:
                await _burst(other, nxt, 100, 100)  # steady state: the pool filled as traffic would fill it
                out["before_after"][which].append(await _timed(other, server, nxt, jobs, top))
            finally:
                await other.aclose()
                if http is not None:
                    await http.aclose()
    return out


def _top(profile: cProfile.Profile, n: int = 8) -> list[str]:
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]  # type: ignore[attr-defined]
    whole = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    return [f"{v[2] / whole:.1%} {f[0].rsplit('site-packages/', 1)[-1]}:{f[1]}({f[2]})" for f, v in rows]


def plateau(sweep: list[dict[str, Any]], within: float = 0.9) -> int:
    """The lowest concurrency whose throughput is within ``within`` of the best."""
    best = max(s["jobs_per_s"] for s in sweep)
    return next(s["concurrency"] for s in sweep if s["jobs_per_s"] >= within * best)


def run(quick: bool = False, jobs: int | None = None, rounds: int | None = None, levels: list[int] | None = None,
        profile: bool = True) -> tuple[list[Row], dict[str, Any]]:
    size = SIZES["quick" if quick else "full"]
    jobs = jobs or size["jobs"]
    levels = levels or [c for c in size["levels"] if c <= jobs]
    with comfy_server() as server:
        found = asyncio.run(measure(server, jobs, rounds or size["rounds"], levels, profile, size["before_after"]))
    rs = found["rounds"]
    first, last = rs[0], rs[-1]
    grew = last["rss_after_mb"] - first["rss_after_mb"]
    at_rest = found["tasks_at_rest"]
    retained = [(r["retained_jobs"], r["background_tasks"], r["asyncio_tasks"] - at_rest) for r in rs]
    # One object kept per job would add `jobs` gc-tracked objects per round; caches (urlsplit's, re's) settle
    # within a few dozen. Allow half an object per job.
    objects = max(r["gc_objects"] for r in rs[1:]) - first["gc_objects"] if len(rs) > 1 else 0
    no_leak = grew <= RSS_SLACK_MB and objects < jobs / 2 and all(x == (0, 0, 0) for x in retained)
    object_bound = f"< +{jobs // 2} obj"
    sweep = found["sweep"]
    knee = plateau(sweep)
    top = sweep[-1]
    bound = "client" if top["client_cpu_util"] >= top["server_cpu_util"] else "server"
    rows = [
        Row("scale", f"throughput, {jobs} concurrent jobs, rounds 1..{len(rs)}", "",
            " / ".join(f"{r['jobs_per_s']:.0f}" for r in rs) + " jobs/s", None, "", "info"),
        Row("scale", "client CPU per job, rounds (server CPU per job)", "",
            " / ".join(f"{r['client_cpu_ms_per_job']:.2f}" for r in rs) + " ms ("
            + " / ".join(f"{r['server_cpu_ms_per_job']:.2f}" for r in rs) + ")", None, "", "info"),
        Row("scale", "peak RSS per round (RSS after it); baseline: RSS at rest before round 1",
            f"{found['rss_at_rest_mb']:.1f} MiB", " / ".join(f"{r['peak_rss_mb']:.1f}" for r in rs) + " MiB ("
            + " / ".join(f"{r['rss_after_mb']:.1f}" for r in rs) + ")", None, "", "info"),
        Row("scale", "leak: RSS and gc objects, round 1 -> later (after a full-size warm-up round); job "
            "records/background/extra tasks per round",
            f"{first['rss_after_mb']:.1f} MiB, {first['gc_objects']} obj",
            f"{grew:+.1f} MiB, {objects:+d} obj; " + " ".join(f"{a}/{b}/{c}" for a, b, c in retained),
            None, f"<= +{RSS_SLACK_MB:g} MiB, {object_bound}, 0/0/0", verdict(no_leak)),
        Row("scale", f"throughput by concurrency {'/'.join(str(s['concurrency']) for s in sweep)}", "",
            " / ".join(f"{s['jobs_per_s']:.0f}" for s in sweep) + " jobs/s", None, f"plateau at c={knee}", "info"),
        Row("scale", f"CPU use at c={top['concurrency']}: client / ComfyUI double (1.0 = one core)",
            "", f"{top['client_cpu_util']:.2f} / {top['server_cpu_util']:.2f}", None, f"{bound}-bound", "info"),
    ]
    if "before_after" in found:
        ba = found["before_after"]
        before = {k: statistics.median(r[k] for r in ba["before"]) for k in ("jobs_per_s", "client_cpu_ms_per_job")}
        after = {k: statistics.median(r[k] for r in ba["after"]) for k in ("jobs_per_s", "client_cpu_ms_per_job")}
        rows.append(Row("scale", f"throughput at c={top['concurrency']}, httpx's pool of 64 ungated (before issue 16) vs "
                        "now (client CPU/job)",
                        f"{before['jobs_per_s']:.0f}/s ({before['client_cpu_ms_per_job']:.2f} ms)",
                        f"{after['jobs_per_s']:.0f}/s ({after['client_cpu_ms_per_job']:.2f} ms)",
                        after["jobs_per_s"] / before["jobs_per_s"], "", "info"))
    if "profile" in found:
        shares = found["profile"]["layers"]
        rows.append(Row("scale", f"client profile at c={found['profile']['concurrency']} (own time by layer)", "",
                        ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:6]), None, "", "info"))
    return rows, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--levels", default=None, help="comma-separated concurrency levels")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--details", action="store_true", help="print every measurement as JSON too")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else None
    rows, found = run(args.quick, args.jobs, args.rounds, levels, not args.no_profile)
    print(table(rows))
    if args.details:
        import json

        print(json.dumps(found, indent=2))
    return 0 if all(r.result != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
