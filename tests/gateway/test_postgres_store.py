"""The PostgreSQL job store on a real server: atomic claims across store objects, prefix listing, and
notifications that wake a waiter on another store object (another replica) at once."""

from __future__ import annotations

import asyncio

import pytest

from gpubridge.errors import ProviderUnavailable
from gpubridge.server.postgres_store import PostgresStore


async def test_values_round_trip_and_delete(pg_store: PostgresStore):
    await pg_store.put("job:1", {"state": "queued", "version": 1, "tags": {"a": "b"}})
    assert await pg_store.get("job:1") == {"state": "queued", "version": 1, "tags": {"a": "b"}}
    await pg_store.put("job:1", {"state": "running", "version": 2})
    assert (await pg_store.get("job:1"))["version"] == 2
    await pg_store.delete("job:1")
    await pg_store.delete("job:1")
    assert await pg_store.get("job:1") is None


async def test_put_new_is_won_once_across_replicas(pg_store: PostgresStore, postgres_url: str):
    others = [PostgresStore(postgres_url) for _ in range(3)]
    try:
        stores = [pg_store, *others]
        won = await asyncio.gather(*(s.put_new("idem:k", {"owner": i}) for i, s in enumerate(stores)))
        assert sorted(won) == [False, False, False, True]
        assert await others[0].get("idem:k") == {"owner": won.index(True)}
    finally:
        for s in others:
            await s.aclose()


async def test_keys_match_a_literal_prefix(pg_store: PostgresStore):
    for key in ("run:a", "run:b", "runX", "run_:c", "r%n:z"):
        await pg_store.put(key, {})
    assert sorted(await pg_store.keys("run:")) == ["run:a", "run:b"]
    assert await pg_store.keys("run_") == ["run_:c"]
    assert await pg_store.keys("r%") == ["r%n:z"]


async def test_a_write_on_one_replica_wakes_a_waiter_on_another(pg_store: PostgresStore, postgres_url: str):
    waiter = PostgresStore(postgres_url, poll_interval=60.0)  # only a notification can wake it in time
    try:
        await pg_store.put("job:1", {"state": "queued", "version": 1})
        await waiter.get("job:1")  # connected and listening
        task = asyncio.create_task(waiter.wait_changed("job:1", 1, timeout=120))
        await asyncio.sleep(0)
        assert not task.done()
        await pg_store.put("job:1", {"state": "running", "version": 2})
        await asyncio.wait_for(task, 30)
    finally:
        await waiter.aclose()


async def test_an_unreachable_database_is_provider_unavailable_without_the_password():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = PostgresStore(f"postgresql://u:hunter2@127.0.0.1:{port}/db", connect_timeout=2)
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await store.get("job:1")
        assert "hunter2" not in str(info.value) and "hunter2" not in repr(store)
    finally:
        await store.aclose()
