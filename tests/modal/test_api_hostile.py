"""The job API under uvicorn, attacked and fuzzed (issues 10, 20 and 21): the wire model, the error envelope,
the OpenAPI contract, idempotency, and the lifecycle of the in-process backend. Each test failed on the
main branch before these fixes."""

from __future__ import annotations

import asyncio
import json
import os
import threading

import httpx
import pytest

from gpubridge.models import JobRequest, JobState, Workflow

from .conftest import INPUTS, TOKEN, WORKFLOWS, serve_api

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
WF = json.loads((WORKFLOWS / "model_free_invert.json").read_text())
NODE = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api(threaded_comfy):
    with serve_api(threaded_comfy.url) as (url, backend):
        yield url, backend


def post(url: str, body: object, path: str = "/v1/jobs", **headers: str) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={**AUTH, **headers}, timeout=10)


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"type", "message", "retryable"} <= set(body["error"]), body
    return body["error"]


# ------------------------------------------------------------------------- issue 10 item 1: no server paths


def test_a_string_input_is_never_read_as_a_server_path(api, threaded_comfy, monkeypatch):
    url, _ = api
    monkeypatch.setenv("GPUBRIDGE_SECRET_PROBE", "sekrit-4711")
    for path in ("/proc/self/environ", "/etc/passwd", str(INPUTS / "input.png"), "/dev/zero", "/dev/stdin"):
        resp = post(url, {"workflow": WF, "inputs": {"input.png": path}})
        assert resp.status_code == 422, (path, resp.text)
        err = error_of(resp)
        assert err["type"] == "WorkflowInputError" and "input.png" in err["message"]
        assert "sekrit-4711" not in resp.text and "root:" not in resp.text
    assert threaded_comfy.stats.uploads == 0 and threaded_comfy.stats.prompts_received == 0


def test_a_workflow_path_probe_answers_the_same_for_files_that_exist_or_not(api, threaded_comfy):
    url, _ = api
    answers = []
    for path in ("/etc/passwd", "/nonexistent", str(WORKFLOWS / "model_free_invert.json"), "/dev/zero",
                 "/dev/stdin"):
        resp = post(url, {"workflow": path})
        assert resp.status_code == 422, resp.text
        answers.append(resp.json())
    assert all(a == answers[0] for a in answers), answers
    assert answers[0]["error"]["type"] == "WorkflowFormatError"
    assert "root" not in json.dumps(answers[0]) and threaded_comfy.stats.prompts_received == 0


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"workflow": {}}, ["workflow"]),
        ({"workflow": {"7": {"inputs": {}}}}, ["workflow.7.class_type"]),
        ({"workflow": {"7": {"class_type": "X", "inputs": []}}}, ["workflow.7.inputs"]),
        ({"workflow": NODE, "inputs": {"face.png": {}}}, ["inputs.face.png", "exactly one"]),
        ({"workflow": NODE, "inputs": {"face.png": {"data": "aGk=", "url": "http://x/a"}}}, ["face.png"]),
        ({"workflow": NODE, "inputs": {"face.png": {"url": "ht\ntp://x"}}}, ["face.png"]),
        ({"workflow": NODE, "inputs": {"face.png": {"url": "http://x\n/a"}}}, ["face.png"]),
        ({"workflow": NODE, "inputs": {"face.png": {"url": "file:///etc/passwd"}}}, ["face.png"]),
        ({"workflow": NODE, "inputs": {"face.png": {"data": "not base64!"}}}, ["face.png", "base64"]),
        ({"workflow": NODE, "inputs": {"..": {"data": "aGk="}}}, ["inputs"]),
        ({"workflow": NODE, "inputs": {"a/b.png": {"data": "aGk="}}}, ["inputs"]),
        ({"workflow": NODE, "timeout": 5e-324}, ["timeout"]),
        ({"workflow": NODE, "timeout": 1e308}, ["timeout"]),
        ({"workflow": NODE, "timeout": 0}, ["timeout"]),
        ({"workflow": NODE, "queue_timeout": -1}, ["queue_timeout"]),
        ('{"workflow": {"1": {"class_type": "X", "inputs": {}}}, "timeout": Infinity}', ["timeout"]),
        ('{"workflow": {"1": {"class_type": "X", "inputs": {}}}, "timeout": NaN}', ["timeout"]),
    ],
)
def test_bad_requests_are_422_at_the_door_naming_the_place(api, threaded_comfy, body, names):
    url, _ = api
    for path in ("/v1/jobs", "/v1/run"):
        resp = post(url, body, path)
        assert resp.status_code == 422, resp.text
        err = error_of(resp)
        assert not err["retryable"]
        for name in names:
            assert name in err["message"], err["message"]
    assert threaded_comfy.stats.prompts_received == 0


