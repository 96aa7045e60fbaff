"""The modal provider's HTTP error mapping (respx for faults a real server does not produce easily), its
settings, and that secrets stay out of reprs, logs and errors."""

from __future__ import annotations

import logging

import httpx
import pytest
import respx
from gpubridge.server.schema import error_dict

from gpubridge.config import Settings
from gpubridge.errors import (
    AuthError,
    ConfigError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProtocolError,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
    WorkflowInvalid,
)
from gpubridge.models import JobRequest, Workflow
from gpubridge.plugins import get_registry
from gpubridge.providers.modal import ModalRunner, ModalSettings, error_from_dict

from .conftest import WORKFLOWS

URL = "http://127.0.0.1:9"  # never contacted: respx answers
SECRET = "tok-SUPERSECRET-42"
KEY, PROXY_SECRET = "wk-KEYID-1", "ws-PROXYSECRET-2"


def request() -> JobRequest:
    return JobRequest(workflow=Workflow.load(WORKFLOWS / "model_free_invert.json"))


def envelope(state: str = "queued", **extra) -> dict:
    return {
        "job_id": "fc-1",
        "version": 1,
        "deadline": None,
        "status": {"job_id": "fc-1", "provider": "modal", "state": state},
        "result": None,
        "error": None,
        **extra,
    }


@pytest.fixture
async def runner():
    async with ModalRunner(URL, token=SECRET) as r:
        yield r


@respx.mock
@pytest.mark.parametrize(
    ("response", "expected", "retryable"),
    [
        (
            httpx.Response(401, text="modal-http: missing credentials for proxy authorization"),
            AuthError,
            False,
        ),
        (httpx.Response(403), AuthError, False),
        (httpx.Response(413, text="Request Entity Too Large"), PayloadTooLarge, False),
        (httpx.Response(429, headers={"Retry-After": "7"}), RateLimited, True),
        (httpx.Response(500, text="boom"), ProviderUnavailable, True),
        (httpx.Response(502), ProviderUnavailable, True),
        (httpx.Response(503), ProviderUnavailable, True),
        (httpx.Response(404, text="modal-http: app not found"), ConfigError, False),
        (httpx.Response(303, headers={"Location": "/?__modal_function_call_id=fc-x"}), ProtocolError, False),
        (httpx.Response(418), ProtocolError, False),
        (httpx.Response(202, text="not json"), ProtocolError, True),
        (httpx.Response(202, json={"job_id": "fc-1"}), ProtocolError, True),
    ],
)
async def test_submit_maps_bare_http_failures(runner, response, expected, retryable):
    respx.post(f"{URL}/v1/jobs").mock(return_value=response)
    with pytest.raises(expected) as info:
        await runner.submit(request())
    assert type(info.value) is expected and info.value.retryable is retryable
    assert info.value.provider == "modal"
    if expected is RateLimited:
        assert info.value.retry_after == 7.0
    assert SECRET not in str(info.value)


@respx.mock
async def test_typed_error_bodies_come_back_as_the_same_error(runner):
    node_errors = {
        "2": {
            "class_type": "ImageInvert",
            "errors": [
                {
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": "image",
                    "extra_info": {"input_name": "image"},
                }
            ],
        }
    }
    invalid = WorkflowInvalid(
        error={"type": "prompt_outputs_failed_validation", "message": "bad"}, node_errors=node_errors
    )
    respx.post(f"{URL}/v1/jobs").mock(return_value=httpx.Response(422, json={"error": error_dict(invalid)}))
    with pytest.raises(WorkflowInvalid) as info:
        await runner.submit(request())
    assert info.value.node_errors == node_errors and info.value.errors[0].input_name == "image"

    limited = RateLimited("slow down", retry_after=3.0)
    respx.post(f"{URL}/v1/jobs").mock(return_value=httpx.Response(429, json={"error": error_dict(limited)}))
    with pytest.raises(RateLimited) as rl:
        await runner.submit(request())
    assert rl.value.retry_after == 3.0

    expired = ResultExpired("gone", job_id="fc-1")
    respx.get(f"{URL}/v1/jobs/fc-1").mock(
        return_value=httpx.Response(404, json={"error": error_dict(expired)})
    )
    with pytest.raises(ResultExpired) as ex:
        await runner.status("fc-1")
    assert ex.value.job_id == "fc-1"


