"""The RunPod endpoint double running the real worker handler, as a process of its own (used by the benchmarks).

    python -m bench._runpod_server COMFY_URL ['{"workers": 1, ...}']

Prints one JSON line ``{"base_url", "endpoint_id"}`` once it answers, then serves until SIGTERM/SIGINT.
The API key is ``bench._harness.RUNPOD_API_KEY``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

os.environ.setdefault("RUNPOD_LOG_LEVEL", "ERROR")


async def serve(comfy_url: str, knobs: dict) -> None:
    from bench._harness import RUNPOD_API_KEY
    from bench.runpod_vs_sdk import load_handler
    from gpubridge.testing.runpod import RunPodEndpointDouble

    handler = load_handler()
    # The worker's defaults otherwise (progress at most every 0.5 s, reconnect 5 s), as deployed.
    handler.configure(comfy_url=comfy_url)
    double = RunPodEndpointDouble(handler.handler, api_key=RUNPOD_API_KEY, **knobs)
    await double.start()
    print(json.dumps({"base_url": double.base_url, "endpoint_id": double.endpoint_id}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await double.stop()
    await handler.aclose()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    asyncio.run(serve(args[0], json.loads(args[1]) if len(args) > 1 else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
