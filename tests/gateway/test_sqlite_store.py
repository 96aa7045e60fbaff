"""The gateway's SQLite job store: durable, atomic claims across store objects (processes), prompt wakeups."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from gpubridge.errors import ProviderUnavailable
from gpubridge.server.sqlite_store import SQLiteStore


async def test_values_survive_a_new_store_on_the_same_file(tmp_path: Path):
    path = tmp_path / "a" / "jobs.sqlite3"
    first = SQLiteStore(path)
    await first.put("job:1", {"state": "queued", "version": 1, "nested": {"k": [1, 2]}})
    await first.aclose()
    second = SQLiteStore(path)
    try:
        assert await second.get("job:1") == {"state": "queued", "version": 1, "nested": {"k": [1, 2]}}
        assert await second.get("job:2") is None
        await second.delete("job:1")
        await second.delete("job:1")  # absent: no error
        assert await second.get("job:1") is None
    finally:
        await second.aclose()


async def test_put_new_is_won_once_across_store_objects(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    stores = [SQLiteStore(path) for _ in range(4)]
    try:
        won = await asyncio.gather(*(s.put_new("idem:k", {"owner": i}) for i, s in enumerate(stores)))
        assert sorted(won) == [False, False, False, True]
        winner = won.index(True)
        assert await stores[0].get("idem:k") == {"owner": winner}
    finally:
        for s in stores:
            await s.aclose()


def _claim(path: str, key: str, queue: multiprocessing.Queue) -> None:  # in a child process
    async def main() -> bool:
        store = SQLiteStore(path)
        try:
            return await store.put_new(key, {"pid": multiprocessing.current_process().pid})
        finally:
            await store.aclose()

    queue.put(asyncio.run(main()))


def test_put_new_is_won_once_across_processes(tmp_path: Path):
    path = str(tmp_path / "jobs.sqlite3")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(path, "idem:same", queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(results) == [False, False, False, True]


async def test_keys_match_a_literal_prefix(tmp_path: Path):
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    try:
        for key in ("run:a", "run:b", "runX", "run_:c", "job:a", "r%n:z"):
            await store.put(key, {})
        assert sorted(await store.keys("run:")) == ["run:a", "run:b"]
        assert await store.keys("run_") == ["run_:c"]  # _ and % are not wildcards
        assert await store.keys("r%") == ["r%n:z"]
    finally:
        await store.aclose()


async def test_wait_changed_wakes_on_a_write_from_another_store_object(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    waiter, writer = SQLiteStore(path, poll_interval=0.05), SQLiteStore(path)
    try:
        await writer.put("job:1", {"state": "queued", "version": 1})
        task = asyncio.create_task(waiter.wait_changed("job:1", 1, timeout=60))
        await asyncio.sleep(0)
        assert not task.done()
        await writer.put("job:1", {"state": "running", "version": 2})
        await asyncio.wait_for(task, 30)  # well before its own 60 s timeout
        assert (await waiter.get("job:1"))["version"] == 2
    finally:
        await waiter.aclose()
        await writer.aclose()


async def test_a_store_that_cannot_open_is_provider_unavailable(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = SQLiteStore(blocker / "jobs.sqlite3")
    try:
        with pytest.raises(ProviderUnavailable, match="job store"):
            await store.get("job:1")
    finally:
        await store.aclose()


async def test_writes_wait_for_another_writer_off_the_event_loop_and_keep_their_order(tmp_path: Path):
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    store = SQLiteStore(path)
    try:
        await store.put("job:1", {"version": 1})
        await store.put("job:1", {"version": 2})  # on the event loop's own connection by now
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        first = asyncio.create_task(store.put("job:1", {"version": 3}))
        second = asyncio.create_task(store.apply({"job:1": {"version": 4}}, ["job:gone"]))
        ticks = 0
        while not (first.done() and second.done()):
            await asyncio.sleep(0)  # the loop keeps running while both writes wait for the lock
            ticks += 1
            if ticks == 50:
                assert not first.done() and not second.done()
                other.execute("COMMIT")
        await asyncio.gather(first, second)
        other.close()
        assert await store.get("job:1") == {"version": 4}  # in call order, not 3 after 4
    finally:
        await store.aclose()
