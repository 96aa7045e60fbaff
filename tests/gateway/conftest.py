"""Fixtures for the gateway: the ComfyUI double, the local provider, a SQLite job store in tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpubridge.models import JobRequest, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.server.sqlite_store import SQLiteStore
from gpubridge.testing import ComfyDouble

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"


class FakeClock:
    """Wall time that moves only when the test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def invert(**values: Any) -> Workflow:
    wf = Workflow.load(WORKFLOWS / "model_free_invert.json")
    return wf.with_values(values) if values else wf


def request(**options: Any) -> JobRequest:
    return JobRequest(workflow=invert(), **options)


@pytest.fixture
async def comfy(tmp_path: Path):
    async with ComfyDouble(root=tmp_path / "comfy", cache=False) as double:
        yield double


@pytest.fixture
async def local(comfy: ComfyDouble):
    runner = LocalRunner(comfy.url, reconnect_timeout=2.0, cancel_wait=10.0)
    yield runner
    await runner.aclose()


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "gw" / "jobs.sqlite3", poll_interval=0.05)
    yield s
    await s.aclose()


# ------------------------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server for this test run, on 127.0.0.1 (initdb + pg_ctl from the system's
    PostgreSQL; `.ci/run` installs it). As root it runs as the ``postgres`` user, as PostgreSQL requires."""
    import os
    import pwd
    import socket
    import subprocess

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    import shutil
    import tempfile

    # Not under pytest's tmp dir: as root that is private to root, and the server runs as ``postgres``.
    root = Path(tempfile.mkdtemp(prefix="gpubridge-pg-"))
    data = root / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chmod(root, 0o700)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "gpubridge", "--no-sync"],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"initdb failed: {done.stdout}{done.stderr}"
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://gpubridge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def pg_store(postgres_url: str):
    """A PostgresStore on a fresh table set: every test starts with no keys."""
    import psycopg

    from gpubridge.server.postgres_store import PostgresStore

    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("DROP TABLE IF EXISTS gpubridge_kv")
    store = PostgresStore(postgres_url, poll_interval=0.2)
    yield store
    await store.aclose()
