"""Job records in PostgreSQL: several gateway replicas share jobs, leases and idempotency keys.

One table of JSON values by key (``gpubridge_kv``, created on first use). ``put_new`` is one
``INSERT ... ON CONFLICT DO NOTHING``: of two replicas claiming the same key, exactly one wins. Every write
sends ``NOTIFY gpubridge_kv`` with the key in the same transaction, and a listening connection wakes
:meth:`wait_changed` on every replica at once (long-polls answer as soon as a job moves, wherever it moved);
a poll every ``poll_interval`` seconds covers a notification lost with a dropped connection.

A database that cannot be reached raises :class:`~gpubridge.errors.ProviderUnavailable` (retryable): it
never ends a job. Needs the ``postgres`` extra (psycopg 3 and its pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from gpubridge.errors import ConfigError, ProviderUnavailable, redact_url

from .store import ChangeSignal, JobStore

__all__ = ["PostgresStore"]

log = logging.getLogger("gpubridge.server")

_CHANNEL = "gpubridge_kv"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS gpubridge_kv (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


class PostgresStore(JobStore):
    """A :class:`JobStore` in the PostgreSQL database at ``url`` (``postgresql://user:pass@host/db``)."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10, poll_interval: float = 1.0,
                 connect_timeout: float = 10.0):
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:  # pragma: no cover - the extra is missing
            raise ConfigError("GPUBRIDGE_DATABASE_URL needs the postgres extra: pip install 'gpubridge[postgres]'") from None
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None
        self._listener: asyncio.Task[None] | None = None
        self._signal = ChangeSignal()  # fired by every notification, and by writes made here
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    # ------------------------------------------------------------------------------------------ plumbing

    def _unavailable(self, exc: BaseException) -> ProviderUnavailable:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ProviderUnavailable(f"The job database {redact_url(self.url)} is unavailable: {text}",
                                   provider="gateway")

    async def _ready(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                from psycopg_pool import AsyncConnectionPool

                pool = AsyncConnectionPool(self.url, min_size=self.min_size, max_size=self.max_size, open=False,
                                           timeout=self.connect_timeout, kwargs={"autocommit": True})
                try:
                    await pool.open(wait=True, timeout=self.connect_timeout)
                    async with pool.connection() as conn, conn.transaction():
                        # Replicas starting together: one creates the table, the others wait for it.
                        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('gpubridge_kv'))")
                        await conn.execute(_SCHEMA)
                except Exception as exc:
                    await pool.close()
                    raise self._unavailable(exc) from None
                self._pool = pool
                self._listener = asyncio.get_running_loop().create_task(self._listen(), name="gpubridge-pg-listen")
        return self._pool

    async def _run(self, sql: str, params: tuple[Any, ...], fetch: str | None = None) -> Any:
        import psycopg

        pool = await self._ready()
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(sql, params)
                if fetch == "one":
                    return await cur.fetchone()
                if fetch == "all":
                    return await cur.fetchall()
                return cur.rowcount
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise self._unavailable(exc) from None
        except Exception as exc:
            from psycopg_pool import PoolTimeout

            if isinstance(exc, PoolTimeout):
                raise self._unavailable(exc) from None
            raise

    async def _listen(self) -> None:
        """One connection LISTENs; each notification wakes the waiters. Reconnects after a drop."""
        import psycopg

        backoff = 0.2
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                             connect_timeout=int(self.connect_timeout))
                async with conn:
                    await conn.execute(f"LISTEN {_CHANNEL}")
                    backoff = 0.2
                    await self._wake()  # anything may have changed while we were not listening
                    async for _note in conn.notifies():
                        await self._wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: waiters fall back to polling meanwhile
                log.warning("job database listener: %s; reconnecting", type(exc).__name__)
            await asyncio.sleep(backoff)  # reconnect pacing
            backoff = min(backoff * 2, 5.0)

    async def _wake(self) -> None:
        await self._signal.fire()

    # ------------------------------------------------------------------------------------------ JobStore

    async def get(self, key: str) -> dict[str, Any] | None:
        row = await self._run("SELECT value FROM gpubridge_kv WHERE key = %s", (key,), "one")
        return row[0] if row else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self._run(
            "WITH w AS (INSERT INTO gpubridge_kv (key, value) VALUES (%s, %s::jsonb) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now() RETURNING key) "
            f"SELECT pg_notify('{_CHANNEL}', key) FROM w",
            (key, json.dumps(value, separators=(",", ":"))), "one",
        )
        await self._wake()

    async def put_new(self, key: str, value: dict[str, Any]) -> bool:
        row = await self._run(
            "WITH w AS (INSERT INTO gpubridge_kv (key, value) VALUES (%s, %s::jsonb) "
            "ON CONFLICT (key) DO NOTHING RETURNING key) "
            f"SELECT pg_notify('{_CHANNEL}', key) FROM w",
            (key, json.dumps(value, separators=(",", ":"))), "one",
        )
        if row is not None:
            await self._wake()
        return row is not None

    async def delete(self, key: str) -> None:
        await self._run(
            f"WITH w AS (DELETE FROM gpubridge_kv WHERE key = %s RETURNING key) SELECT pg_notify('{_CHANNEL}', key) FROM w",
            (key,), "one",
        )
        await self._wake()

    async def apply(self, puts: Mapping[str, dict[str, Any]], deletes: Sequence[str] = ()) -> None:
        """All of it in one transaction (every key notified at its commit)."""
        import psycopg

        pool = await self._ready()
        try:
            async with pool.connection() as conn, conn.transaction():
                for key, value in puts.items():
                    await conn.execute(
                        "INSERT INTO gpubridge_kv (key, value) VALUES (%s, %s::jsonb) ON CONFLICT (key) DO UPDATE "
                        "SET value = EXCLUDED.value, updated_at = now()",
                        (key, json.dumps(value, separators=(",", ":"))))
                for key in deletes:
                    await conn.execute("DELETE FROM gpubridge_kv WHERE key = %s", (key,))
                for key in [*puts, *deletes]:
                    await conn.execute(f"SELECT pg_notify('{_CHANNEL}', %s)", (key,))
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise self._unavailable(exc) from None
        await self._wake()

    async def keys(self, prefix: str) -> list[str]:
        rows = await self._run("SELECT key FROM gpubridge_kv WHERE starts_with(key, %s)", (prefix,), "all")
        return [r[0] for r in rows]

    async def wait_changed(self, key: str, version: int, timeout: float) -> None:
        await self._signal.wait_changed(self.get, key, version, timeout, self.poll_interval)

    async def aclose(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
