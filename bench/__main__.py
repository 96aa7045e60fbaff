"""gpubridge's benchmarks: one command, one table of ratios, everything measured in the same run, on loopback.

    python -m bench [--quick] [--comfy-url URL] [--only NAME,...] [--json FILE]

Sections (``--only`` takes their names):

- ``overhead``: the local provider against the stdlib floor (blocking http.client + a hand-spoken websocket;
  target <= 1.05x p50, <= 1.10x CPU) and against a raw httpx + websockets client;
- ``paths``: the Modal provider (job API under uvicorn) and the RunPod provider (endpoint double + the real
  worker handler), each against the raw client on the same ComfyUI;
- ``peer``: the RunPod provider against ``runpod.Endpoint(...).run_sync`` on the same endpoint double;
- ``scale``: 1,000 concurrent jobs through one local provider: throughput, CPU per job, RSS over three
  rounds, the concurrency where throughput stops growing and why;
- ``failover``: reaction time from a stuck or crashed job to the rerouted job starting, against its bound;
- ``shadow``: primary-path latency with shadow traffic at 100 % against without.
- ``url_input``: peak RSS of the job API while a 400 MB URL input is refused (bound +80 MB).
- ``jobapi``: the job API's RSS after 200 jobs of 1 MB outputs against after 20 (bound +30 MB).
- ``gateway``: ``gpubridge serve`` (POST /v1/run) against the same runner in-process, p50 (bound +2 ms),
  and the gateway's CPU per job with 500 jobs at once.
- ``provider_scale``: 1,000 concurrent jobs through one Modal and one RunPod provider: client CPU per job.
- ``comfy_api``: provider ``comfy`` against Comfy Org's ``comfy-sdk`` on the same comfy-api-proxy, p50 per
  job (bound 0.5x).
- ``store``: peak RSS of ``gpubridge run --out`` saving a 200 MB artifact returned as a presigned URL, over
  the same command for a 1 KB one (bound +100 MB).

Every server (ComfyUI double, Modal job API, RunPod endpoint double) runs in a process of its own, so this
process's CPU time is the client's. ``--comfy-url`` points ``overhead`` and ``paths`` at a running ComfyUI
(the other sections need the double's fault injection). ``--quick`` runs smaller sizes (about 100 s on 2
busy cores); rows whose few samples cannot resolve their bound (shadow and gateway p50)
report there without gating and gate the full run. Each section is also runnable alone: ``python -m bench.<section> [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._harness import Row, quiet_logs, table

SECTIONS = ("overhead", "paths", "peer", "scale", "failover", "shadow", "url_input", "jobapi", "gateway", "store", "comfy_api",
            "provider_scale")


def _section(name: str, quick: bool, comfy_url: str | None) -> tuple[list[Row], Any]:
    if name == "overhead":
        from bench import overhead

        return overhead.run(quick, comfy_url), None
    if name == "paths":
        from bench import paths

        return paths.run(quick, comfy_url), None
    if name == "peer":
        from bench import peer

        return peer.run(quick), None
    if name == "scale":
        from bench import scale

        return scale.run(quick)
    if name == "failover":
        from bench import failover_reaction

        return failover_reaction.run(quick), None
    if name == "shadow":
        from bench import shadow

        return shadow.run(quick), None
    if name == "url_input":
        from bench import url_input

        return url_input.run(quick), None
    if name == "jobapi":
        from bench import job_api_memory

        return job_api_memory.run(quick), None
    if name == "gateway":
        from bench import gateway

        return gateway.run(quick, comfy_url), None
    if name == "provider_scale":
        from bench import provider_scale

        return provider_scale.run(quick), None
    if name == "comfy_api":
        from bench import comfy_api

        return comfy_api.run(quick), None
    if name == "store":
        from bench import store

        return store.run(quick), None
    raise ValueError(name)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for pkg in ("httpx", "httpcore", "websockets", "aiohttp", "pydantic", "runpod", "sniffio"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - any failure means "not installed"
            versions[pkg] = "not installed"
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem, "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under a minute on 2 cores")
    parser.add_argument("--comfy-url", default=None,
                        help="a running ComfyUI for the overhead and paths sections (default: the double)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every measurement as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "ERROR")
    quiet_logs()

    info = machine()
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
    log(f"python -m bench {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    log(f"{info['cpus']} CPUs ({info['cpu']}), {info['memory']}, Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    rows: list[Row] = []
    details: dict[str, Any] = {}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            section_rows, extra = _section(name, args.quick, args.comfy_url)
        except Exception as exc:  # noqa: BLE001 - a broken section must not hide the others
            traceback.print_exc()
            section_rows, extra = [Row(name, f"section failed: {type(exc).__name__}: {exc}"[:120], "", "", None,
                                       "", "FAIL")], None
        quiet_logs()  # some sections import libraries that turn logging back on
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"[bench] {name}: {timings[name]} s")
        rows += section_rows
        if extra is not None:
            details[name] = extra
    wall = time.perf_counter() - t_all

    mode = "quick" if args.quick else "full"
    where = f"ComfyUI at {args.comfy_url}" if args.comfy_url else "ComfyUI double"
    print(f"gpubridge benchmarks ({mode}; {where}; sections {', '.join(names)}; {wall:.1f} s)")
    print(f"{info['cpus']} CPUs ({info['cpu']}), {info['memory']}, Python {info['python']}; "
          + ", ".join(f"{k} {v}" for k, v in info["packages"].items()) + "\n")
    print(table(rows))
    failed = [r for r in rows if r.result == "FAIL"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass or are informational; {len(failed)} FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"mode": mode, "comfy_url": args.comfy_url, "machine": info, "wall_s": round(wall, 1),
             "section_s": timings, "rows": [r.as_dict() for r in rows], "details": details},
            indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
