"""SQLite storage: versioned schema, persistence across a process restart, writes off the event loop."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gpubridge.errors import ConfigError
from gpubridge.shadow import store
from gpubridge.shadow.store import SCHEMA_VERSION, SQLiteSink, read_records

from .helpers import record

ROOT = Path(__file__).resolve().parents[2]


def test_records_persist_across_a_process_restart(tmp_path: Path):
    db = tmp_path / "shadow.sqlite3"
    writer = textwrap.dedent(f"""
        import asyncio
        from gpubridge.shadow.store import SQLiteSink
        from tests.shadow.helpers import record

        async def main():
            sink = SQLiteSink({str(db)!r})
            await sink.write(record("wf-a", ctl_s=1.5, cand_s=2.5, ctl_cost=0.01, at=1000.0))
            await sink.write(record("wf-a", "noise", distance=3.0, at=1001.0))
            await sink.write(record("wf-b", cand_ok=False, cand_err="JobTimeout", at=1002.0))
            await sink.aclose()

        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", writer], cwd=ROOT, check=True, timeout=60)

    records = read_records(db)  # this process never wrote to it
    assert [(r.workflow, r.kind, r.created_at) for r in records] == [
        ("wf-a", "candidate", 1000.0), ("wf-a", "noise", 1001.0), ("wf-b", "candidate", 1002.0)
    ]
    assert records[0].control.total_s == 1.5 and records[0].control.cost_usd == 0.01
    assert records[1].phash_distance == 3.0
    assert records[2].candidate.error_type == "JobTimeout"
    assert [r.created_at for r in read_records(db, since=1001.0)] == [1001.0, 1002.0]
    assert [r.created_at for r in read_records(db, since=1000.0, until=1002.0)] == [1000.0, 1001.0]


async def test_schema_is_versioned_and_reopening_keeps_records(tmp_path: Path):
    db = tmp_path / "deep" / "dir" / "shadow.sqlite3"
    sink = SQLiteSink(db)
    await sink.write(record("w", at=1.0))
    await sink.aclose()
    again = SQLiteSink(db)
    assert again.open() == SCHEMA_VERSION  # migrating an up-to-date file is a no-op
    await again.write(record("w", at=2.0))
    await again.aclose()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT version, description FROM schema_migrations").fetchall()
    conn.close()
    assert rows == [(1, "comparisons table")]
    assert [r.created_at for r in read_records(db)] == [1.0, 2.0]


async def test_a_newer_schema_is_refused(tmp_path: Path):
    db = tmp_path / "shadow.sqlite3"
    sink = SQLiteSink(db)
    sink.open()  # creates the schema at the current version
    sink.close()
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="newer"):
        read_records(db)
    with pytest.raises(ConfigError, match="newer"):
        SQLiteSink(db).open()


def test_missing_file_has_no_records_and_a_foreign_file_is_refused(tmp_path: Path):
    assert read_records(tmp_path / "absent.sqlite3") == []
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ConfigError, match="not a gpubridge shadow database"):
        read_records(other)


async def test_writes_run_off_the_event_loop_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    threads: list[int] = []
    real_insert = store._insert

    def spy(conn, records):
        threads.append(threading.get_ident())
        return real_insert(conn, records)

    monkeypatch.setattr(store, "_insert", spy)
    sink = SQLiteSink(tmp_path / "s.sqlite3")
    await sink.write(record("w"))
    await sink.write(record("w"))
    await sink.aclose()
    assert len(threads) == 2 and len(set(threads)) == 1 and threads[0] != threading.get_ident()
    with pytest.raises(RuntimeError):
        await sink.write(record("w"))