def test_a_job_request_as_the_provider_sends_it_is_a_valid_wire_request():
    """ModalRunner sends ``JobRequest.model_dump_json()``: it must pass the wire model unchanged."""
    from gpubridge.models import RemoteJobRequest

    png = (INPUTS / "input.png").read_bytes()
    request = JobRequest(
        workflow=Workflow.model_validate(WF),
        inputs={"a.png": png, "b.png": "https://example.com/b.png", "c.png": "data:image/png;base64,aGk="},
        timeout=60,
        queue_timeout=30,
        tags={"team": "x"},
    )
    wire = RemoteJobRequest.model_validate_json(request.model_dump_json())
    back = wire.to_request()
    assert back.workflow.to_api() == request.workflow.to_api()
    assert back.inputs["a.png"].data == png and back.inputs["a.png"].mime_type == "image/png"
    assert back.inputs["b.png"].url == "https://example.com/b.png"
    assert back.inputs["c.png"].data == b"hi"
    assert (back.timeout, back.queue_timeout, back.tags, back.request_id) == (60, 30, {"team": "x"},
                                                                                request.request_id)


# ------------------------------------------------------------- issue 20 items 5, 6; issue 10 item 10


def test_every_error_uses_the_one_envelope(api):
    url, _ = api
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
        malformed = http.post("/v1/jobs", content=b'{"workflow": ')
        assert malformed.status_code == 422 and error_of(malformed)["type"] == "InvalidRequest"
        not_utf8 = http.post("/v1/jobs", content=b'{"workflow": "\xff\xfe"}')
        assert not_utf8.status_code in (400, 422) and error_of(not_utf8)["type"] == "InvalidRequest"
        route = http.get("/v2/nothing")
        assert route.status_code == 404 and error_of(route)["type"] == "NotFound"
        for method, path, allow in (
            ("PUT", "/v1/jobs/job-1", "DELETE, GET"),
            ("OPTIONS", "/v1/jobs/job-1", "DELETE, GET"),
            ("OPTIONS", "/v1/jobs", "POST"),
            ("PATCH", "/v1/health", "GET"),
        ):
            resp = http.request(method, path)
            assert resp.status_code == 405 and resp.headers["allow"] == allow, (method, path, resp.headers)
            assert error_of(resp)["type"] == "MethodNotAllowed"
        query = http.get("/v1/jobs/job-1", params={"wait": "soon"})
        assert query.status_code == 422 and error_of(query)["type"] == "InvalidRequest"
        assert "wait" in error_of(query)["message"]
        inf = http.get("/v1/jobs/job-1", params={"wait": "inf"})
        assert inf.status_code == 422 and error_of(inf)["type"] == "InvalidRequest"
        header = http.post("/v1/jobs", json={"workflow": NODE}, headers={"Idempotency-Key": "k" * 300})
        assert header.status_code == 422 and error_of(header)["type"] == "InvalidRequest"
        unauth = httpx.get(url + "/v1/health")
        assert unauth.status_code == 401 and error_of(unauth)["type"] == "AuthError"


def test_a_bug_answers_500_in_the_envelope_without_internals(api):
    url, backend = api

    async def broken(*, deep: bool = False):
        raise RuntimeError("internal detail /secret/path")

    backend.health = broken
    resp = httpx.get(url + "/v1/health", headers=AUTH)
    assert resp.status_code == 500 and error_of(resp)["type"] == "InternalError"
    assert "secret" not in resp.text


