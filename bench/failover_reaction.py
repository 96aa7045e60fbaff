"""Failover reaction: from a stuck or crashed job to the rerouted job starting, against the configured bound.

    python -m bench.failover_reaction [--quick] [--runs N] [--queue-timeout Q] [--reconnect-timeout R]

``FailoverRunner([LocalRunner(primary), LocalRunner(fallback)])``, each ComfyUI double a process of its own,
the tiny workflow, one job at a time:

- stuck: the primary's queue is stuck (the double's ``paused`` fault: it accepts prompts and never starts
  them). With ``queue_timeout=Q`` the job is cancelled at the primary after Q and resubmitted to the
  fallback. Reaction = the fallback's STARTED event minus the submit; the bound is Q plus the reroute
  (status, cancel and confirm, resubmit: a handful of loopback requests), given as Q + 100 ms;
- crashed: the primary's process dies (``crash`` fault, ``os._exit``) when the job's SaveImage node starts.
  The local provider keeps reconnecting for ``reconnect_timeout=R`` (ComfyUI may be restarting), then
  fails the job as ProviderUnavailable, which is rerouted. Reaction = the fallback's STARTED event minus
  the moment the primary's process exited. The bound is R plus one reconnect backoff step (capped at
  2 s in ComfyClient) plus the reroute, given as R + 2.1 s. The primary is restarted between runs.

The first run of each kind is a warm-up (connections, /object_info) and is not counted. Circuit breakers
and the retry budget are opened wide so every run exercises the same path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from typing import Any

from bench._harness import Counter, Row, comfy_server, free_port, table, tiny_workflow, verdict

SIZES = {
    "full": {"runs": 10, "queue_timeout": 1.0, "reconnect_timeout": 1.0},
    "quick": {"runs": 3, "queue_timeout": 0.3, "reconnect_timeout": 0.5},
}
REROUTE_MARGIN_S = 0.1
RECONNECT_STEP_S = 2.0


def _config(queue_timeout: float | None) -> Any:
    from gpubridge.resilience import ResilienceConfig

    return ResilienceConfig(queue_timeout=queue_timeout, probe_interval_s=None, backoff_initial_s=0.01,
                            breaker_consecutive_failures=10**6, breaker_min_calls=10**6,
                            retry_budget_min_per_s=1000.0)


async def _run_once(runner: Any, nxt: Counter) -> tuple[float, float | None, Any]:
    """Run one job; return (submit wall time, the fallback's STARTED time, the result)."""
    from gpubridge.models import EventType

    started: list[float] = []

    def on_event(ev: Any) -> None:
        if ev.type is EventType.STARTED and ev.provider == "fallback":
            started.append(ev.at)

    t0 = time.time()
    result = await runner.run(tiny_workflow(nxt()), on_event=on_event, timeout=120)
    return t0, (started[0] if started else None), result


async def stuck(runs: int, queue_timeout: float) -> list[float]:
    from gpubridge.providers.local import LocalRunner
    from gpubridge.resilience import FailoverRunner

    nxt = Counter()
    reactions: list[float] = []
    with comfy_server(paused=True) as primary, comfy_server() as fallback:
        runner = FailoverRunner([LocalRunner(primary.url, name="primary"), LocalRunner(fallback.url, name="fallback")],
                                _config(queue_timeout))
        try:
            for i in range(runs + 1):
                t0, started, result = await _run_once(runner, nxt)
                assert result.provider == "fallback" and result.attempts[0].outcome == "stuck", result.attempts
                assert started is not None, "no STARTED event from the fallback"
                if i:
                    reactions.append(started - t0)
        finally:
            await runner.aclose()
    return reactions


def _stamp_exit(proc: Any, stamps: list[float]) -> None:
    proc.wait()
    stamps.append(time.time())


async def crashed(runs: int, reconnect_timeout: float) -> list[float]:
    from gpubridge.providers.local import LocalRunner
    from gpubridge.resilience import FailoverRunner

    nxt = Counter()
    reactions: list[float] = []
    port = free_port()
    with comfy_server() as fallback:
        primary = LocalRunner(f"http://127.0.0.1:{port}", name="primary", reconnect_timeout=reconnect_timeout)
        runner = FailoverRunner([primary, LocalRunner(fallback.url, name="fallback")], _config(None))
        try:
            for i in range(runs + 1):
                with comfy_server(port=port, crash={"class_type": "SaveImage"}) as server:
                    exited: list[float] = []
                    assert server.proc is not None
                    watcher = threading.Thread(target=_stamp_exit, args=(server.proc, exited), daemon=True)
                    watcher.start()
                    _t0, started, result = await _run_once(runner, nxt)
                    watcher.join(5)
                assert result.provider == "fallback" and result.attempts[0].outcome == "failed", result.attempts
                assert started is not None and exited, "no crash or no STARTED event from the fallback"
                if i:
                    reactions.append(started - exited[0])
        finally:
            await runner.aclose()
    return reactions


def _stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_s": round(statistics.median(xs), 4), "max_s": round(max(xs), 4),
            "min_s": round(min(xs), 4)}


def run(quick: bool = False, runs: int | None = None, queue_timeout: float | None = None,
        reconnect_timeout: float | None = None) -> list[Row]:
    size = SIZES["quick" if quick else "full"]
    runs = runs or size["runs"]
    q = queue_timeout or size["queue_timeout"]
    r = reconnect_timeout or size["reconnect_timeout"]
    s = _stats(asyncio.run(stuck(runs, q)))
    c = _stats(asyncio.run(crashed(runs, r)))
    stuck_bound = q + REROUTE_MARGIN_S
    crash_bound = r + RECONNECT_STEP_S + REROUTE_MARGIN_S
    return [
        Row("failover", f"stuck queue -> rerouted job started, p50 / max (n={s['n']})", f"Q = {q:g} s",
            f"{s['p50_s']:.3f} / {s['max_s']:.3f} s", s["max_s"] / q, f"<= Q + {REROUTE_MARGIN_S:g} s",
            verdict(s["max_s"] <= stuck_bound), s),
        Row("failover", f"crashed ComfyUI -> rerouted job started, p50 / max (n={c['n']})",
            f"reconnect R = {r:g} s", f"{c['p50_s']:.3f} / {c['max_s']:.3f} s", c["max_s"] / r,
            f"<= R + {RECONNECT_STEP_S + REROUTE_MARGIN_S:g} s", verdict(c["max_s"] <= crash_bound), c),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover_reaction", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--queue-timeout", type=float, default=None)
    parser.add_argument("--reconnect-timeout", type=float, default=None)
    args = parser.parse_args(argv)
    rows = run(args.quick, args.runs, args.queue_timeout, args.reconnect_timeout)
    print(table(rows))
    return 0 if all(r.result != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
