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


def build_parser(prog: str = "python -m gpubridge.testing.comfy") -> argparse.ArgumentParser:
    """The double's command-line options: the one definition behind ``python -m gpubridge.testing.comfy``
    and ``gpubridge testing comfy`` (docs/testing.md's table is checked against it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A ComfyUI 0.3.64 test double: ComfyUI's HTTP and websocket API, placeholder outputs, "
        "fault injection at POST /gpubridge/faults. Prints its URL once it answers.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, loopback)")
    add("--port", type=int, default=8188, help="port; 0 picks a free one (default: 8188)")
    add("--root", default=None, help="folder for input/, output/ and temp/ (default: a temp dir)")
    add("--node-delay", type=float, default=0.0, help="seconds each executed node takes (default: 0)")
    add("--step-delay", type=float, default=0.0, help="seconds per sampler step (default: 0)")
    add("--delay", action="append", default=[], metavar="CLASS_OR_ID=SECONDS",
        help="the delay of one class_type or node id (repeatable)")
    add("--model-files", default=None, metavar="JSON",
        help='model files per folder, e.g. \'{"checkpoints": ["a.safetensors"]}\' '
        "(default: a Flux/SDXL/SD1.5 set)")
    add("--faults", default=None, metavar="JSON", help="initial faults, as POST /gpubridge/faults takes them")
    add("--no-cache", action="store_true", help="run every node each time (ComfyUI caches unchanged outputs)")
    add("--previews", action="store_true", help="send a preview image per sampler step")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m gpubridge.testing.comfy") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    faults = Faults(node_delay=args.node_delay, step_delay=args.step_delay)
    try:
        for item in args.delay:
            name, sep, seconds = item.partition("=")
            if not sep:
                raise ValueError(f"--delay takes CLASS_OR_ID=SECONDS, got {item!r}")
            faults.delays[name] = float(seconds)
        if args.faults:
            faults.update(json.loads(args.faults))
        model_files = json.loads(args.model_files) if args.model_files else None
    except ValueError as exc:  # json.JSONDecodeError included
        parser.error(str(exc))
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
