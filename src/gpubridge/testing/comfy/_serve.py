"""Run the ComfyUI double as a process: ``python -m gpubridge.testing.comfy`` or :func:`serve`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._double import ComfyDouble
from ._faults import Faults


async def serve_async(
    host: str = "127.0.0.1",
    port: int = 8188,
    root: str | None = None,
    *,
    node_delay: float = 0.0,
    step_delay: float = 0.0,
    model_files: Mapping[str, Sequence[str]] | None = None,
    ready: Callable[[str], Any] | None = None,
    **options: Any,
) -> None:
    """Serve until SIGINT/SIGTERM (or a crash fault, which exits the process with status 70)."""
    faults = options.pop("faults", None) or Faults(node_delay=node_delay, step_delay=step_delay)
    options.setdefault("exit_on_crash", True)
    double = ComfyDouble(root, host=host, port=port, model_files=model_files, faults=faults, **options)
    await double.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    (ready or _print_url)(double.url)
    try:
        await stop.wait()
    finally:
        await double.stop()


def _print_url(url: str) -> None:
    print(url, flush=True)


def serve(
    host: str = "127.0.0.1",
    port: int = 8188,
    root: str | None = None,
    *,
    node_delay: float = 0.0,
    step_delay: float = 0.0,
    model_files: Mapping[str, Sequence[str]] | None = None,
    ready: Callable[[str], Any] | None = None,
    **options: Any,
) -> None:
    """Run the ComfyUI double in the foreground (blocking) until interrupted.

    Prints the base URL (``http://127.0.0.1:8188``) on one line once it answers (or calls ``ready(url)``).
    ``root`` defaults to a temporary directory. ``options`` go to :class:`ComfyDouble` (``cache``,
    ``previews``, ``faults``, ...). The crash fault ends the process with exit status 70.
    """
    asyncio.run(
        serve_async(
            host,
            port,
            root,
            node_delay=node_delay,
            step_delay=step_delay,
            model_files=model_files,
            ready=ready,
            **options,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpubridge.testing.comfy",
        description="A ComfyUI 0.3.64 test double: ComfyUI's HTTP and websocket API, placeholder outputs, "
        "fault injection at POST /gpubridge/faults.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188, help="0 picks a free port (default 8188)")
    parser.add_argument("--root", default=None, help="folder for input/ output/ temp/ (default: a temp dir)")
    parser.add_argument("--node-delay", type=float, default=0.0, help="seconds per executed node")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds per sampler step")
    parser.add_argument(
        "--delay",
        action="append",
        default=[],
        metavar="CLASS_OR_ID=SECONDS",
        help="per class_type or node id node delay (repeatable)",
    )
    parser.add_argument(
        "--model-files",
        default=None,
        help='JSON object of model files per folder, e.g. \'{"checkpoints": ["a.safetensors"]}\'',
    )
    parser.add_argument(
        "--faults", default=None, help="JSON object of initial faults (as POST /gpubridge/faults)"
    )
    parser.add_argument("--no-cache", action="store_true", help="disable the node output cache")
    parser.add_argument("--previews", action="store_true", help="send a preview image per sampler step")
    args = parser.parse_args(argv)
    faults = Faults(node_delay=args.node_delay, step_delay=args.step_delay)
    for item in args.delay:
        name, _, seconds = item.partition("=")
        faults.delays[name] = float(seconds)
    if args.faults:
        faults.update(json.loads(args.faults))
    model_files = json.loads(args.model_files) if args.model_files else None
    try:
        serve(
            args.host,
            args.port,
            args.root,
            model_files=model_files,
            faults=faults,
            cache=not args.no_cache,
            previews=args.previews,
        )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
