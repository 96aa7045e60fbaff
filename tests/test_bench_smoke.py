"""Smoke test of the benchmarks: the modules import, and the smallest sizes of two sections produce rows of
the table's shape. Structure only: no timing is asserted (numbers depend on the machine)."""

from __future__ import annotations

import importlib

import pytest
from bench._harness import Row, table

MODULES = ["bench.__main__", "bench._harness", "bench._runpod_server", "bench.overhead", "bench.paths", "bench.peer",
           "bench.scale", "bench.failover_reaction", "bench.shadow", "bench.shadow_overhead", "bench.runpod_vs_sdk",
           "bench.url_input", "bench.gateway", "bench.store", "bench.comfy_api",
           "bench.provider_scale"]


@pytest.mark.parametrize("name", MODULES)
def test_bench_modules_import(name: str) -> None:
    importlib.import_module(name)


def check_rows(rows: list[Row], section: str) -> None:
    assert rows and all(isinstance(r, Row) and r.section == section for r in rows)
    assert all(r.result in ("pass", "FAIL", "info") for r in rows)
    text = table(rows)
    assert len(text.splitlines()) == len(rows) + 2


def test_overhead_smallest() -> None:
    from bench import overhead

    rows = overhead.run(quick=True, jobs=4)
    check_rows(rows, "overhead")
    assert rows[0].ratio is not None and rows[0].ratio > 0
    assert rows[0].data["raw"]["n"] == rows[0].data["gpubridge"]["n"] == rows[0].data["simplified"]["n"] == 4
    assert any("comfy-api-simplified" in r.what and r.ratio for r in rows)


def test_scale_smallest() -> None:
    from bench import scale

    rows, found = scale.run(quick=True, jobs=10, rounds=2, levels=[1, 10], profile=False)
    check_rows(rows, "scale")
    assert len(found["rounds"]) == 2 and [s["concurrency"] for s in found["sweep"]] == [1, 10]
    assert all(r["retained_jobs"] == 0 and r["background_tasks"] == 0 for r in found["rounds"])
    assert scale.plateau(found["sweep"]) in (1, 10)


def test_cli_rejects_unknown_section() -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--only", "nope"])


def test_gateway_smallest() -> None:
    from bench import gateway

    # The gateway's CPU comes from /proc in clock ticks (10 ms): 4 jobs can cost less than one tick now, so the
    # concurrent part runs 24, enough to be measured at all.
    rows = gateway.run(quick=True, jobs=4, concurrent=24)
    check_rows(rows, "gateway")
    assert rows[0].data["gateway"]["n"] == rows[0].data["in-process"]["n"] == 4
    assert rows[1].data["n"] == 24 and rows[1].data["cpu_per_job_s"] > 0
    assert rows[0].result == "info" and "full run" in rows[0].bound  # too few samples to gate +2 ms


def test_a_row_reports_without_gating_when_asked() -> None:
    from bench._harness import verdict

    assert (verdict(True), verdict(False), verdict(False, gate=False)) == ("pass", "FAIL", "info")