def test_openapi_declares_every_status_with_the_error_schema(api):
    url, _ = api
    assert httpx.get(url + "/openapi.json").status_code == 401  # follows the API's auth
    spec = httpx.get(url + "/openapi.json", headers=AUTH).json()
    expect = {
        ("/v1/jobs", "post"): {"200", "202", "400", "401", "413", "422", "429", "500", "502", "503"},
        ("/v1/run", "post"): {"200", "202", "400", "401", "413", "422", "429", "500", "502", "503"},
        ("/v1/jobs/{job_id}", "get"): {"200", "401", "404", "422", "500", "503"},
        ("/v1/jobs/{job_id}", "delete"): {"200", "401", "404", "500", "503"},
        ("/v1/health", "get"): {"200", "401", "422", "500", "503"},
    }
    for (path, method), statuses in expect.items():
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, method, set(responses))
        for status in statuses - {"200", "202", "503" if path == "/v1/health" else ""}:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
    body = spec["components"]["schemas"]["RemoteJobRequest"]
    assert body["properties"]["workflow"]["anyOf"][0]["minProperties"] == 1
    timeout = body["properties"]["timeout"]["anyOf"][0]
    assert timeout["minimum"] == 1 and timeout["maximum"] == 24 * 3600
    assert "oneOf" in spec["components"]["schemas"]["WireInput"]


def test_docs_can_be_made_public_and_the_timeout_cap_configured(threaded_comfy):
    with serve_api(threaded_comfy.url, api={"public_docs": True, "max_timeout": 60}) as (url, _):
        spec = httpx.get(url + "/openapi.json").json()
        assert httpx.get(url + "/docs").status_code == 200
        timeout = spec["components"]["schemas"]["RemoteJobRequest"]["properties"]["timeout"]["anyOf"][0]
        assert timeout["maximum"] == 60
        resp = post(url, {"workflow": NODE, "timeout": 61})
        assert resp.status_code == 422 and "timeout" in error_of(resp)["message"]


# ----------------------------------------------------------------------------- issue 10 items 7 and 11


