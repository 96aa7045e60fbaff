"""The job API's memory with finished results waiting to be fetched again (issue 21 item 11).

The job API (``python -m modal_app.serve``, in-process backend) runs in a process of its own in front of the
ComfyUI double. Jobs whose output is a ~1 MB PNG (the workflow in its tEXt chunk) are
submitted and their results fetched, and the API's resident set (VmRSS from /proc) is read after 20 jobs and
after 200. Results are kept for the whole retention (an hour) and could be asked for again, so a server that
holds them in memory grows by ~1.4 MB (base64) per job; the bound is +30 MB between the two readings.

    python -m bench.job_api_memory [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import httpx

from bench._harness import ROOT, Row, _wait_http, comfy_server, free_port, stop, verdict

BOUND_MB = 30.0
FIRST, LAST = 20, 200


def big_output(i: int) -> dict:
    """A ~1 MB PNG: the double writes the prompt into the PNG's tEXt chunk, so a node title of 750 KB random
    base64 makes a 1 MB file (a new one each time: no cache hit)."""
    title = base64.b64encode(os.urandom(750_000)).decode()
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                      "color": (i * 7919 + 1) % 16777215},
              "_meta": {"title": title}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "mem"}},
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _jobs(url: str, start: int, count: int, concurrency: int = 4) -> int:
    """Run ``count`` jobs (``concurrency`` at a time), fetching each result; returns the output bytes seen."""
    sizes: list[int] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:

        async def one(i: int) -> None:
            async with sem:
                resp = await http.post("/v1/jobs", json={"workflow": big_output(i), "timeout": 60})
                resp.raise_for_status()
                job_id = resp.json()["job_id"]
                while True:
                    env = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
                    if env["status"]["state"] not in ("queued", "running"):
                        break
                if env["status"]["state"] != "succeeded":
                    raise RuntimeError(f"job {job_id} ended {env['status']['state']}: {env.get('error')}")
                sizes.append(sum(len(a.get("data") or "") for a in env["result"]["artifacts"]))

        await asyncio.gather(*(one(start + i) for i in range(count)))
    return sum(sizes) // max(1, len(sizes))


def run(quick: bool = False) -> list[Row]:
    with comfy_server() as comfy:
        port = free_port()
        cmd = [sys.executable, "-m", "modal_app.serve", "--comfy-url", comfy.url, "--port", str(port),
               "--allow-anonymous"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_http(f"{url}/v1/health", proc, "the job API")
            per_job = asyncio.run(_jobs(url, 0, FIRST))
            after_first = rss_mb(proc.pid)
            asyncio.run(_jobs(url, FIRST, LAST - FIRST))
            after_last = rss_mb(proc.pid)
        finally:
            stop(proc)
    grew = after_last - after_first
    return [Row(
        "jobapi",
        f"job API RSS after {LAST} jobs of {per_job / 1e6:.1f} MB base64 outputs vs after {FIRST}",
        f"{after_first:.1f} MB",
        f"{after_last:.1f} MB",
        after_last / after_first if after_first else None,
        f"+{BOUND_MB:.0f} MB",
        verdict(grew <= BOUND_MB),
        {"rss_after_first_mb": round(after_first, 1), "rss_after_last_mb": round(after_last, 1),
         "grew_mb": round(grew, 1), "output_b64_bytes": per_job},
    )]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    rows = run(parser.parse_args().quick)
    from bench._harness import table

    print(table(rows))
    sys.exit(0 if all(r.result != "FAIL" for r in rows) else 1)
