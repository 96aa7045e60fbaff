"""Which job store a server uses: PostgreSQL when a database URL is given (several replicas share it),
else SQLite in the server's data directory (one host, durable across restarts)."""

from __future__ import annotations

from pathlib import Path

from gpubridge.errors import ConfigError

from .store import JobStore

__all__ = ["open_store", "default_data_dir"]


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/gpubridge`` (``~/.local/share/gpubridge``)."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpubridge"


def open_store(data_dir: str | Path, database_url: str | None = None) -> JobStore:
    """The job store for a server: ``database_url`` (``postgresql://...``) or SQLite in ``data_dir``."""
    if database_url:
        if database_url.startswith(("postgresql://", "postgres://")):
            from .postgres_store import PostgresStore

            return PostgresStore(database_url)
        raise ConfigError("GPUBRIDGE_DATABASE_URL must be a postgresql:// URL")
    from .sqlite_store import SQLiteStore

    return SQLiteStore(Path(data_dir) / "jobs.sqlite3")