def test_an_idempotency_key_reused_with_another_body_is_422(api):
    url, backend = api
    first = post(url, {"workflow": WF}, **{"Idempotency-Key": "k-1"})
    again = post(url, {"workflow": WF, "request_id": "another-id"}, **{"Idempotency-Key": "k-1"})
    other = post(url, {"workflow": WF, "tags": {"x": "y"}}, **{"Idempotency-Key": "k-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"]
    assert other.status_code == 422 and error_of(other)["type"] == "InvalidRequest"
    assert "Idempotency-Key" in error_of(other)["message"]
    assert len(backend.jobs) == 1


def test_idempotency_keys_belong_to_the_token_and_are_stored_hashed(threaded_comfy):
    tokens = [TOKEN, "second-token-b1d2"]
    with serve_api(threaded_comfy.url, tokens=tokens) as (url, backend):
        a = post(url, {"workflow": WF}, **{"Idempotency-Key": "shared-key"})
        other = {"Idempotency-Key": "shared-key", "Authorization": f"Bearer {tokens[1]}"}
        b = post(url, {"workflow": WF}, **other)
        assert a.status_code == 202 and b.status_code == 202 and a.json()["job_id"] != b.json()["job_id"]
        # Tokens are for rotation, not tenants: any token reads any job (docs/modal.md).
        job_url = f"{url}/v1/jobs/{a.json()['job_id']}"
        read = httpx.get(job_url, headers={"Authorization": f"Bearer {tokens[1]}"})
        assert read.status_code == 200
        stored = json.dumps(backend.store.data)
        assert TOKEN not in stored and tokens[1] not in stored and "shared-key" not in stored


async def test_after_expiry_the_key_makes_a_fresh_job_that_runs(threaded_comfy):
    clock = FakeClock()
    with serve_api(threaded_comfy.url, retention=10, clock=clock) as (url, backend):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
            key = {"Idempotency-Key": "k-expiry"}
            first = await http.post("/v1/jobs", json={"workflow": WF}, headers=key)
            job_id = first.json()["job_id"]
            done = await http.get(f"/v1/jobs/{job_id}", params={"wait": 20})
            assert done.json()["status"]["state"] == "succeeded"
            clock.now += 11  # the result expires; its records and its key go together
            assert (await http.get(f"/v1/jobs/{job_id}")).status_code == 404
            assert not [k for k in backend.store.data if k.startswith("idem:")]
            second = await http.post("/v1/jobs", json={"workflow": WF}, headers=key)
            assert second.status_code == 202 and second.json()["job_id"] != job_id
            end = await http.get(f"/v1/jobs/{second.json()['job_id']}", params={"wait": 20})
            assert end.json()["status"]["state"] == "succeeded" and end.json()["result"]["artifacts"]
            replay = await http.post("/v1/jobs", json={"workflow": WF}, headers=key)
            assert replay.status_code == 200 and replay.json()["job_id"] == second.json()["job_id"]


# --------------------------------------------------------------------------------- issue 21 item 7


async def test_a_comfyui_outage_is_503_then_the_api_recovers(threaded_comfy):
    with serve_api(threaded_comfy.url, client_options={"reconnect_timeout": 2.0}) as (url, _):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
            assert (await http.get("/v1/health")).status_code == 200
            threaded_comfy.crash()
            down = await http.post("/v1/jobs", json={"workflow": WF})
            assert down.status_code == 503 and error_of(down)["retryable"]
            assert (await http.get("/v1/health")).status_code == 503
            threaded_comfy.restart()
            assert (await http.get("/v1/health")).status_code == 200
            up = await http.post("/v1/jobs", json={"workflow": WF})
            assert up.status_code == 202, up.text
            end = await http.get(f"/v1/jobs/{up.json()['job_id']}", params={"wait": 20})
            assert end.json()["status"]["state"] == "succeeded"


# --------------------------------------------------------------------------------- issue 21 item 8


async def test_a_second_delete_during_a_cancel_still_ends_the_job(threaded_comfy):
    threaded_comfy.faults.hold = {"ImageInvert"}  # the node ignores the interrupt until released
    with serve_api(threaded_comfy.url) as (url, backend):
        entered = threading.Event()
        calls = []
        original = backend.cancel

        async def counted(job_id: str):
            task = asyncio.ensure_future(original(job_id))
            await asyncio.sleep(0)  # let it run to its first suspension: past task.cancel()
            calls.append(job_id)
            if len(calls) == 2:
                entered.set()
            return await task

        backend.cancel = counted
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
            job_id = (await http.post("/v1/jobs", json={"workflow": WF, "timeout": 60})).json()["job_id"]
            await asyncio.to_thread(threaded_comfy.wait_until, lambda: bool(threaded_comfy.queue_running))
            first = asyncio.create_task(http.post(f"/v1/jobs/{job_id}/cancel"))
            await asyncio.to_thread(threaded_comfy.wait_until, lambda: threaded_comfy.stats.interrupts >= 1)
            second = asyncio.create_task(http.post(f"/v1/jobs/{job_id}/cancel"))
            assert await asyncio.to_thread(entered.wait, 10)
            threaded_comfy.faults.hold = set()
            answers = [(await first).json(), (await second).json()]
            assert [a["status"]["state"] for a in answers] == ["cancelled", "cancelled"], answers
            later = await http.get(f"/v1/jobs/{job_id}")
            assert later.json()["status"]["state"] == "cancelled"


async def test_delete_cancels_then_forgets_the_job(threaded_comfy):
    """DELETE is cancel-and-forget: once it answered 2xx the job is gone (404), as a REST client and the
    fuzzer's use-after-free check expect; POST .../cancel keeps it readable."""
    threaded_comfy.pause()  # the jobs wait in ComfyUI's queue
    with serve_api(threaded_comfy.url) as (url, _):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
            kept = (await http.post("/v1/jobs", json={"workflow": WF, "timeout": 60})).json()["job_id"]
            gone = (await http.post("/v1/jobs", json={"workflow": WF, "timeout": 60})).json()["job_id"]
            cancelled = await http.post(f"/v1/jobs/{kept}/cancel")
            deleted = await http.delete(f"/v1/jobs/{gone}")
            assert cancelled.status_code == 200 and cancelled.json()["status"]["state"] == "cancelled"
            assert deleted.status_code == 200 and deleted.json()["status"]["state"] == "cancelled"
            assert (await http.get(f"/v1/jobs/{kept}")).json()["status"]["state"] == "cancelled"
            after = await http.get(f"/v1/jobs/{gone}")
            assert after.status_code == 404 and after.json()["error"]["type"] in ("JobNotFound", "ResultExpired")
            assert (await http.delete(f"/v1/jobs/{gone}")).status_code == 404
    threaded_comfy.resume()


# -------------------------------------------------------------------------------- issue 21 item 10


async def test_max_active_holds_under_concurrent_posts(threaded_comfy):
    threaded_comfy.pause()
    with serve_api(threaded_comfy.url, max_active=5) as (url, _):
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30, limits=limits) as http:
            answers = await asyncio.gather(*(http.post("/v1/jobs", json={"workflow": WF}) for _ in range(50)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(202) == 5 and codes.count(429) == 45, codes
    threaded_comfy.resume()


# -------------------------------------------------------------------------------- issue 21 item 11


async def test_finished_results_live_on_disk_not_in_memory_and_go_with_retention(threaded_comfy, tmp_path):
    clock = FakeClock()
    results = tmp_path / "results"
    with serve_api(threaded_comfy.url, retention=10, clock=clock, result_dir=results) as (url, backend):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
            job_id = (await http.post("/v1/jobs", json={"workflow": WF})).json()["job_id"]
            done = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 20})).json()
            assert done["status"]["state"] == "succeeded" and len(done["result"]["artifacts"]) == 2
            job = backend.jobs[job_id]
            assert job.outcome is not None and job.outcome.get("result") is None  # not held in memory
            assert os.listdir(results) == [f"{job_id}.json"]
            again = (await http.get(f"/v1/jobs/{job_id}")).json()
            assert again["result"] == done["result"]
            clock.now += 11
            assert (await http.get(f"/v1/jobs/{job_id}")).status_code == 404
            assert os.listdir(results) == []


