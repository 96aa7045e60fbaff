"""Job records in SQLite: the gateway's default store, durable across restarts (and SIGKILL).

One table of JSON values by key, in WAL mode (readers never block the writer; a killed process loses no
committed write). A call first runs on the event loop on a connection that never waits (no lock wait, no
checkpoint: tens of microseconds); whenever it would wait it goes to one worker thread instead, which also
keeps the write-ahead log short, so the event loop never blocks on a lock or a checkpoint.
``put_new`` is a single ``INSERT OR IGNORE``: atomic across processes sharing the file. Changes made in
this process wake :meth:`wait_changed` at once; changes made by another process are seen within
``poll_interval`` seconds.

SQLite serves one host. Several gateway replicas share a PostgreSQL database instead
(``GPUBRIDGE_DATABASE_URL``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpubridge.errors import ProviderUnavailable

from .store import ChangeSignal, JobStore

__all__ = ["SQLiteStore"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


class SQLiteStore(JobStore):
    """A :class:`JobStore` in the SQLite file ``path`` (created with its folder if missing)."""

    def __init__(self, path: str | Path, *, poll_interval: float = 0.25, busy_timeout: float = 30.0,
                 inline: bool = True):
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpubridge-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._signal = ChangeSignal()  # this object's writes wake its waiters at once
        self.inline = inline
        self._inline: sqlite3.Connection | None = None
        self._inline_writes = 0
        self._queued = 0  # writes handed to the worker thread and not done yet

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- the worker thread's side

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            # Switching to WAL needs a moment alone with the file: two processes opening it at once may be
            # told "locked" even with a busy timeout. Retry briefly; once set it persists in the file.
            deadline = time.monotonic() + self.busy_timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute(_SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        conn.close()
                        raise
                    time.sleep(0.01)  # another process holds the file for a moment
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
        return self._conn

    def _get(self, key: str, conn: sqlite3.Connection | None = None) -> str | None:
        row = (conn or self._connect()).execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _put(self, key: str, value: str, conn: sqlite3.Connection | None = None) -> None:
        (conn or self._connect()).execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def _put_new(self, key: str, value: str, conn: sqlite3.Connection | None = None) -> bool:
        return (conn or self._connect()).execute("INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)", (key, value)).rowcount == 1

    def _delete(self, key: str, conn: sqlite3.Connection | None = None) -> None:
        (conn or self._connect()).execute("DELETE FROM kv WHERE key = ?", (key,))

    def _keys(self, prefix: str, conn: sqlite3.Connection | None = None) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = (conn or self._connect()).execute("SELECT key FROM kv WHERE key LIKE ? ESCAPE '\\'", (escaped + "%",))
        return [r[0] for r in rows]

    def _apply(self, puts: list[tuple[str, str]], deletes: list[str], conn: sqlite3.Connection | None = None) -> None:
        conn = conn or self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if puts:
                conn.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", puts)
            if deletes:
                conn.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in deletes])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _checkpoint(self) -> None:
        self._connect().execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- the event loop's side

    def _inline_conn(self) -> sqlite3.Connection | None:
        """A second connection used on the event loop itself: it never waits for a lock (busy_timeout 0)
        and never checkpoints, so a call on it costs tens of microseconds; the worker thread's connection
        takes over whenever it would wait, and does the checkpoints."""
        if self._inline is None and self._conn is not None:  # after the worker made the file and table
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._inline = conn
        return self._inline

    async def _run(self, fn: Any, *args: Any, write: bool = False) -> Any:
        # Writes stay in call order: while one waits on the worker thread, later ones queue behind it.
        conn = self._inline_conn() if self.inline and not (write and self._queued) else None
        if conn is not None:
            try:
                result = fn(*args, conn)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise ProviderUnavailable(f"The job store {self.path} is unavailable: {exc}",
                                              provider="gateway") from None
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                if write:
                    self._inline_writes += 1
                    if self._inline_writes % 500 == 0:  # keep the WAL short, off the event loop
                        self._pool.submit(self._checkpoint)
                return result
        if write:
            self._queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except (sqlite3.OperationalError, OSError) as exc:  # locked, full or unreadable: retryable, never a job's end
            raise ProviderUnavailable(f"The job store {self.path} is unavailable: {exc}", provider="gateway") from None
        finally:
            if write:
                self._queued -= 1

    async def _notify(self) -> None:
        await self._signal.fire()

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._run(self._get, key)
        return json.loads(raw) if raw is not None else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self._run(self._put, key, json.dumps(value, separators=(",", ":")), write=True)
        await self._notify()

    async def put_new(self, key: str, value: dict[str, Any]) -> bool:
        stored = await self._run(self._put_new, key, json.dumps(value, separators=(",", ":")), write=True)
        if stored:
            await self._notify()
        return bool(stored)

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key, write=True)
        await self._notify()

    async def apply(self, puts: Mapping[str, dict[str, Any]], deletes: Sequence[str] = ()) -> None:
        """All of it in one transaction, in one trip to the worker thread."""
        rows = [(k, json.dumps(v, separators=(",", ":"))) for k, v in puts.items()]
        await self._run(self._apply, rows, list(deletes), write=True)
        await self._notify()

    async def keys(self, prefix: str) -> list[str]:
        return list(await self._run(self._keys, prefix))

    async def wait_changed(self, key: str, version: int, timeout: float) -> None:
        await self._signal.wait_changed(self.get, key, version, timeout, self.poll_interval)

    async def aclose(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        self._pool.shutdown(wait=False)
