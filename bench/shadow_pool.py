"""Name resolution while shadow comparisons run (issue 22, defect 8).

Comparisons decode images: CPU-bound work in threads. On the event loop's default executor they queue in
front of ``loop.getaddrinfo`` (every new connection's DNS lookup); on the shadow's own bounded pool they
do not. Measures the latency of ``loop.getaddrinfo("127.0.0.1", 80)`` while ``--jobs`` comparisons of
``--side``-pixel images run, both ways, and prints p50/p99 and their ratio.

    python -m bench.shadow_pool [--jobs 16] [--side 1024] [--lookups 40]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from gpubridge.models import Artifact, ArtifactKind, JobResult
from gpubridge.shadow.compare import compare


def _result(data: bytes) -> JobResult:
    art = Artifact(node_id="9", kind=ArtifactKind.IMAGE, filename="x.png", data=data, mime_type="image/png")
    return JobResult(job_id="j", provider="p", artifacts=[art])


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[max(1, math.ceil(p / 100 * len(xs))) - 1]


async def _measure(pool: ThreadPoolExecutor | None, jobs: int, data: bytes, lookups: int) -> list[float]:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=min(32, 4 + 2)))  # a 2-core machine's default
    work = [loop.run_in_executor(pool, functools.partial(compare, _result(data), _result(data), workflow="w"))
            for _ in range(jobs)]
    times = []
    for _ in range(lookups):
        t = time.perf_counter()
        await loop.getaddrinfo("127.0.0.1", 80)
        times.append(time.perf_counter() - t)
    await asyncio.gather(*work)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--lookups", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((args.side, args.side, 3)) * 255).astype("uint8")).save(buf, "PNG")
    data = buf.getvalue()
    default = asyncio.run(_measure(None, args.jobs, data, args.lookups))
    own_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpubridge-shadow-compare")
    own = asyncio.run(_measure(own_pool, args.jobs, data, args.lookups))
    own_pool.shutdown()
    for name, xs in (("default executor", default), ("own pool (2)", own)):
        print(f"{name:18s} getaddrinfo p50 {_pct(xs, 50) * 1000:8.2f} ms  p99 {_pct(xs, 99) * 1000:8.2f} ms")
    print(f"p99 ratio default/own: {_pct(default, 99) / _pct(own, 99):.1f}x")


if __name__ == "__main__":
    main()
