"""Where shadow records go: the :class:`ShadowSink` protocol, :class:`SQLiteSink` (the default) and
:class:`MemorySink`.

The SQLite file defaults to ``$XDG_DATA_HOME/gpubridge/shadow.sqlite3`` (``~/.local/share/...``); set
``[shadow_options] db`` to move it. Its schema is versioned: the ``schema_migrations`` table lists the
migrations applied, and opening a file applies the missing ones in order, in one transaction each. A file
written by a newer gpubridge (an unknown version) is refused rather than guessed at.

Writes never block the event loop: they run on one dedicated thread that owns the connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError
from .compare import Comparison

__all__ = ["ShadowSink", "SQLiteSink", "MemorySink", "SCHEMA_VERSION", "read_records"]

_MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "comparisons table",
        """
        CREATE TABLE comparisons (
            id          TEXT PRIMARY KEY,
            created_at  REAL NOT NULL,
            kind        TEXT NOT NULL,
            workflow    TEXT NOT NULL,
            outcome     TEXT NOT NULL,
            control     TEXT,
            candidate   TEXT,
            record      TEXT NOT NULL
        );
        CREATE INDEX comparisons_created_at ON comparisons (created_at);
        CREATE INDEX comparisons_workflow ON comparisons (workflow, kind);
        """,
    ),
]
SCHEMA_VERSION = _MIGRATIONS[-1][0]


@runtime_checkable
class ShadowSink(Protocol):
    """Receives comparison records. ``write`` must not block the event loop; errors it raises are logged
    and counted by the shadow runner, never passed to the caller."""

    async def write(self, record: Comparison) -> None: ...

    async def aclose(self) -> None: ...


class MemorySink:
    """Keeps records in a list (tests, and embedding the report in an application)."""

    def __init__(self) -> None:
        self.records: list[Comparison] = []

    async def write(self, record: Comparison) -> None:
        self.records.append(record)

    async def aclose(self) -> None:
        pass


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the missing migrations; return the schema version. Refuses a newer, unknown version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    current = row[0] or 0
    if current > SCHEMA_VERSION:
        raise ConfigError(
            f"The shadow database has schema version {current}, newer than this gpubridge knows "
            f"({SCHEMA_VERSION}). Upgrade gpubridge or point [shadow_options] db at another file."
        )
    for version, description, sql in _MIGRATIONS:
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            again = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone()
            if again is None:  # another process may have applied it meanwhile
                for statement in filter(str.strip, sql.split(";")):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                    (version, description, time.time()),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _insert(conn: sqlite3.Connection, records: Iterable[Comparison]) -> None:
    rows = [
        (
            r.id,
            r.created_at,
            r.kind,
            r.workflow,
            r.outcome.value,
            r.control.provider,
            r.candidate.provider,
            r.model_dump_json(),
        )
        for r in records
    ]
    conn.executemany(
        "INSERT OR REPLACE INTO comparisons (id, created_at, kind, workflow, outcome, control, candidate, "
        "record) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def read_records(
    path: str | Path, *, since: float | None = None, until: float | None = None
) -> list[Comparison]:
    """Records in ``path`` created within [since, until), oldest first. A missing file has none."""
    path = Path(path).expanduser()
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_migrations" not in tables:
            raise ConfigError(f"{path} is not a gpubridge shadow database.")
        version = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{path} has schema version {version}, newer than this gpubridge ({SCHEMA_VERSION})."
            )
        if "comparisons" not in tables:
            return []
        sql = ("SELECT record FROM comparisons WHERE created_at >= ? AND created_at < ? "
               "ORDER BY created_at, id")
        rows = conn.execute(sql, (since if since is not None else float("-inf"),
                                  until if until is not None else float("inf"))).fetchall()
    finally:
        conn.close()
    return [Comparison.model_validate_json(row[0]) for row in rows]


class SQLiteSink:
    """Stores records in a SQLite file, from one writer thread (the event loop only hands records over).

    The schema is created or migrated on the first write (or :meth:`open`), in the writer thread.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpubridge-shadow-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _ensure(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = _connect(self.path)
            try:
                migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _write_sync(self, records: list[Comparison]) -> None:
        with self._lock:
            _insert(self._ensure(), records)

    def open(self) -> int:
        """Create or migrate the schema now (blocking); return its version."""
        with self._lock:
            self._ensure()
        return SCHEMA_VERSION

    async def write(self, record: Comparison) -> None:
        if self._closed:
            raise RuntimeError("SQLiteSink is closed")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write_sync, [record])

    async def write_many(self, records: Iterable[Comparison]) -> None:
        """Write several records in one transaction (imports, tests)."""
        if self._closed:
            raise RuntimeError("SQLiteSink is closed")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write_sync, list(records))

    def read(self, *, since: float | None = None, until: float | None = None) -> list[Comparison]:
        return read_records(self.path, since=since, until=until)

    def _close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=False)

    def close(self) -> None:
        """Close from synchronous code (waits for pending writes)."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._close_sync).result()
        self._executor.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"<SQLiteSink {str(self.path)!r}>"


# ------------------------------------------------------------------------------------------- PostgreSQL

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS gpubridge_shadow (
    id         text PRIMARY KEY,
    created_at double precision NOT NULL,
    kind       text NOT NULL,
    workflow   text,
    outcome    text NOT NULL,
    control    text,
    candidate  text,
    record     jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS gpubridge_shadow_created ON gpubridge_shadow (created_at)
"""