@respx.mock
async def test_a_bare_404_on_a_job_is_job_not_found(runner):
    respx.get(f"{URL}/v1/jobs/fc-9").mock(return_value=httpx.Response(404, text="not found"))
    with pytest.raises(JobNotFound) as info:
        await runner.status("fc-9")
    assert info.value.job_id == "fc-9" and type(info.value) is JobNotFound


@respx.mock
async def test_transport_failures(runner):
    route = respx.post(f"{URL}/v1/jobs")
    route.mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(ProviderUnavailable) as refused:
        await runner.submit(request())
    assert refused.value.retryable and not refused.value.job_may_be_running

    route.mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(ProviderUnavailable) as timeout:
        await runner.submit(request())
    assert timeout.value.retryable and timeout.value.job_may_be_running  # it may have been accepted

    respx.get(f"{URL}/v1/jobs/fc-1").mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(ProviderUnavailable) as status:
        await runner.status("fc-1")
    assert not status.value.job_may_be_running


@respx.mock
async def test_wait_rides_out_a_blip_then_raises_the_jobs_error(runner, monkeypatch):
    monkeypatch.setattr("gpubridge.providers.modal._RETRY_DELAYS", (0, 0, 0))
    failed = JobFailed(
        "node 2 raised", job_id="fc-1", node_id="2", exception_type="RuntimeError", retryable=False
    )
    route = respx.get(f"{URL}/v1/jobs/fc-1")
    route.side_effect = [
        httpx.Response(502),
        httpx.ConnectError("reset"),
        httpx.Response(200, json=envelope("failed", error=error_dict(failed))),
    ]
    with pytest.raises(JobFailed) as info:
        await runner.wait("fc-1")
    assert (
        info.value.node_id == "2" and info.value.exception_type == "RuntimeError" and not info.value.retryable
    )
    assert route.call_count == 3

    route.side_effect = [httpx.Response(503)] * 4
    with pytest.raises(ProviderUnavailable):
        await runner.wait("fc-1")


@respx.mock
async def test_wait_enforces_the_job_deadline_as_a_backstop(monkeypatch):
    async with ModalRunner(URL, token=SECRET, deadline_grace=0) as runner:
        respx.get(f"{URL}/v1/jobs/fc-1").mock(
            return_value=httpx.Response(200, json=envelope("running", deadline=1.0))
        )  # the deadline passed long ago
        cancel = respx.post(f"{URL}/v1/jobs/fc-1/cancel").mock(
            return_value=httpx.Response(200, json=envelope("cancelled"))
        )
        with pytest.raises(JobTimeout) as info:
            await runner.wait("fc-1")
        assert info.value.cancelled and info.value.state == "running" and cancel.called


@respx.mock
async def test_long_poll_parameters_and_timeouts(runner):
    route = respx.get(f"{URL}/v1/jobs/fc-1").mock(return_value=httpx.Response(200, json=envelope("queued")))
    with pytest.raises(JobTimeout) as info:
        await runner.wait("fc-1", timeout=0)
    assert not info.value.cancelled and info.value.state == "queued"
    assert route.calls.last.request.url.params["wait"] == "0"
    events = runner.events("fc-1")
    first = await events.__anext__()
    assert first.type.value == "queued"
    await events.aclose()


