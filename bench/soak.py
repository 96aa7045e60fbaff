"""Soak: many jobs through Modal -> RunPod failover with about 10 % injected faults.

    python -m bench.soak [--jobs 10000] [--concurrency 64] [--fault-rate 0.10] [--seed 1]

Everything runs on loopback, the backends in processes of their own:

- ComfyUI double A behind the Modal job API (``python -m modal_app.serve``, in-process backend);
- ComfyUI double B behind the RunPod endpoint double running the real worker handler
  (``python -m bench.soak --serve-runpod``);
- this process: ``FailoverRunner([ModalRunner, RunPodRunner])`` driving ``--jobs`` jobs, ``--concurrency`` at
  a time.

Faults (their shares add up to ``--fault-rate`` of Modal API requests, plus RunPod's own):

- Modal API requests, on the client side of the wire: connection refused/reset before sending, 503, 429,
  malformed JSON bodies, and answers lost after the request went out (a submit that may have created a
  job: the provider resends it with the same Idempotency-Key);
- RunPod, with RunPod's per-endpoint limits enforced by the double (``/run`` 1,000, ``/status`` 2,000,
  ``/cancel`` 100 requests per 10 s): worker crashes (``crash_rate``), throttling bursts (429) on every
  route, 429 storms on ``/status`` and ``/cancel`` (``--storm`` consecutive 429s every 2 s), and stalls
  (no workers for a few seconds, so queued jobs hit ``queue_timeout`` and are cancelled and rerouted);
- ComfyUI A: dropped websockets, now and then.

At the end it checks every backend for orphans (anything still queued or running), counts lost jobs
(submitted, but no result and no error delivered) and jobs run twice (each job has its own canvas colour;
a colour that ComfyUI A and B together executed to success more than once ran twice). Lost, orphaned and
run twice must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

os.environ.setdefault("RUNPOD_LOG_LEVEL", "ERROR")

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "soak-key"


# ------------------------------------------------------------------------------------------ the RunPod side


def _load_worker() -> ModuleType:
    name = "gpubridge_soak_runpod_worker"
    spec = importlib.util.spec_from_file_location(name, ROOT / "contrib" / "runpod_worker" / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def _serve_runpod(comfy_url: str, knobs: dict[str, Any]) -> None:
    from aiohttp import web

    from gpubridge.testing.runpod import RunPodEndpointDouble

    worker = _load_worker()
    worker.configure(comfy_url=comfy_url, reconnect_timeout=2.0, progress_interval=0.5)
    double = RunPodEndpointDouble(worker.handler, api_key=API_KEY, **knobs)
    await double.start()

    async def set_knobs(request: web.Request) -> web.Response:
        for key, value in (await request.json()).items():
            setattr(double, key, value)
        return web.json_response({"ok": True})

    async def counts(_: web.Request) -> web.Response:
        return web.json_response({"in_queue": double.in_queue, "in_progress": double.in_progress,
                                  "jobs": len(double.job_ids), "counters": dict(double.counters)})

    control = web.Application()
    control.router.add_post("/soak/knobs", set_knobs)
    control.router.add_get("/soak/counts", counts)
    runner = web.AppRunner(control)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"base_url": double.base_url, "endpoint_id": double.endpoint_id,
                      "control": f"http://127.0.0.1:{port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await double.stop()
    await worker.aclose()


# ------------------------------------------------------------------------------------------------ faults


class FlakyTransport(httpx.AsyncBaseTransport):
    """Injects faults into a share of the requests it carries (seeded, so runs are repeatable)."""

    KINDS = ("refused", "503", "429", "lost_answer", "malformed")

    def __init__(self, rate: float, rng: random.Random):
        self.rate = rate
        self.rng = rng
        self.real = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=200, max_keepalive_connections=200))
        self.injected: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/cancel") or self.rng.random() >= self.rate:
            return await self.real.handle_async_request(request)
        kind = self.rng.choice(self.KINDS)
        self.injected[kind] += 1
        if kind == "refused":
            raise httpx.ConnectError("[soak] connection refused", request=request)
        if kind == "503":
            return httpx.Response(503, text="[soak] upstream unavailable", request=request)
        if kind == "429":
            return httpx.Response(429, headers={"Retry-After": "0.05"}, text="[soak] slow down", request=request)
        response = await self.real.handle_async_request(request)
        await response.aread()
        if kind == "lost_answer":
            raise httpx.ReadTimeout("[soak] the answer was lost", request=request)
        return httpx.Response(200, content=b"{[soak] not json", request=request)

    async def aclose(self) -> None:
        await self.real.aclose()


# ------------------------------------------------------------------------------------------------- soak


def _start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise RuntimeError(f"{cmd[:4]} did not start")
    return proc, line


def _wait_http(url: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1.0, trust_env=False)
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered at {url}")


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, int(-(-p * len(ordered) // 100))) - 1] if ordered else float("nan")


async def _successes_by_colour(http: httpx.AsyncClient, comfy_url: str) -> Counter[int]:
    """How many times ComfyUI ran each canvas colour to success (its history)."""
    history = (await http.get(f"{comfy_url}/history")).json()
    seen: Counter[int] = Counter()
    for entry in history.values():
        if (entry.get("status") or {}).get("status_str") != "success":
            continue
        prompt = entry.get("prompt") or []
        graph = prompt[2] if len(prompt) > 2 and isinstance(prompt[2], dict) else {}
        for node in graph.values():
            if isinstance(node, dict) and node.get("class_type") == "EmptyImage":
                seen[int(node.get("inputs", {}).get("color", -1))] += 1
    return seen


async def soak(jobs: int, concurrency: int, fault_rate: float, seed: int, runpod_crash: float,
               storm: int = 40, stall_every: int = 5) -> dict[str, Any]:
    from gpubridge.models import JobRequest, Workflow
    from gpubridge.providers.modal import ModalRunner
    from gpubridge.providers.runpod import RunPodRunner
    from gpubridge.resilience import FailoverRunner, JobOutcome, ResilienceConfig

    procs: list[subprocess.Popen[str]] = []
    try:
        comfy_a, url_a = _start([sys.executable, "-m", "gpubridge.testing.comfy", "--port", "0"])
        comfy_b, url_b = _start([sys.executable, "-m", "gpubridge.testing.comfy", "--port", "0"])
        procs += [comfy_a, comfy_b]
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        api = subprocess.Popen([sys.executable, "-m", "modal_app.serve", "--comfy-url", url_a, "--port", str(port),
                                "--token", "soak-token"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=ROOT, env=env)
        procs.append(api)
        modal_url = f"http://127.0.0.1:{port}"
        _wait_http(f"{modal_url}/openapi.json")
        rp, info_line = _start([sys.executable, "-m", "bench.soak", "--serve-runpod", url_b,
                                "--runpod-knobs", json.dumps({"crash_rate": runpod_crash, "seed": seed,
                                                              "workers": 2, "rate_limits": True})], env=env)
        procs.append(rp)
        info = json.loads(info_line)

        transport = FlakyTransport(fault_rate, random.Random(seed + 1))
        outcomes: list[JobOutcome] = []
        runner = FailoverRunner(
            [
                ModalRunner(modal_url, token="soak-token", long_poll=5.0, transport=transport),
                RunPodRunner(info["endpoint_id"], api_key=API_KEY, base_url=info["base_url"], poll_initial=0.02,
                             poll_max=0.25, retry_initial=0.02),
            ],
            ResilienceConfig(probe_interval_s=None, queue_timeout=3.0, max_attempts=4, backoff_initial_s=0.02,
                             retry_budget_ratio=0.5, breaker_open_for_s=1.0, reap_initial_s=0.2, reap_max_s=2.0),
            on_outcome=outcomes.append,
        )
        workflow = Workflow.load(ROOT / "workflows" / "model_free_invert.json")
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        served: Counter[str] = Counter()
        finished = 0
        colour_of: dict[str, int] = {}
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            nonlocal finished
            async with sem:
                req = JobRequest(workflow=workflow.with_values({"Canvas.color": i,  # one colour per job
                                                                "Canvas.width": 64, "Canvas.height": 64}),
                                 timeout=120)
                colour_of[req.request_id] = i
                t0 = time.perf_counter()
                try:
                    result = await runner.run(req)
                    latencies.append(time.perf_counter() - t0)
                    served[result.provider] += 1
                except Exception as exc:  # counted: a typed failure is not a lost job
                    errors[type(exc).__name__] += 1
                finished += 1

        storms = Counter[str]()

        async def chaos() -> None:
            """Drop ComfyUI A's websockets now and then; throttle RunPod in bursts, alternating with 429
            storms on /status and /cancel; every ``stall_every`` rounds, stall RunPod (no workers) for a
            two rounds, so its queued jobs pass queue_timeout and are cancelled and rerouted while /cancel may be
            storming."""
            knobs = f"{info['control']}/soak/knobs"
            async with httpx.AsyncClient(trust_env=False) as http:
                n = 0
                while True:
                    await asyncio.sleep(2.0)
                    n += 1
                    with contextlib.suppress(httpx.HTTPError):
                        await http.post(f"{url_a}/gpubridge/drop_ws")
                        if n % 2:
                            await http.post(knobs, json={"throttle": 3, "throttle_routes": None})
                            storms["burst"] += 1
                        else:
                            await http.post(knobs, json={"throttle": storm, "throttle_routes": ["status", "cancel"]})
                            storms["status_cancel_storm"] += 1
                        if stall_every and n % stall_every == 0:
                            await http.post(knobs, json={"workers": 0})
                            storms["stall"] += 1
                        elif stall_every and n % stall_every == 2 and n > 2:  # 4 s: past queue_timeout
                            await http.post(knobs, json={"workers": 2})

        chaos_task = asyncio.create_task(chaos())
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(jobs)))
        wall = time.perf_counter() - t0
        chaos_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await chaos_task
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            await http.post(f"{info['control']}/soak/knobs", json={"workers": 2, "throttle": 0})
        # Let the reaper finish what it still has (within RunPod's limits), then close.
        for _ in range(600):
            if not runner.unconfirmed_cancels:
                break
            await asyncio.sleep(0.1)
        unconfirmed = len(runner.unconfirmed_cancels)
        await runner.aclose()

        # Orphans: anything still queued or running anywhere, once the dust settles.
        orphans = 0
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            for _ in range(100):
                qa = (await http.get(f"{url_a}/queue")).json()
                qb = (await http.get(f"{url_b}/queue")).json()
                rpc = (await http.get(f"{info['control']}/soak/counts")).json()
                orphans = (len(qa["queue_running"]) + len(qa["queue_pending"]) + len(qb["queue_running"])
                           + len(qb["queue_pending"]) + rpc["in_queue"] + rpc["in_progress"])
                if orphans == 0:
                    break
                await asyncio.sleep(0.1)
            runs_a = await _successes_by_colour(http, url_a)
            runs_b = await _successes_by_colour(http, url_b)
        runs = runs_a + runs_b
        twice = [c for c, count in runs.items() if 0 <= c < jobs and count > 1]
        run_twice = len(twice)
        twice_where = Counter(f"modal x{runs_a[c]} + runpod x{runs_b[c]}" for c in twice)
        twice_attempts = [
            [(a.provider, a.job_id, a.outcome, (a.error or {}).get("type")) for a in o.attempts]
            for o in outcomes if colour_of.get(o.request_id or "") in set(twice)
        ][:5]
        lost = jobs - finished
        return {
            "jobs": jobs,
            "completed": len(latencies),
            "failed": sum(errors.values()),
            "failed_by_type": dict(errors),
            "lost": lost + (jobs - len(outcomes)),
            "orphaned": orphans,
            "run_twice": run_twice,
            "run_twice_where": dict(twice_where),
            "run_twice_attempts": twice_attempts,
            "unconfirmed_cancels": unconfirmed,
            "cancel_failures": len(runner.cancel_failures),
            "chaos": dict(storms),
            "runpod_requests": {k: rpc.get("counters", {}).get(k, 0) for k in
                                ("run", "status", "cancel", "throttled", "rate_limited", "cancelled", "crashes")},
            "served_by": dict(served),
            "failovers": runner.counters["failovers"],
            "stuck_rerouted": runner.counters["stuck"],
            "unconfirmed_submits": runner.counters["unconfirmed_submits"],
            "injected_modal_faults": dict(transport.injected),
            "p50_ms": round(_pct(latencies, 50) * 1000, 1),
            "p99_ms": round(_pct(latencies, 99) * 1000, 1),
            "wall_s": round(wall, 1),
            "jobs_per_s": round(jobs / wall, 1),
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fault-rate", type=float, default=0.07, help="share of Modal API requests faulted")
    parser.add_argument("--runpod-crash-rate", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--storm", type=int, default=40, help="consecutive 429s per /status+/cancel storm")
    parser.add_argument("--stall-every", type=int, default=5, help="stall RunPod every N chaos rounds (0: never)")
    parser.add_argument("--serve-runpod", metavar="COMFY_URL", help=argparse.SUPPRESS)
    parser.add_argument("--runpod-knobs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_runpod:
        asyncio.run(_serve_runpod(args.serve_runpod, json.loads(args.runpod_knobs)))
        return 0
    report = asyncio.run(soak(args.jobs, args.concurrency, args.fault_rate, args.seed, args.runpod_crash_rate,
                              args.storm, args.stall_every))
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == 0 and report["orphaned"] == 0 and report["run_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
