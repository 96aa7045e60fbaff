from __future__ import annotations

import asyncio
import threading

import pytest

from gpubridge.errors import JobFailed, JobTimeout, WorkflowInvalid
from gpubridge.models import EventType, JobEvent, JobRequest, JobState, Workflow
from gpubridge.runner import EventStream, RunnerWrapper, SyncRunner, as_request, settle_pending_cancels

from .fakes import ScriptedRunner

WF = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}}}


def ev(t: EventType, job: str = "j") -> JobEvent:
    return JobEvent(type=t, job_id=job)


async def test_event_stream_replays_to_late_subscribers_and_ends_on_terminal():
    stream = EventStream()
    stream.publish(ev(EventType.QUEUED))
    stream.publish(ev(EventType.STARTED))
    early = stream.subscribe()
    assert (await early.__anext__()).type is EventType.QUEUED
    stream.publish(ev(EventType.PROGRESS))
    stream.publish(ev(EventType.SUCCEEDED))
    stream.publish(ev(EventType.PROGRESS))  # after terminal: dropped
    rest = [e.type async for e in early]
    late = [e.type async for e in stream.subscribe()]
    assert rest == [EventType.STARTED, EventType.PROGRESS, EventType.SUCCEEDED]
    assert late == [EventType.QUEUED, EventType.STARTED, EventType.PROGRESS, EventType.SUCCEEDED]


async def test_event_stream_wakes_waiting_subscribers():
    stream = EventStream()
    got: list[EventType] = []

    async def consume():
        async for e in stream.subscribe():
            got.append(e.type)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # let it block on the empty stream
    stream.publish(ev(EventType.STARTED))
    stream.publish(ev(EventType.FAILED))
    await task
    assert got == [EventType.STARTED, EventType.FAILED]


async def test_recorded_events_are_built_when_read_with_the_time_they_were_recorded():
    stream = EventStream()
    stream.record(EventType.QUEUED, {"job_id": "j", "provider": "p"})
    stream.record(EventType.PROGRESS, {"job_id": "j", "node_id": "3", "value": 2, "max": 4})
    assert all(type(item) is tuple for item in stream._events)  # nothing built while nobody reads
    recorded_at = stream._events[0][2]
    stream.record(EventType.SUCCEEDED, {"job_id": "j", "provider": "p"})
    assert stream.closed  # a recorded terminal event ends the stream as a published one does
    stream.record(EventType.PROGRESS, {"job_id": "j"})  # after terminal: dropped
    first = [e async for e in stream.subscribe()]
    second = [e async for e in stream.subscribe()]
    assert [e.type for e in first] == [EventType.QUEUED, EventType.PROGRESS, EventType.SUCCEEDED]
    assert first[0].at == recorded_at and first[0].provider == "p"
    assert first[1].value == 2.0 and isinstance(first[1].value, float)  # validated as JobEvent() validates
    assert all(a is b for a, b in zip(first, second))  # built once, shared by every reader
    assert stream.last() is first[-1]


async def test_recorded_and_published_events_wake_a_waiting_subscriber_in_order():
    stream = EventStream()
    got: list[EventType] = []
    ready = asyncio.Event()

    async def follow() -> None:
        ready.set()
        async for e in stream.subscribe():
            got.append(e.type)

    task = asyncio.create_task(follow())
    await ready.wait()
    stream.record(EventType.STARTED, {"job_id": "j"})
    stream.publish(ev(EventType.PROGRESS))
    stream.record(EventType.FAILED, {"job_id": "j", "message": "boom"})
    await task
    assert got == [EventType.STARTED, EventType.PROGRESS, EventType.FAILED]


async def test_event_stream_bounded_retention():
    stream = EventStream(maxlen=3)
    for _ in range(10):
        stream.publish(ev(EventType.PROGRESS))
    stream.close()
    assert len([e async for e in stream.subscribe()]) == 3


async def test_run_returns_result_and_forwards_events():
    runner = ScriptedRunner(auto="succeed")
    seen: list[EventType] = []
    result = await runner.run(WF, on_event=lambda e: seen.append(e.type))
    assert result.provider == "fake" and result.artifacts[0].data == b"png"
    assert seen == [EventType.QUEUED, EventType.STARTED, EventType.SUCCEEDED]