@respx.mock
async def test_auth_headers_are_sent_and_never_shown(caplog):
    caplog.set_level(logging.DEBUG)
    route = respx.post(f"{URL}/v1/jobs").mock(
        return_value=httpx.Response(
            401,
            json={
                "error": {
                    "type": "AuthError",
                    "message": "Missing or invalid bearer token",
                    "retryable": False,
                }
            },
        )
    )
    async with ModalRunner(URL, token=SECRET, key=KEY, secret=PROXY_SECRET) as runner:
        with pytest.raises(AuthError) as info:
            await runner.submit(request())
        sent = route.calls.last.request.headers
        assert sent["authorization"] == f"Bearer {SECRET}"
        assert sent["modal-key"] == KEY and sent["modal-secret"] == PROXY_SECRET
        shown = [
            repr(runner),
            str(runner),
            str(info.value),
            repr(info.value),
            repr(info.value.to_dict()),
            caplog.text,
        ]
    for text in shown:
        for secret in (SECRET, KEY, PROXY_SECRET):
            assert secret not in text


def test_settings_from_env_hide_secrets(monkeypatch, in_tmp):
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "https://ryla--gpubridge-jobapi-web.modal.run")
    monkeypatch.setenv("GPUBRIDGE_MODAL_TOKEN", SECRET)
    monkeypatch.setenv("GPUBRIDGE_MODAL_LONG_POLL", "40")
    cfg = ModalSettings.from_settings(Settings.load())
    assert cfg.long_poll == 40 and cfg.token.get_secret_value() == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg) and SECRET not in cfg.model_dump_json()
    runner = get_registry().create_runner("modal", Settings.load())
    assert isinstance(runner, ModalRunner) and runner.long_poll == 40 and SECRET not in repr(runner)


def test_settings_errors(monkeypatch, in_tmp):
    with pytest.raises(ConfigError, match="GPUBRIDGE_MODAL_URL"):
        get_registry().create_runner("modal", Settings.load())
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "https://x.modal.run")
    monkeypatch.setenv("GPUBRIDGE_MODAL_KEY", KEY)
    with pytest.raises(ConfigError, match="GPUBRIDGE_MODAL_SECRET") as info:
        get_registry().create_runner("modal", Settings.load())
    assert KEY not in str(info.value)
    monkeypatch.delenv("GPUBRIDGE_MODAL_KEY")
    with pytest.raises(ConfigError, match="GPUBRIDGE_MODAL_TOKEN"):  # not a 401 at the first request (issue 25)
        get_registry().create_runner("modal", Settings.load())
    monkeypatch.setenv("GPUBRIDGE_MODAL_URL", "http://127.0.0.1:8000")  # serve --allow-anonymous, on loopback
    assert isinstance(get_registry().create_runner("modal", Settings.load()), ModalRunner)
    with pytest.raises(ConfigError, match="long_poll"):
        ModalSettings.from_settings(Settings.load(), long_poll=500)


def test_error_from_dict_round_trips_every_job_error():
    cases = [
        JobTimeout("late", job_id="fc-1", state="queued", cancelled=True),
        JobFailed("crash", job_id="fc-1", retryable=True, node_id="5", traceback=["line"]),
        PayloadTooLarge("big", size=10, limit=5),
        ProviderUnavailable("down", status_code=503),
    ]
    for exc in cases:
        back = error_from_dict(error_dict(exc), provider="modal")
        assert type(back) is type(exc) and back.retryable == exc.retryable and str(back) == str(exc)
        assert back.job_may_be_running == exc.job_may_be_running
    assert error_from_dict({"type": "KeyError", "message": "x"}) is None
    assert error_from_dict({"type": "Settings", "message": "x"}) is None


@respx.mock
async def test_a_deadline_with_less_than_the_apis_floor_left_is_never_sent(runner):
    """What failover has left of a deadline can fall under the job API's 1 s floor; sending it would get a
    non-retryable 422 (InvalidRequest) that hides the real cause. It ends as the timeout it is, unsent."""
    route = respx.post(f"{URL}/v1/jobs").mock(return_value=httpx.Response(202, json=envelope()))
    with pytest.raises(JobTimeout) as info:
        await runner.submit(request().model_copy(update={"timeout": 0.4}))
    assert info.value.cancelled and not info.value.job_may_be_running and info.value.state == "queued"
    assert route.call_count == 0
