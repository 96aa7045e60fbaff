"""Shared pieces of the benchmarks: servers in subprocesses, the raw baseline client, statistics.

Servers run in their own processes so the client process's CPU time is the client's alone.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 3),
        "p95_ms": round(pct(values, 95) * 1000, 3),
        "p99_ms": round(pct(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
    }


def tiny_workflow(i: int, folder: str | None = None) -> dict[str, Any]:
    """EmptyImage 64x64 -> SaveImage, a new colour each time so no run is served from ComfyUI's cache.

    ``folder``: save under ``FOLDER/<i>/`` (a per-job output folder, as gpubridge's providers make one),
    so a raw client pays for a job's directory as gpubridge does, and no arm's SaveImage scans a folder
    that grows with every job."""
    prefix = f"{folder}/{i}/bench" if folder else "bench"
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                      "color": (i * 7919) % 16777215}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith(prefix):
        proc.kill()
        raise RuntimeError(f"{what} did not start (printed {line!r})")
    return line


def _wait_http(url: str, proc: subprocess.Popen[Any], what: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1.0, trust_env=False)
            return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not answer at {url}")


@dataclass
class Server:
    """A server process the benchmark started: its URL and process (for its CPU time)."""

    url: str
    proc: subprocess.Popen[Any] | None = None

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid) if self.proc is not None else float("nan")


@contextlib.contextmanager
def comfy_server(port: int = 0, *, cache: bool = True, **faults: Any) -> Iterator[Server]:
    """The ComfyUI double as a process (on a free port unless ``port``); yields the :class:`Server`.
    ``faults`` are its initial fault knobs (``node_delay``, ``paused``, ``crash``...); ``cache=False`` runs
    every node of every prompt (ComfyUI would serve a repeated prompt from its cache)."""
    with tempfile.TemporaryDirectory(prefix="gpubridge-bench-") as root:
        cmd = [sys.executable, "-m", "gpubridge.testing.comfy", "--port", str(port), "--root", root]
        if not cache:
            cmd.append("--no-cache")
        if faults:
            cmd += ["--faults", json.dumps(faults)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        try:
            yield Server(_wait_for_line(proc, "http://127.0.0.1:", "the ComfyUI double"), proc)
        finally:
            stop(proc)


@contextlib.contextmanager
def comfy_double(**faults: Any) -> Iterator[str]:
    """The ComfyUI double as a process on a free port; yields its URL."""
    with comfy_server(**faults) as server:
        yield server.url


@contextlib.contextmanager
def comfy_or(url: str | None, **faults: Any) -> Iterator[Server]:
    """The ComfyUI at ``url`` (not started here), or else a fresh double."""
    if url:
        yield Server(url.rstrip("/"))
    else:
        with comfy_server(**faults) as server:
            yield server


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def modal_api(comfy_url: str) -> Iterator[str]:
    """The Modal job API (modal_app, in-process backend) under uvicorn, as a process; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "modal_app.serve", "--comfy-url", comfy_url, "--port", str(port),
           "--allow-anonymous"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/openapi.json", proc, "the Modal job API")
        yield url
    finally:
        stop(proc)


RUNPOD_API_KEY = "bench-key"


@contextlib.contextmanager
def runpod_endpoint(comfy_url: str, **knobs: Any) -> Iterator[dict[str, Any]]:
    """The RunPod endpoint double running the real worker handler (contrib/runpod_worker) against the
    ComfyUI at ``comfy_url``, as a process; yields ``{"base_url", "endpoint_id", "api_key"}``.
    ``knobs`` go to :class:`~gpubridge.testing.runpod.RunPodEndpointDouble`."""
    cmd = [sys.executable, "-m", "bench._runpod_server", comfy_url, json.dumps(knobs)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RUNPOD_LOG_LEVEL": "ERROR"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    try:
        info = json.loads(_wait_for_line(proc, "{", "the RunPod endpoint double"))
        yield {**info, "api_key": RUNPOD_API_KEY}
    finally:
        stop(proc)


class RawClient:
    """The baseline: the least a client must do per job. POST /prompt, wait on the websocket for
    ``executing`` with ``node: null``, GET /history, GET /view for each image. One HTTP pool and one
    socket, kept alive across jobs."""

    def __init__(self, url: str):
        self.url = url
        self.client_id = uuid.uuid4().hex

    async def start(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.url, trust_env=False)
        ws_url = self.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        # max_queue=None as in ComfyClient: frames of other clients' jobs (status broadcasts) pile up while
        # this client is idle, and a bounded queue would stall the socket (and its close) on them.
        self.ws = await websockets.connect(ws_url, compression=None, max_size=None, max_queue=None, proxy=None)
        await self.ws.recv()

    async def run(self, prompt: dict[str, Any]) -> list[bytes]:
        resp = await self.http.post("/prompt", json={"prompt": prompt, "client_id": self.client_id})
        prompt_id = resp.json()["prompt_id"]
        while True:
            frame = await self.ws.recv()
            if isinstance(frame, str):
                msg = json.loads(frame)
                data = msg["data"]
                if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
        history = (await self.http.get(f"/history/{prompt_id}")).json()[prompt_id]
        images = []
        for output in history["outputs"].values():
            for image in output.get("images", []):
                images.append((await self.http.get("/view", params=image)).content)
        return images

    async def close(self) -> None:
        await self.ws.close()
        await self.http.aclose()


class StdlibClient:
    """The true floor: the least a client must do per job, on the standard library alone. Blocking
    ``http.client`` with one keep-alive connection, and one websocket spoken by hand over a socket (the
    handshake, unmasked server frames, masked client pongs). POST /prompt, read frames until ``executing`` with
    ``node: null`` for the prompt, GET /history, GET /view for each image."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.client_id = uuid.uuid4().hex

    def start(self) -> None:
        self.http = http.client.HTTPConnection(self.host, self.port)
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"websocket handshake refused: {head[:100]!r}")
        self.buf = bytearray(rest)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[int, bytes]:
        b0, b1 = self._take(2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(self._take(2), "big")
        elif length == 127:
            length = int.from_bytes(self._take(8), "big")
        payload = self._take(length)
        opcode = b0 & 0x0F
        if opcode == 0x9:  # ping: answer with a masked pong
            mask = os.urandom(4)
            self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask
                              + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))
        return opcode, payload

    def _get(self, path: str) -> bytes:
        self.http.request("GET", path)
        return self.http.getresponse().read()

    def run(self, prompt: dict[str, Any]) -> list[bytes]:
        body = json.dumps({"prompt": prompt, "client_id": self.client_id})
        self.http.request("POST", "/prompt", body, {"Content-Type": "application/json"})
        prompt_id = json.loads(self.http.getresponse().read())["prompt_id"]
        while True:
            opcode, payload = self.frame()
            if opcode == 0x1:
                msg = json.loads(payload)
                data = msg["data"]
                if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
        history = json.loads(self._get(f"/history/{prompt_id}"))[prompt_id]
        images = []
        for output in history["outputs"].values():
            for image in output.get("images", []):
                images.append(self._get("/view?" + urllib.parse.urlencode(image)))
        return images

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))
        self.sock.close()
        self.http.close()


# --------------------------------------------------------------------------------------- measurement


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc; Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_mb() -> dict[str, float]:
    """This process's resident set (VmRSS) and its peak (VmHWM), in MiB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def quiet_logs() -> None:
    """Keep the output to the table: the runpod SDK turns on INFO logging for everything it imports, and the
    failover section makes gpubridge warn (on purpose) about dropped websockets."""
    import logging

    for name in ("httpx", "httpcore", "runpod", "websockets", "aiohttp", "uvicorn"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("gpubridge").setLevel(logging.ERROR)


class Counter:
    """A fresh index per job, so no two jobs in a run share a prompt (and ComfyUI's cache)."""

    def __init__(self, start: int = 1):
        self.n = start

    def __call__(self) -> int:
        self.n += 1
        return self.n


@dataclass
class Arm:
    """One side of a comparison: ``run()`` performs one job."""

    name: str
    run: Callable[[], Awaitable[Any]]
    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


async def alternate(arms: list[Arm], jobs: int, block: int, warmup: int = 3) -> None:
    """Run ``jobs`` jobs per arm, sequentially, in blocks of ``block`` that alternate between the arms (the
    order reversed every round, ABBA), after ``warmup`` uncounted jobs per arm. Latency (wall) and this
    process's CPU time are recorded per job, so drift and noise hit every arm alike."""
    for arm in arms:
        for _ in range(warmup):
            await arm.run()
    order = list(arms)
    while min(len(a.latencies) for a in arms) < jobs:
        for arm in order:
            for _ in range(min(block, jobs - len(arm.latencies))):
                c0, t0 = time.process_time(), time.perf_counter()
                await arm.run()
                arm.latencies.append(time.perf_counter() - t0)
                arm.cpu.append(time.process_time() - c0)
        order.reverse()


@dataclass
class Row:
    """One line of the table. ``ratio`` is candidate / baseline; ``result`` is pass, FAIL or info."""

    section: str
    what: str
    baseline: str
    candidate: str
    ratio: float | None
    bound: str
    result: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("section", "what", "baseline", "candidate", "ratio", "bound",
                                              "result", "data")}


def verdict(ok: bool, gate: bool = True) -> str:
    """pass/FAIL; "info" for a row that reports without gating (``gate=False``: in ``--quick`` runs, rows
    whose few samples cannot resolve their bound and failed on noise alone; issue 25, item 7)."""
    if not gate:
        return "info"
    return "pass" if ok else "FAIL"


QUICK_NOTE = " (gates the full run)"
"""Appended to the bound of a row that ``--quick`` reports without gating."""


def ms(seconds: float, digits: int = 2) -> str:
    return f"{seconds * 1000:.{digits}f} ms"


def table(rows: list[Row]) -> str:
    head = ("section", "what", "baseline", "candidate", "ratio", "target/bound", "result")
    body = [(r.section, r.what, r.baseline, r.candidate, "" if r.ratio is None else f"{r.ratio:.2f}x", r.bound,
             r.result) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(x, widths)) + " |" for x in body]
    return "\n".join(lines)
