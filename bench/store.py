"""Peak memory of `gpubridge run` saving a 200 MB artifact that the backend returned as a presigned URL
(issue 14: URL artifacts are streamed to disk, never held whole).

    python -m bench.store [--quick] [--mb 200]

Every server is a process of its own: an S3-protocol server on loopback (moto's server mode), the ComfyUI
double (its ``output_size`` fault pads the saved video to the size), and the job API (``modal_app.serve``)
with ``GPUBRIDGE_STORE_*`` set, so its worker uploads the output and returns a URL. The number is the peak
RSS (``ru_maxrss`` of the finished child) of ``gpubridge run --provider modal ... --out DIR`` for the large
output minus the same command's for a 1 KB output (bound +100 MB), and the bytes on disk are checked.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench._harness import ROOT, Row, _wait_http, comfy_server, free_port, stop, table, verdict

BOUND_MB = 100.0
VIDEO = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 255}},
    "2": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "clip", "codec": "vp9",
                                               "fps": 24.0, "crf": 32.0}},
}
STORE_ENV = {"GPUBRIDGE_STORE_URL": "s3://bench/out", "GPUBRIDGE_STORE_REGION": "us-east-1",
             "GPUBRIDGE_STORE_ACCESS_KEY_ID": "bench", "GPUBRIDGE_STORE_SECRET_ACCESS_KEY": "bench",
             "GPUBRIDGE_STORE_THRESHOLD": "all"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/", proc, "the S3 server")
        httpx.put(f"{url}/bench").raise_for_status()  # the bucket (moto takes anonymous requests)
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def job_api(comfy_url: str, s3_url: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, **STORE_ENV, "GPUBRIDGE_STORE_ENDPOINT_URL": s3_url,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "modal_app.serve", "--comfy-url", comfy_url, "--port", str(port),
                             "--allow-anonymous"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/openapi.json", proc, "the job API")
        yield url
    finally:
        stop(proc)


def _run(api: str, workflow: Path, out: Path) -> tuple[float, list[Path]]:
    """`gpubridge run` in a child process; its peak RSS in MB and the files it wrote."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBRIDGE_STORE_")}
    env.update(GPUBRIDGE_MODAL_URL=api, GPUBRIDGE_MODAL_TOKEN="unused")
    proc = subprocess.Popen([sys.executable, "-m", "gpubridge.cli", "run", "--provider", "modal", str(workflow),
                             "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"gpubridge run exited {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
    proc.stderr.close()
    return usage.ru_maxrss / 1024, sorted(out.iterdir())


def run(quick: bool = False, mb: int = 200) -> list[Row]:
    size = mb * 1_000_000
    with tempfile.TemporaryDirectory(prefix="gpubridge-bench-store-") as tmp, s3_server() as s3, \
            comfy_server() as comfy, job_api(comfy.url, s3) as api:
        workflow = Path(tmp) / "video.json"
        workflow.write_text(json.dumps(VIDEO))
        httpx.post(f"{comfy.url}/gpubridge/faults", json={"output_size": 1000}).raise_for_status()
        base_mb, _ = _run(api, workflow, Path(tmp) / "small")
        httpx.post(f"{comfy.url}/gpubridge/faults", json={"output_size": size}).raise_for_status()
        big_mb, files = _run(api, workflow, Path(tmp) / "big")
        ok_bytes = len(files) == 1 and files[0].stat().st_size == size
        digest = hashlib.sha256(files[0].read_bytes()).hexdigest()[:12] if ok_bytes else "-"
    delta = big_mb - base_mb
    return [Row("store", f"`gpubridge run --out` saving a {mb} MB URL artifact: peak RSS over a 1 KB one",
                f"{base_mb:.0f} MB", f"{big_mb:.0f} MB", None, f"+{BOUND_MB:.0f} MB",
                verdict(delta <= BOUND_MB and ok_bytes),
                {"base_mb": base_mb, "big_mb": big_mb, "delta_mb": delta, "bytes_ok": ok_bytes, "sha256": digest})]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    rows = run(args.quick, args.mb)
    print(table(rows))
    sys.exit(0 if all(r.result != "FAIL" for r in rows) else 1)


if __name__ == "__main__":
    main()