def _pg_rows(records: Iterable[Comparison]) -> list[tuple[Any, ...]]:
    return [(r.id, r.created_at, r.kind, r.workflow, r.outcome.value, r.control.provider, r.candidate.provider,
             r.model_dump_json()) for r in records]


class PostgresSink:
    """Stores shadow records in PostgreSQL (``GPUBRIDGE_DATABASE_URL``), so every gateway replica's pairs
    land in one place and one report judges them all. Needs the ``postgres`` extra."""

    def __init__(self, url: str):
        self.url = url
        self._conn: Any = None
        self._lock: asyncio.Lock | None = None
        self._closed = False

    def __repr__(self) -> str:
        from ..errors import redact_url

        return f"PostgresSink({redact_url(self.url)!r})"

    async def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('gpubridge_shadow'))")
                for statement in filter(str.strip, _PG_SCHEMA.split(";")):
                    await conn.execute(statement)
            self._conn = conn
        return self._conn

    async def write_many(self, records: Iterable[Comparison]) -> None:
        if self._closed:
            raise RuntimeError("PostgresSink is closed")
        rows = _pg_rows(records)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one connection, one statement at a time
            conn = await self._connection()
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO gpubridge_shadow (id, created_at, kind, workflow, outcome, control, candidate, "
                    "record) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb) ON CONFLICT (id) DO UPDATE SET "
                    "record = EXCLUDED.record, outcome = EXCLUDED.outcome", rows)

    async def write(self, record: Comparison) -> None:
        await self.write_many([record])

    def read(self, *, since: float | None = None, until: float | None = None) -> list[Comparison]:
        return read_records_pg(self.url, since=since, until=until)

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def read_records_pg(url: str, *, since: float | None = None, until: float | None = None) -> list[Comparison]:
    """Records in the PostgreSQL database at ``url`` created within [since, until), oldest first."""
    import psycopg

    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('gpubridge_shadow')").fetchone()
        if exists is None or exists[0] is None:
            return []
        rows = conn.execute(
            "SELECT record FROM gpubridge_shadow WHERE created_at >= %s AND created_at < %s ORDER BY created_at, id",
            (since if since is not None else float("-inf"), until if until is not None else float("inf")),
        ).fetchall()
    return [Comparison.model_validate(row[0]) for row in rows]


def open_sink(settings: Any) -> ShadowSink:
    """Where shadow records go: PostgreSQL with ``database_url``, else the SQLite file of ``[shadow_options]``."""
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    if url:
        return PostgresSink(url)
    return SQLiteSink(settings.shadow_options.db_path())
