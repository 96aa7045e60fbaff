"""Signed job webhooks (issue 12): retries with one webhook-id, never in the job's way, guarded URLs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from standardwebhooks import Webhook

from gpubridge.config import WebhookSettings
from gpubridge.models import JobRequest, Workflow
from gpubridge.server import MemoryStore
from gpubridge.server.webhooks import RetrySchedule, WebhookDispatcher, webhook_key

from .conftest import TOKEN, WORKFLOWS, serve_api

SECRET = "whsec_" + "c2VjcmV0LWZvci13ZWJob29rLXRlc3RzLTEyMzQ1Ng=="
WF = Workflow.load(WORKFLOWS / "model_free_invert.json")
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def settings(**overrides: Any) -> WebhookSettings:
    values: dict[str, Any] = {"secret": SECRET, "allow": ["127.0.0.1"], "first_delay": 0.02, "max_delay": 0.1,
                              "timeout": 5.0}
    values.update(overrides)
    return WebhookSettings(**values)


class Receiver:
    """A real HTTP server on loopback that answers webhooks with the statuses it is given, in order."""

    def __init__(self, statuses: list[int], hang: bool = False):
        self.statuses = statuses
        self.hang = hang
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def delivered(self, count: int) -> None:
        while len(self.got) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 30)


@contextlib.asynccontextmanager
async def receiver(statuses: list[int], hang: bool = False) -> AsyncIterator[Receiver]:
    r = Receiver(statuses, hang)
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    r.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield r
    finally:
        r.release.set()
        await runner.cleanup()


def body(**extra: Any) -> dict[str, Any]:
    return {**json.loads(JobRequest(workflow=WF).model_dump_json()), **extra}


async def until(check, what: str, seconds: float = 30.0) -> Any:
    """Poll ``check`` (a condition, with a deadline) until it returns something truthy."""
    async with asyncio.timeout(seconds):
        while not (value := await check()):
            await asyncio.sleep(0.02)
    return value


def test_retry_schedule_defaults_make_at_least_five_attempts_in_about_ten_minutes():
    s = RetrySchedule()
    at, attempts, first = 0.0, 1, 0.0
    while (nxt := s.next_at(attempts, first, at, 0.5)) is not None:
        at, attempts = nxt, attempts + 1
    assert attempts >= 5 and 300 <= at <= 900
    assert s.next_at(1, 0.0, 0.0, 0.0) < s.next_at(1, 0.0, 0.0, 0.999)  # jitter moves it
    assert s.next_at(2, 0.0, 899.0, 0.5) is None  # past the window: no more
    assert s.next_at(s.attempts, 0.0, 0.0, 0.5) is None


async def test_a_receiver_answering_500_500_200_gets_three_signed_deliveries_with_one_id(threaded_comfy):
    async with receiver([500, 500, 200]) as r:
        with serve_api(threaded_comfy.url, api={"webhooks": settings()}) as (url, _backend):
            async with httpx.AsyncClient(base_url=url, headers=HEADERS) as http:
                submitted = await http.post("/v1/jobs", json=body(webhook=r.url))
                assert submitted.status_code == 202, submitted.text
                job_id = submitted.json()["job_id"]
                assert submitted.json()["webhook"]["state"] in ("waiting", "pending", "delivered")
                await r.delivered(3)

                async def delivered() -> Any:
                    env = (await http.get(f"/v1/jobs/{job_id}")).json()
                    return env if env["webhook"]["state"] == "delivered" else None

                env = await until(delivered, "delivered")
        assert env["webhook"]["attempts"] == 3 and env["webhook"]["last_status"] == 200
        ids = {headers["webhook-id"] for headers, _ in r.got}
        assert len(r.got) == 3 and len(ids) == 1 and ids == {env["webhook"]["webhook_id"]}
        verifier = Webhook(SECRET)
        for headers, payload in r.got:
            sent = verifier.verify(payload, headers)
            assert sent["job_id"] == job_id and sent["status"]["state"] == "succeeded"
            assert len(sent["result"]["artifacts"]) == 2
        with pytest.raises(Exception):
            Webhook("whsec_" + "b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldC0xMjM0NQ==").verify(r.got[0][1], r.got[0][0])


async def test_a_receiver_that_never_answers_does_not_delay_the_result(threaded_comfy):
    async with receiver([], hang=True) as r:
        with serve_api(threaded_comfy.url, api={"webhooks": settings(timeout=60)}) as (url, _backend):
            async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=30) as http:
                job_id = (await http.post("/v1/jobs", json=body(webhook=r.url))).json()["job_id"]
                await asyncio.wait_for(r.arrived.wait(), 30)  # the delivery is under way, and hangs
                env = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 20})).json()
                assert env["status"]["state"] == "succeeded" and env["result"]["artifacts"]
                assert env["webhook"]["state"] == "pending" and env["webhook"]["attempts"] == 0
                assert not r.release.is_set()  # the receiver still holds the request


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://169.254.169.254/latest", "http://[::1]/x",
    "http://10.1.2.3/hook", "file:///etc/passwd", "http://user:pw@example.com/hook",
])
def test_a_webhook_to_a_forbidden_address_is_a_422_naming_the_rule(threaded_comfy, target):
    with serve_api(threaded_comfy.url, api={"webhooks": settings(allow=[])}) as (url, backend):
        answer = httpx.post(f"{url}/v1/jobs", json=body(webhook=target), headers=HEADERS)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["type"] == "InvalidRequest"
        assert "webhook" in error["message"]
        assert any(word in error["message"] for word in ("loopback", "private", "link-local", "http and https",
                                                         "credentials", "refused"))
        assert "pw" not in answer.text
        assert not backend.jobs  # refused before anything ran


def test_an_allowed_loopback_webhook_is_accepted_and_no_secret_means_no_webhooks(threaded_comfy):
    with serve_api(threaded_comfy.url, api={"webhooks": settings()}) as (url, _):
        assert httpx.post(f"{url}/v1/jobs", json=body(webhook="http://127.0.0.1:9/h"), headers=HEADERS).status_code == 202
    with serve_api(threaded_comfy.url, api={"webhooks": settings(secret=None)}) as (url, backend):
        answer = httpx.post(f"{url}/v1/jobs", json=body(webhook="http://127.0.0.1:9/h"), headers=HEADERS)
        assert answer.status_code == 422 and "GPUBRIDGE_WEBHOOK_SECRET" in answer.json()["error"]["message"]
        assert not backend.jobs
    with serve_api(threaded_comfy.url) as (url, backend):
        answer = httpx.post(f"{url}/v1/jobs", json=body(webhook="http://127.0.0.1:9/h"), headers=HEADERS)
        assert answer.status_code == 422 and "no webhooks" in answer.json()["error"]["message"]


def _modal_dict_store() -> Any:
    from modal_app.worker import ModalDictStore

    from .fakes import FakeDict

    return ModalDictStore(FakeDict())


@pytest.mark.parametrize("make_store", [MemoryStore, _modal_dict_store], ids=["memory", "modal-dict"])
async def test_a_dispatcher_started_over_a_store_with_a_pending_delivery_delivers_it(make_store):
    """What a restarted server finds: a delivery record left pending by the last run is resumed (on Modal
    too: the job API's modal.Dict lists its keys)."""
    async with receiver([500, 200]) as r:
        store = make_store()
        payload = json.dumps({"job_id": "job-1", "status": {"state": "succeeded"}}).encode()

        async def load(job_id: str) -> tuple[bytes, bool]:
            return payload, True

        async def wait(job_id: str, after: int | None, seconds: float) -> int:
            return 1

        # The first run's retry is a minute away; the restarted server starts two minutes later.
        first = WebhookDispatcher(store, settings(first_delay=60, max_delay=60), loaders={"v1": load}, wait=wait)
        await first.register("job-1", r.url)
        await r.delivered(1)  # answered 500: the delivery stays pending
        await until(lambda: _state(store, "pending", attempts=1), "pending after one attempt")
        await first.aclose()  # the server stops with the retry not yet made
        second = WebhookDispatcher(store, settings(), loaders={"v1": load}, wait=wait,
                                   clock=lambda: time.time() + 120)
        await second.start()
        await until(lambda: _state(store, "delivered"), "delivered after the restart")
        await second.aclose()
        assert [h["webhook-id"] for h, _ in r.got][0] == [h["webhook-id"] for h, _ in r.got][1]
        assert len(r.got) == 2


async def _state(store: Any, state: str, attempts: int | None = None) -> bool:
    record = await store.get(webhook_key("job-1"))
    return bool(record) and record["state"] == state and (attempts is None or record["attempts"] == attempts)
