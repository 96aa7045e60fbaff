"""``gpubridge shadow report`` and ``gpubridge shadow stage``."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpubridge.cli import app
from gpubridge.cli_shadow import parse_since
from gpubridge.shadow.store import SQLiteSink

from .test_report import fixture

cli = CliRunner()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "shadow.sqlite3"

    async def write() -> None:
        sink = SQLiteSink(path)
        for rec in fixture():
            await sink.write(rec)
        await sink.aclose()

    asyncio.run(write())
    return path


def test_parse_since():
    now = 1_700_000_000.0
    assert parse_since("24h", now=now) == now - 86400
    assert parse_since("30m", now=now) == now - 1800
    assert parse_since("2w", now=now) == now - 14 * 86400
    assert parse_since("2023-11-14", now=now) == datetime(2023, 11, 14, tzinfo=timezone.utc).timestamp()
    ten_utc = datetime(2023, 11, 14, 10, tzinfo=timezone.utc).timestamp()
    assert parse_since("2023-11-14T12:00:00+02:00") == ten_utc
    with pytest.raises(typer.BadParameter):
        parse_since("yesterday")


def test_report_json_from_the_database(db: Path, in_tmp: Path):
    (in_tmp / "gpubridge.toml").write_text(
        "[shadow_options]\nmin_noise_pairs = 5\nnoise_margin = 2\n"
        "[shadow_options.thresholds]\nmin_samples = 4\nmax_success_rate_drop = 0.1\n"
        "max_mismatch_rate = 0.05\n"
    )
    res = cli.invoke(app, ["shadow", "report", "--db", str(db), "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["overall"]["samples"] == 8 and data["overall"]["mismatch_rate"] == 0.4
    assert data["verdict"] == "no-go"
    res = cli.invoke(app, ["shadow", "report", "--db", str(db), "--format", "json", "--check"])
    assert res.exit_code == 1


def test_report_since_filters_records(db: Path, in_tmp: Path):
    since = datetime.fromtimestamp(1_699_999_200 + 7200, timezone.utc).isoformat()
    res = cli.invoke(app, ["shadow", "report", "--db", str(db), "--format", "json", "--since", since])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [w["workflow"] for w in data["workflows"]] == ["wf-b"] and data["overall"]["samples"] == 3


def test_report_html_and_table_to_files(db: Path, in_tmp: Path):
    out = in_tmp / "report.html"
    res = cli.invoke(app, ["shadow", "report", "--db", str(db), "--format", "html", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().count("<svg") == 2
    table = in_tmp / "report.txt"
    res = cli.invoke(app, ["shadow", "report", "--db", str(db), "--out", str(table)])
    assert res.exit_code == 0 and "wf-a" in table.read_text() and "verdict" in table.read_text()


def test_report_on_an_empty_database_and_a_db_from_config(in_tmp: Path):
    path = in_tmp / "cfg.sqlite3"
    (in_tmp / "gpubridge.toml").write_text(f'[shadow_options]\ndb = "{path}"\n')
    res = cli.invoke(app, ["shadow", "report", "--format", "json", "--check"])
    assert res.exit_code == 1 and json.loads(res.stdout)["verdict"] == "insufficient-data"
    assert "no shadow records" in res.stderr


def test_stage_command(in_tmp: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_SHADOW", "modal")
    monkeypatch.setenv("GPUBRIDGE_SHADOW_RATE", "0.1")
    res = cli.invoke(app, ["shadow", "stage", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"stage": "shadow", "control": "local", "candidate": "modal",
                                      "rate": 0.1}
