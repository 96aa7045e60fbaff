"""Job records in SQLite: the gateway's default store, durable across restarts (and SIGKILL).

One table of JSON values by key, in WAL mode (readers never block the writer; a killed process loses no
committed write). Every call runs on one worker thread, so the event loop never blocks on the disk.
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
from pathlib import Path
from typing import Any

from gpubridge.errors import ProviderUnavailable

from .store import JobStore, is_terminal_value

__all__ = ["SQLiteStore"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


class SQLiteStore(JobStore):
    """A :class:`JobStore` in the SQLite file ``path`` (created with its folder if missing)."""

    def __init__(self, path: str | Path, *, poll_interval: float = 0.25, busy_timeout: float = 30.0):
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpubridge-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._changed: asyncio.Condition | None = None
        self._writes = 0  # writes made through this object, so a waiter cannot miss one

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

    def _get(self, key: str) -> str | None:
        row = self._connect().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _put(self, key: str, value: str) -> None:
        self._connect().execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def _put_new(self, key: str, value: str) -> bool:
        return self._connect().execute("INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)", (key, value)).rowcount == 1

    def _delete(self, key: str) -> None:
        self._connect().execute("DELETE FROM kv WHERE key = ?", (key,))

    def _keys(self, prefix: str) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._connect().execute("SELECT key FROM kv WHERE key LIKE ? ESCAPE '\\'", (escaped + "%",))
        return [r[0] for r in rows]

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the event loop's side

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except (sqlite3.OperationalError, OSError) as exc:  # locked, full or unreadable: retryable, never a job's end
            raise ProviderUnavailable(f"The job store {self.path} is unavailable: {exc}", provider="gateway") from None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        self._writes += 1
        cond = self._cond()
        async with cond:
            cond.notify_all()

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._run(self._get, key)
        return json.loads(raw) if raw is not None else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self._run(self._put, key, json.dumps(value, separators=(",", ":")))
        await self._notify()

    async def put_new(self, key: str, value: dict[str, Any]) -> bool:
        stored = await self._run(self._put_new, key, json.dumps(value, separators=(",", ":")))
        if stored:
            await self._notify()
        return bool(stored)

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key)
        await self._notify()

    async def keys(self, prefix: str) -> list[str]:
        return list(await self._run(self._keys, prefix))

    async def wait_changed(self, key: str, version: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        cond = self._cond()
        while True:
            seen = self._writes
            value = await self.get(key)
            if value is None or value.get("version", 0) > version or is_terminal_value(value):
                return
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            async with cond:  # a write here wakes us at once; another process's within poll_interval
                if self._writes == seen:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cond.wait(), min(remaining, self.poll_interval))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        self._pool.shutdown(wait=False)
