"""A gateway killed while a webhook delivery is in flight delivers it after its restart, under the same
webhook-id, signed (issue 12): pending deliveries live with the job records in the gateway's store."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook

from gpubridge.testing import ComfyDouble

from ..modal.test_webhooks import SECRET, receiver
from .helpers import AUTH, Gateway, until, workflow


async def test_a_delivery_in_flight_when_the_gateway_dies_is_delivered_after_its_restart(tmp_path: Path):
    async with receiver([], hang=True) as r:  # the first delivery hangs: the gateway dies during it
        with ComfyDouble(root=tmp_path / "comfy", cache=False).run_in_thread() as comfy:
            gw = Gateway(comfy.url, tmp_path / "data", env={
                "GPUBRIDGE_WEBHOOK_SECRET": SECRET, "GPUBRIDGE_WEBHOOK_ALLOW": "127.0.0.1",
                "GPUBRIDGE_WEBHOOK_FIRST_DELAY": "0.2", "GPUBRIDGE_WEBHOOK_TIMEOUT": "60",
            })
            await asyncio.to_thread(gw.start)
            try:
                answer = await asyncio.to_thread(
                    httpx.post, f"{gw.url}/v1/jobs", json={"workflow": workflow(), "webhook": r.url},
                    headers=AUTH, timeout=30)
                assert answer.status_code == 202, answer.text
                job_id = answer.json()["job_id"]
                await asyncio.wait_for(r.arrived.wait(), 30)  # the job ended; its delivery hangs
                await asyncio.to_thread(gw.kill, signal.SIGKILL)
                r.hang = False  # from now on the receiver answers 200

                await asyncio.to_thread(gw.start)
                await r.delivered(2)

                def delivered() -> dict[str, Any]:
                    env = until(gw, job_id, "succeeded")
                    while env["webhook"]["state"] != "delivered":
                        env = httpx.get(f"{gw.url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()
                    return env

                env = await asyncio.wait_for(asyncio.to_thread(delivered), 60)
            finally:
                await asyncio.to_thread(gw.stop)
        assert env["webhook"]["last_status"] == 200
        ids = {headers["webhook-id"] for headers, _ in r.got}
        assert len(ids) == 1 and ids == {env["webhook"]["webhook_id"]}
        sent = Webhook(SECRET).verify(r.got[-1][1], r.got[-1][0])
        assert sent["job_id"] == job_id and sent["status"]["state"] == "succeeded"