async def test_results_past_the_byte_cap_expire_oldest_first(threaded_comfy, tmp_path):
    results = tmp_path / "results"
    with serve_api(threaded_comfy.url, result_dir=results, max_result_bytes=1) as (url, _):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
            ids = []
            for _ in range(2):
                job_id = (await http.post("/v1/jobs", json={"workflow": WF})).json()["job_id"]
                ids.append(job_id)
                await http.get(f"/v1/jobs/{job_id}", params={"wait": 20})
            oldest = await http.get(f"/v1/jobs/{ids[0]}")
            assert oldest.status_code == 404 and error_of(oldest)["type"] == "ResultExpired"
    assert os.listdir(results) == [f"{ids[1]}.json"]


def test_an_accepted_job_that_times_out_before_it_starts_says_so_in_its_state(api, monkeypatch):
    """The deadline passes between accepting the job and queueing it on ComfyUI: the submit is still a 202,
    and the job's state is timed_out (issue 20 item 3), never a 504 for the submit."""
    import types

    import modal_app.worker as worker_module

    url, _ = api
    late = types.SimpleNamespace(time=lambda: 4102444800.0, monotonic=worker_module.time.monotonic)
    monkeypatch.setattr(worker_module, "time", late)  # the worker's clock: far past any deadline
    resp = post(url, {"workflow": WF, "timeout": 5})
    assert resp.status_code == 202, resp.text
    env = resp.json()
    assert env["status"]["state"] == "timed_out" and env["error"]["type"] == "JobTimeout"
    assert httpx.get(f"{url}/v1/jobs/{env['job_id']}", headers=AUTH).json()["status"]["state"] == "timed_out"


async def test_the_workers_cleanup_survives_a_second_cancel(comfy):
    """On Modal the GPU container's task can be cancelled again while it interrupts ComfyUI (issue 21 item
    8): the job must still be recorded as cancelled, never left "running"."""
    from gpubridge.comfy import ComfyClient
    from gpubridge.server.schema import record_key
    from gpubridge.server.store import MemoryStore
    from modal_app.worker import ComfyWorker

    comfy.faults.hold = {"ImageInvert"}  # ignores the interrupt until released
    store = MemoryStore()
    worker = ComfyWorker(ComfyClient(comfy.url, provider="modal"), store, gpu="L40S")
    try:
        request = JobRequest(workflow=Workflow.model_validate(WF), timeout=60)
        task = asyncio.create_task(worker.run("job-twice", request))
        record = None
        while record is None or record.state is not JobState.RUNNING:  # the worker follows the prompt
            await store.wait_changed(record_key("job-twice"), record.version if record else -1, 10)
            record = await store.record("job-twice")
        task.cancel()
        await comfy.wait_until(lambda: comfy.stats.interrupts >= 1)
        task.cancel()  # a second cancel while the first one's clean-up waits for ComfyUI
        await asyncio.sleep(0)
        comfy.faults.hold = set()
        with pytest.raises(asyncio.CancelledError):
            await task
        record = await store.record("job-twice")
        assert record is not None and record.state is JobState.CANCELLED
    finally:
        await worker.aclose()