async def test_run_cancels_the_remote_job_when_the_caller_is_cancelled():
    runner = ScriptedRunner()
    task = asyncio.create_task(runner.run(WF))
    await runner.submitted.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (job_id,) = runner.jobs
    assert runner.cancelled == [job_id]
    assert runner.jobs[job_id].state is JobState.CANCELLED


class _HeldSubmit(ScriptedRunner):
    """A runner whose submit waits at ``release`` (an upload, a POST the backend is still validating)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def submit(self, request: JobRequest):
        self.entered.set()
        await self.release.wait()
        return await super().submit(request)


async def test_a_caller_cancelled_while_its_submit_is_in_flight_gets_its_job_cancelled_once_it_exists():
    runner = _HeldSubmit()
    task = asyncio.create_task(runner.run(WF))
    await runner.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # at once: the caller does not wait for the submit
    assert runner.jobs == {}
    runner.release.set()  # the submit finishes in the background ...
    await runner.next_job()
    await settle_pending_cancels(runner)
    (job_id,) = runner.jobs
    assert runner.cancelled == [job_id]  # ... and the job it created is cancelled


async def test_a_submit_error_reaches_the_caller_as_it_was_raised_and_nothing_is_left_behind(caplog):
    runner = ScriptedRunner()
    runner.submit_errors.append(WorkflowInvalid(error={"type": "bad", "message": "no"}, node_errors={}))
    with pytest.raises(WorkflowInvalid):
        await runner.run(WF)
    assert runner.cancelled == [] and runner.jobs == {}
    assert "never retrieved" not in caplog.text


async def test_run_raises_typed_failure():
    runner = ScriptedRunner()
    task = asyncio.create_task(runner.run(WF))
    await runner.submitted.wait()
    (job_id,) = runner.jobs
    runner.fail(job_id, JobFailed("node 3 raised", node_id="3", job_id=job_id))
    with pytest.raises(JobFailed) as info:
        await task
    assert info.value.node_id == "3"
    assert runner.cancelled == []


async def test_wait_timeout_does_not_cancel_but_run_does():
    runner = ScriptedRunner()
    handle = await runner.submit(as_request(WF))
    with pytest.raises(JobTimeout) as info:
        await runner.wait(handle, timeout=0.01)
    assert info.value.cancelled is False and info.value.job_may_be_running
    assert runner.jobs[handle.job_id].state is JobState.QUEUED


async def test_wrapper_forwards_everything():
    inner = ScriptedRunner(auto="succeed")
    outer = RunnerWrapper(inner)
    assert outer.name == "fake"
    handle = await outer.submit(as_request(WF))
    assert (await outer.status(handle)).state is JobState.SUCCEEDED
    assert (await outer.wait(handle)).job_id == handle.job_id
    assert [e.type async for e in outer.events(handle)][-1] is EventType.SUCCEEDED
    assert (await outer.health()).ok
    await outer.aclose()
    assert inner.closed


def test_as_request_accepts_workflows_and_fields():
    req = as_request(Workflow.load(WF), timeout=5)
    assert isinstance(req, JobRequest) and req.timeout == 5
    again = as_request(req, tags={"a": "b"})
    assert again.tags == {"a": "b"} and again.request_id == req.request_id


def test_sync_facade_drives_the_same_async_runner():
    runner = ScriptedRunner(auto="succeed")
    with SyncRunner(runner) as sync:
        result = sync.run(WF)
        assert result.provider == "fake"
        handle = sync.submit(WF)
        assert [e.type for e in sync.events(handle)] == [EventType.QUEUED, EventType.STARTED, EventType.SUCCEEDED]
        assert sync.status(handle).state is JobState.SUCCEEDED
        assert sync.health().ok
        # callable from other threads too
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(sync.run(WF).job_id))
        t.start()
        t.join()
        assert out and out[0].startswith("fake-")
    assert runner.closed
    with pytest.raises(RuntimeError, match="closed"):
        sync.status(handle)


def test_as_request_validates_updated_fields(tmp_path):
    from gpubridge.errors import WorkflowInputError
    from gpubridge.models import InputFile

    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    req = as_request(as_request(WF), inputs={"a.png": png})
    assert isinstance(req.inputs["a.png"], InputFile)
    with pytest.raises(WorkflowInputError):
        as_request(req, inputs={"../a.png": png})
