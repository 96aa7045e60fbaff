"""Shadow records in PostgreSQL (GPUBRIDGE_DATABASE_URL): every replica's pairs in one table, and
``gpubridge shadow report`` judging them from there, with the same figures as from SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.config import Settings
from gpubridge.shadow.store import PostgresSink, SQLiteSink, open_sink, read_records_pg

from ..shadow.test_report import fixture


async def test_records_written_by_two_replicas_are_read_back_in_order(postgres_url: str):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS gpubridge_shadow")
    records = fixture()
    a, b = PostgresSink(postgres_url), PostgresSink(postgres_url)
    try:
        await a.write_many(records[::2])
        for rec in records[1::2]:
            await b.write(rec)
        await a.write(records[0])  # written again (a retry): still one row
    finally:
        await a.aclose()
        await b.aclose()
    back = read_records_pg(postgres_url)
    assert sorted(r.id for r in back) == sorted(r.id for r in records)
    assert [r.created_at for r in back] == sorted(r.created_at for r in records)
    assert back == sorted(records, key=lambda r: (r.created_at, r.id))


def test_the_sink_follows_the_database_url(postgres_url: str, tmp_path: Path):
    assert isinstance(open_sink(Settings(database_url=postgres_url)), PostgresSink)
    assert "@" not in repr(open_sink(Settings(database_url="postgresql://u:pw@h/db"))).replace("***@", "")
    assert isinstance(open_sink(Settings()), SQLiteSink)


async def test_shadow_report_reads_the_database(postgres_url: str, in_tmp: Path, monkeypatch):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS gpubridge_shadow")
    sink = PostgresSink(postgres_url)
    await sink.write_many(fixture())
    await sink.aclose()
    (in_tmp / "gpubridge.toml").write_text(
        "[shadow_options]\nmin_noise_pairs = 5\nnoise_margin = 2\n"
        "[shadow_options.thresholds]\nmin_samples = 4\nmax_success_rate_drop = 0.1\n"
        "max_mismatch_rate = 0.05\n"
    )
    monkeypatch.setenv("GPUBRIDGE_DATABASE_URL", postgres_url)
    res = CliRunner().invoke(app, ["shadow", "report", "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["overall"]["samples"] == 8 and data["overall"]["mismatch_rate"] == 0.4  # as from SQLite
    assert data["verdict"] == "no-go"