async def test_a_node_that_ignores_its_interrupt_makes_the_worker_stop_taking_jobs(comfy):
    """Issue 24 defect 1 (Modal side): a job past its deadline whose node ignores the interrupt ends
    timed out, and the container stops taking inputs instead of holding the GPU for the jobs behind it."""
    from gpubridge.comfy import ComfyClient
    from gpubridge.models import HealthState
    from gpubridge.server.store import MemoryStore
    from modal_app.worker import ComfyWorker

    stopped: list[bool] = []

    async def stop_fetching_inputs() -> None:
        stopped.append(True)

    comfy.faults.hold = {"ImageInvert"}  # a stuck kernel: the interrupt never lands
    worker = ComfyWorker(ComfyClient(comfy.url, provider="modal"), MemoryStore(), gpu="L40S",
                         on_dead=stop_fetching_inputs, interrupt_grace=0.5)
    try:
        outcome = await asyncio.wait_for(
            worker.run("job-hung", JobRequest(workflow=Workflow.model_validate(WF), timeout=1)), 30)
        assert outcome["state"] == "timed_out", outcome
        assert stopped == [True] and worker.dead
        report = await worker.health()
        assert report.state is HealthState.UNHEALTHY and "ignored its interrupt" in (report.message or "")
    finally:
        comfy.faults.hold = set()
        await worker.aclose()


async def test_a_frozen_comfyui_is_reported_within_the_probe_timeout_and_not_as_a_cold_start(tmp_path):
    """Issue 24 defect 7: a SIGSTOPped ComfyUI. The worker's probe gives up first (timeouts nest: probe <
    the job API's deep health wait < a client's) and says the process is frozen, not starting."""
    import os
    import shlex
    import signal
    import socket
    import sys

    from gpubridge.comfy import ComfyClient, ComfyProcess
    from gpubridge.models import HealthState
    from gpubridge.server.store import MemoryStore
    from modal_app.backends import ModalBackend
    from modal_app.worker import ComfyWorker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = f"{shlex.quote(sys.executable)} -m gpubridge.testing.comfy --host {{host}} --port {{port}} --root {tmp_path}"
    proc = ComfyProcess(cmd, port=port, start_timeout=60)
    await asyncio.to_thread(proc.start)
    defaults = ComfyWorker(ComfyClient(proc.url), MemoryStore())
    assert defaults.probe_timeout < ModalBackend.__init__.__kwdefaults__["health_timeout"]  # the timeouts nest
    await defaults.aclose()
    worker = ComfyWorker(ComfyClient(proc.url, provider="modal"), MemoryStore(), process=proc, gpu="L40S",
                         probe_timeout=0.5)
    try:
        assert (await worker.health()).state is HealthState.HEALTHY
        os.kill(proc.pid, signal.SIGSTOP)
        report = await worker.health()
        assert report.state is HealthState.UNHEALTHY
        assert "frozen" in report.message and "not a cold start" in report.message
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        await worker.aclose()
        await asyncio.to_thread(proc.stop)


async def test_the_modal_worker_removes_a_jobs_files_once_its_result_is_read(comfy):
    """Issue 24 defect 5 (Modal side): outputs and uploaded inputs do not pile up on a long-lived container."""
    from pathlib import Path

    from gpubridge.comfy import ComfyClient, JobFiles
    from gpubridge.models import InputFile
    from gpubridge.server.store import MemoryStore
    from modal_app.worker import ComfyWorker

    out_dir, in_dir = Path(comfy.output_dir), Path(comfy.input_dir)
    worker = ComfyWorker(ComfyClient(comfy.url, provider="modal"), MemoryStore(), gpu="L40S",
                         files=JobFiles(out_dir, in_dir))
    wf = {"1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    png = (Path(__file__).parents[2] / "examples" / "inputs" / "input.png").read_bytes()
    try:
        outcome = await worker.run("job-files", JobRequest(workflow=Workflow.model_validate(wf),
                                                           inputs={"face.png": InputFile(data=png)}))
        assert outcome["state"] == "succeeded", outcome
        leftovers = [p for root in (out_dir, in_dir) for p in root.rglob("*") if p.is_file() and "gpubridge" in p.parts]
        assert leftovers == []
    finally:
        await worker.aclose()
