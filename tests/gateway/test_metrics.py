"""``GET /metrics`` on a gateway whose primary is down: jobs by the provider that served them, latencies,
failovers and circuit state, in Prometheus' text format (parsed with prometheus-client's own parser)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpubridge.testing import ComfyDouble

from .helpers import AUTH, Gateway, until, workflow


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def comfy(tmp_path: Path) -> Iterator[Any]:
    with ComfyDouble(root=tmp_path / "comfy", cache=False).run_in_thread() as double:
        yield double


def samples(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_jobs_by_serving_provider_and_show_the_failover(comfy, tmp_path: Path):
    gw = Gateway(comfy.url, tmp_path / "data", env={
        "GPUBRIDGE_PROVIDER": "modal", "GPUBRIDGE_MODAL_URL": _dead_url(), "GPUBRIDGE_MODAL_TOKEN": "mt-secret",
        "GPUBRIDGE_FALLBACKS": "local",
    }).start()
    try:
        assert httpx.get(f"{gw.url}/metrics", timeout=10).status_code == 401
        before = samples(gw)
        assert before.get(("gpubridge_jobs_total", (("outcome", "succeeded"), ("provider", "local"))), 0) == 0
        for _ in range(2):
            job = httpx.post(f"{gw.url}/v1/jobs", json={"workflow": workflow()}, headers=AUTH, timeout=30).json()
            assert until(gw, job["job_id"], "succeeded", "failed")["status"]["state"] == "succeeded"
        after = samples(gw)
        assert after[("gpubridge_jobs_total", (("outcome", "succeeded"), ("provider", "local")))] == 2
        assert after[("gpubridge_job_total_seconds_count", (("provider", "local"),))] == 2
        assert after[("gpubridge_failover_events_total", (("event", "submitted"),))] == 2
        assert after[("gpubridge_failover_events_total", (("event", "succeeded"),))] == 2
        # modal is down: each job either failed over from it, or skipped it once its health probe had
        # opened its circuit; either way modal's circuit is reported
        states = {labels: v for (name, labels), v in after.items() if name == "gpubridge_circuit_state"}
        assert sum(v for labels, v in states.items() if ("provider", "modal") in labels) == 1
        assert sum(v for labels, v in states.items() if ("provider", "local") in labels) == 1
        assert states[(("provider", "local"), ("state", "closed"))] == 1
        assert after[("gpubridge_jobs_active", ())] == 0
        assert "mt-secret" not in httpx.get(f"{gw.url}/metrics", headers=AUTH).text
    finally:
        gw.stop()
