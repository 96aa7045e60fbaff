"""Replay the recorded runs of a real ComfyUI 0.3.64 and compare the double's websocket frames and history."""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import aiohttp
import pytest

from gpubridge.testing import ComfyDouble

from .conftest import assert_shape, message_types, png_info, recorded_types, recording, small_png


def _recorded_frames(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["json"] for m in messages if m.get("kind") == "text" and m["direction"] == "server->client"]


def assert_frames_like(frames: list[tuple[str, Any]], messages: list[dict[str, Any]]) -> None:
    """Same frame types in the same order, and every frame shaped like the recorded frame at its place."""
    assert message_types(frames) == recorded_types(messages)
    recorded = [m for m in messages if m.get("direction", "server->client") == "server->client"]
    for index, ((kind, body), theirs) in enumerate(zip(frames, recorded, strict=True)):
        if kind == "text":
            assert_shape(body, theirs["json"], f"<#{index} {body['type']}>")


def _statuses(frames: list[tuple[str, Any]]) -> list[int]:
    return [
        f[1]["data"]["status"]["exec_info"]["queue_remaining"]
        for f in frames
        if f[0] == "text" and f[1]["type"] == "status"
    ]


def _recorded_statuses(messages: list[dict[str, Any]]) -> list[int]:
    return [
        m["json"]["data"]["status"]["exec_info"]["queue_remaining"]
        for m in messages
        if m.get("kind") == "text" and m["json"]["type"] == "status"
    ]


def _of_type(frames: list[tuple[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f[1]["data"] for f in frames if f[0] == "text" and f[1]["type"] == kind]


def _history_entry(body: dict[str, Any]) -> dict[str, Any]:
    (entry,) = body.values()
    return entry


async def _post(
    http: aiohttp.ClientSession, request: dict[str, Any], client_id: str | None
) -> dict[str, Any]:
    body = copy.deepcopy(request)
    body.pop("client_id", None)
    if client_id is not None:
        body["client_id"] = client_id
    response = await http.post("/prompt", json=body)
    assert response.status == 200, await response.text()
    return await response.json()


SUCCESS = recording("prompt_success.json")
WS_SUCCESS = recording("ws_success.json")


async def test_success_run(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    ws = await connect("client-a")
    answer = await _post(http, SUCCESS["request"]["json"], "client-a")
    assert_shape(answer, SUCCESS["response"]["body"])
    assert answer["node_errors"] == SUCCESS["response"]["body"]["node_errors"]
    await ws.until_done(answer["prompt_id"])
    assert_frames_like(ws.frames, WS_SUCCESS["messages"])
    assert _statuses(ws.frames) == _recorded_statuses(WS_SUCCESS["messages"])
    assert ws.frames[0][1]["data"]["sid"] == "client-a"
    recorded = _recorded_frames(WS_SUCCESS["messages"])
    for kind in ("execution_cached", "executed"):
        ours = sorted(
            json.dumps(d["output"] if kind == "executed" else d["nodes"]) for d in _of_type(ws.frames, kind)
        )
        theirs = sorted(
            json.dumps(f["data"]["output"] if kind == "executed" else f["data"]["nodes"])
            for f in recorded
            if f["type"] == kind
        )
        temp = re.compile(r"ComfyUI_temp_[a-z]{5}_")
        assert [temp.sub("T_", x) for x in ours] == [temp.sub("T_", x) for x in theirs]
    assert [d["node"] for d in _of_type(ws.frames, "executing")] == [
        f["data"]["node"] for f in recorded if f["type"] == "executing"
    ]

    history = await (await http.get(f"/history/{answer['prompt_id']}")).json()
    recorded_history = recording("history_success.json")
    assert_shape(history, recorded_history["response"]["body"], dynamic=True)
    entry, expected = _history_entry(history), _history_entry(recorded_history["response"]["body"])
    assert entry["prompt"][2] == expected["prompt"][2] and sorted(entry["prompt"][4]) == sorted(
        expected["prompt"][4]
    )
    assert entry["prompt"][3] == {"client_id": "client-a"}
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in expected["status"]["messages"]]
    assert {k: v for k, v in entry["status"].items() if k != "messages"} == {
        k: v for k, v in expected["status"].items() if k != "messages"
    }
    assert set(entry["outputs"]) == set(expected["outputs"]) and set(entry["meta"]) == set(expected["meta"])
    assert entry["outputs"]["3"] == expected["outputs"]["3"]
    latest = await (await http.get("/history?max_items=1")).json()
    assert_shape(latest, recorded_history["history_max_items_1"]["response"]["body"], dynamic=True)
    assert list(latest) == [answer["prompt_id"]]


async def test_observer_sees_only_status_frames(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    recorded = recording("ws_observer_other_client.json")
    ws = await connect("client-a")
    observer = await connect("observer-client")
    answer = await _post(http, SUCCESS["request"]["json"], "client-a")
    await ws.until_done(answer["prompt_id"])
    await observer.until(
        lambda f: (
            f[0] == "text"
            and f[1]["data"]["status"]["exec_info"]["queue_remaining"] == 0
            and len(observer.frames) > 1
        )
    )
    assert message_types(observer.frames) == recorded_types(recorded["messages"])
    assert _statuses(observer.frames) == _recorded_statuses(recorded["messages"])


async def test_prompt_without_client_id(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    recorded = recording("ws_no_client_id.json")
    first = await connect("warmup")
    warm = await _post(http, SUCCESS["request"]["json"], "warmup")  # shares nodes 4 and 5 with the next one
    await first.until_done(warm["prompt_id"])
    ws = await connect("someone-else")
    answer = await _post(http, recorded["request"]["json"], None)
    assert_shape(answer, recorded["response"]["body"])
    job = await comfy.wait_for_state(answer["prompt_id"])
    assert job.state == "success"
    await ws.until(
        lambda f: (
            f[0] == "text"
            and f[1]["type"] == "status"
            and f[1]["data"]["status"]["exec_info"]["queue_remaining"] == 0
        )
    )
    assert_frames_like(ws.frames, recorded["messages"])
    history = await (await http.get(f"/history/{answer['prompt_id']}")).json()
    assert_shape(history, recorded["history"]["body"], dynamic=True)
    entry, expected = _history_entry(history), _history_entry(recorded["history"]["body"])
    assert entry["prompt"][3] == expected["prompt"][3] == {}
    assert entry["status"]["messages"][1][1]["nodes"] == expected["status"]["messages"][1][1]["nodes"]


async def test_cached_rerun(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    recorded = recording("ws_cached_rerun.json")
    first = await connect("first")
    answer = await _post(http, SUCCESS["request"]["json"], "first")
    frames = await first.until_done(answer["prompt_id"])
    outputs_first = {d["node"]: d["output"] for d in _of_type(frames, "executed")}
    files_before = sorted(os.listdir(os.path.join(comfy.output_dir, "gpubridge")))
    ws = await connect("second")
    again = await _post(http, recorded["request"]["json"], "second")
    await ws.until_done(again["prompt_id"])
    assert_frames_like(ws.frames, recorded["messages"])
    (cached,) = _of_type(ws.frames, "execution_cached")
    assert (
        cached["nodes"]
        == [
            f["data"]["nodes"]
            for f in _recorded_frames(recorded["messages"])
            if f["type"] == "execution_cached"
        ][0]
    )
    assert {d["node"]: d["output"] for d in _of_type(ws.frames, "executed")} == outputs_first
    assert sorted(os.listdir(os.path.join(comfy.output_dir, "gpubridge"))) == files_before
    history = await (await http.get(f"/history/{again['prompt_id']}")).json()
    assert_shape(history, recorded["history"]["body"], dynamic=True)
    assert _history_entry(history)["outputs"] == {n: o for n, o in outputs_first.items()}


async def test_runtime_error(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    request = recording("prompt_runtime_error.json")["request"]["json"]
    recorded = recording("ws_error.json")
    ws = await connect("failing")
    answer = await _post(http, request, "failing")
    assert answer["node_errors"] == {}
    await ws.until_done(answer["prompt_id"])
    assert_frames_like(ws.frames, recorded["messages"])
    (error,) = _of_type(ws.frames, "execution_error")
    (expected,) = [
        f["data"] for f in _recorded_frames(recorded["messages"]) if f["type"] == "execution_error"
    ]
    for key in ("node_id", "node_type", "exception_message", "exception_type"):
        assert error[key] == expected[key]
    assert sorted(error["executed"]) == sorted(expected["executed"])
    assert sorted(error["current_outputs"]) == sorted(expected["current_outputs"])
    assert error["current_inputs"].keys() == expected["current_inputs"].keys()
    assert error["current_inputs"]["mode"] == expected["current_inputs"]["mode"]
    assert all(isinstance(line, str) for line in error["traceback"]) and error["traceback"]

    history = await (await http.get(f"/history/{answer['prompt_id']}")).json()
    recorded_history = recording("history_error.json")["response"]["body"]
    assert_shape(history, recorded_history, dynamic=True)
    entry, expected_entry = _history_entry(history), _history_entry(recorded_history)
    assert {k: v for k, v in entry["status"].items() if k != "messages"} == {
        k: v for k, v in expected_entry["status"].items() if k != "messages"
    }
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in expected_entry["status"]["messages"]]
    assert set(entry["outputs"]) == set(expected_entry["outputs"])
    assert entry["status"]["messages"][-1][1]["exception_type"] == "AssertionError"


async def test_runtime_error_when_the_input_file_vanishes(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    recorded = recording("runtime_error_loadimage_deleted.json")
    form = aiohttp.FormData()
    form.add_field(
        "image", small_png(20, 12, (1, 2, 3)), filename="gpubridge_vanish.png", content_type="image/png"
    )
    upload = await (await http.post("/upload/image", data=form)).json()
    assert upload == recorded["upload_response"]["body"]
    ws = await connect("vanish")
    comfy.hold("A/1")  # job A is "slow": its first node runs until released
    a = await _post(http, {**recorded["request_A_slow"]["json"], "prompt_id": "A"}, "vanish")
    await comfy.wait_until(lambda: comfy.jobs["A"].node == "1")
    b = await _post(http, recorded["request_B"]["json"], "vanish")
    assert_shape(a, recorded["response_A"]["body"])
    assert_shape(b, recorded["response_B"]["body"])
    assert b["number"] == a["number"] + 1
    os.unlink(os.path.join(comfy.input_dir, "gpubridge_vanish.png"))
    comfy.release()
    await ws.until_done(b["prompt_id"])
    assert_frames_like(ws.frames, recorded["ws_messages"])
    (error,) = _of_type(ws.frames, "execution_error")
    (expected,) = [
        f["data"] for f in _recorded_frames(recorded["ws_messages"]) if f["type"] == "execution_error"
    ]
    for key in ("node_id", "node_type", "exception_type", "executed", "current_inputs"):
        assert error[key] == expected[key]
    assert sorted(error["current_outputs"]) == sorted(expected["current_outputs"])
    pattern = re.escape(expected["exception_message"]).replace(re.escape("/srv/ComfyUI/input"), ".*")
    assert re.fullmatch(pattern, error["exception_message"], re.S)
    history = await (await http.get(f"/history/{b['prompt_id']}")).json()
    assert_shape(history, recorded["history_B"]["body"], dynamic=True)


LOADIMAGE = recording("loadimage_workflow.json")


async def _upload(http: aiohttp.ClientSession, data: bytes, filename: str, **fields: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    form.add_field("image", data, filename=filename, content_type="image/png")
    response = await http.post("/upload/image", data=form)
    assert response.status == 200
    return await response.json()


async def test_loadimage_workflow(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    image = small_png(20, 12, (200, 100, 50))
    await _upload(http, image, "gpubridge_in.png", subfolder="gpubridge")
    await _upload(http, image, "gpubridge_in.png")
    await _upload(http, image, "gpubridge_in_temp.png", type="temp")
    ws = await connect("loader")
    answer = await _post(http, LOADIMAGE["request"]["json"], "loader")
    assert answer["node_errors"] == LOADIMAGE["response"]["body"]["node_errors"]
    await ws.until_done(answer["prompt_id"])
    assert_frames_like(ws.frames, LOADIMAGE["ws_messages"])
    history = await (await http.get(f"/history/{answer['prompt_id']}")).json()
    assert_shape(history, LOADIMAGE["history"]["body"], dynamic=True)
    entry = _history_entry(history)
    saved = entry["outputs"]["3"]["images"][0]
    assert saved == _history_entry(LOADIMAGE["history"]["body"])["outputs"]["3"]["images"][0]
    data = await (await http.get("/view", params=saved)).read()
    assert (png_info(data)["png_width"], png_info(data)["png_height"]) == (20, 12)  # the real file's size
    mask_preview = entry["outputs"]["6"]["images"][0]
    info = png_info(await (await http.get("/view", params=mask_preview)).read())
    assert (info["png_width"], info["png_height"]) == (64, 64)  # LoadImage: a 64x64 mask without alpha


async def test_loadimage_of_a_non_image_fails_at_execution(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    recorded = LOADIMAGE["junk_file_case"]
    await _upload(http, b"not an image at all", "gpubridge_in_junk.jpg")
    ws = await connect("junk")
    answer = await _post(http, recorded["request"]["json"], "junk")
    assert answer["node_errors"] == {}
    await ws.until_done(answer["prompt_id"])
    assert_frames_like(ws.frames, recorded["ws_messages"])
    (error,) = _of_type(ws.frames, "execution_error")
    (expected,) = [
        f["data"] for f in _recorded_frames(recorded["ws_messages"]) if f["type"] == "execution_error"
    ]
    assert error["exception_type"] == expected["exception_type"] == "PIL.UnidentifiedImageError"
    pattern = re.escape(expected["exception_message"]).replace(re.escape("/srv/ComfyUI/input"), ".*")
    assert re.fullmatch(pattern, error["exception_message"], re.S)


async def test_text_output(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    recorded = recording("run_text_output_previewany.json")
    ws = await connect("texts")
    answer = await _post(http, recorded["request"]["json"], "texts")
    await ws.until_done(answer["prompt_id"])
    assert_frames_like(ws.frames, recorded["ws_messages"])
    assert [d["output"] for d in _of_type(ws.frames, "executed")] == [
        f["data"]["output"] for f in _recorded_frames(recorded["ws_messages"]) if f["type"] == "executed"
    ]
    history = await (await http.get(f"/history/{answer['prompt_id']}")).json()
    assert (
        _history_entry(history)["outputs"] == _history_entry(recorded["history_response"]["body"])["outputs"]
    )


def _binary_headers(frames: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for kind, data in frames:
        if kind != "binary":
            continue
        event = int.from_bytes(data[:4], "big")
        item: dict[str, Any] = {"event_type": event}
        if event == 1:
            item["image_format_code"] = int.from_bytes(data[4:8], "big")
            info = png_info(data[8:])
            item["image"] = (info["png_width"], info["png_height"])
        elif event == 3:
            size = int.from_bytes(data[4:8], "big")
            item["node_id"] = data[8 : 8 + size].decode()
            item["text"] = data[8 + size :].decode()
        elif event == 4:
            size = int.from_bytes(data[4:8], "big")
            item["metadata"] = json.loads(data[8 : 8 + size])
            info = png_info(data[8 + size :])
            item["image"] = (info["png_width"], info["png_height"])
        out.append(item)
    return out


def _recorded_binary(messages: list[dict[str, Any]], prompt_id: str | None = None) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m.get("kind") != "binary":
            continue
        item: dict[str, Any] = {"event_type": m["event_type"]}
        if m["event_type"] == 1:
            item["image_format_code"] = m["image_format_code"]
            item["image"] = (m["image"]["png_width"], m["image"]["png_height"])
        elif m["event_type"] == 3:
            item["node_id"], item["text"] = m["node_id"], m["text"]
        elif m["event_type"] == 4:
            item["metadata"] = dict(m["metadata"], prompt_id=prompt_id)
            item["image"] = (m["image"]["png_width"], m["image"]["png_height"])
        out.append(item)
    return out


@pytest.mark.parametrize("name", ["ws_binary_legacy.json", "ws_binary_preview_metadata.json"])
async def test_binary_frames(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any, name: str
) -> None:
    recorded = recording(name)
    client_frames = [m for m in recorded["messages"] if m["direction"] == "client->server"]
    flags = client_frames[0]["json"]["data"] if client_frames else None
    ws = await connect("binary", feature_flags=flags)
    if flags is not None:
        negotiated = await ws.until_type("feature_flags")
        assert (
            negotiated
            == [
                m["json"]
                for m in recorded["messages"]
                if m["direction"] == "server->client"
                and m.get("kind") == "text"
                and m["json"]["type"] == "feature_flags"
            ][0]
        )
    answer = await _post(http, recorded["request"]["json"], "binary")
    await ws.until_done(answer["prompt_id"])
    assert_frames_like(ws.frames, recorded["messages"])
    assert _binary_headers(ws.frames) == _recorded_binary(recorded["messages"], answer["prompt_id"])
    history = await (await http.get(f"/history/{answer['prompt_id']}")).json()
    assert _history_entry(history)["outputs"] == _history_entry(recorded["history"]["body"])["outputs"]


async def test_video_outputs(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    cases = recording("video_outputs.json")["cases"]
    for name, case in cases.items():  # in the recorded order: later cases reuse cached nodes 1 and 2
        ws = await connect(f"video-{name}")
        answer = await _post(http, {"prompt": case["request"]["prompt"]}, f"video-{name}")
        await ws.until_done(answer["prompt_id"])
        ours = [f for f in ws.frames if not (f[0] == "text" and f[1]["type"] == "progress_state")]
        assert [f[1]["type"] for f in ours] == [m["type"] for m in case["ws"]], name
        (executed,) = _of_type(ours, "executed")
        (expected,) = [m["data"] for m in case["ws"] if m["type"] == "executed"]
        assert executed["output"].keys() == expected["output"].keys()
        assert executed["output"]["animated"] == expected["output"]["animated"]
        (image,) = executed["output"]["images"]
        (expected_image,) = expected["output"]["images"]
        assert image["subfolder"] == expected_image["subfolder"] and image["type"] == expected_image["type"]
        assert os.path.splitext(image["filename"])[1] == os.path.splitext(expected_image["filename"])[1]
        assert re.fullmatch(r"[a-z]+_\d{5}_\.[a-z0-9]+", image["filename"])
        history = await (await http.get(f"/history/{answer['prompt_id']}")).json()
        assert_shape(history, case["history"], dynamic=True)
        assert (
            _history_entry(history)["prompt"][2] == _history_entry(case["history"])["prompt"][2]
        )  # coerced fps
        (view,) = case["views"]
        response = await http.get("/view", params=image)
        data = await response.read()
        assert response.status == view["status"]
        assert response.headers["Content-Type"] == view["content_type"]
        magic = bytes.fromhex(view["first_bytes"])
        length = 4 if magic.startswith(b"RIFF") else len(magic)
        assert data[:length] == magic[:length]
        if magic.startswith(b"RIFF"):
            assert data[8:12] == magic[8:12]


async def test_feature_flags_answer_equals_get_features(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("flags", feature_flags={"supports_preview_metadata": True})
    frame = await ws.until_type("feature_flags")
    assert frame["data"] == await (await http.get("/features")).json()


# ------------------------------------------------------------------------------------------ queue control

QUEUE = recording("queue_control.json")


async def test_queue_control(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    steps = {s["step"]: s for s in QUEUE["steps"]}
    slow = steps["GET /queue with A running, B C D pending"]["full_response_example"]["body"][
        "queue_running"
    ][0][2]
    ws = await connect("control")
    comfy.hold("A/10", "B/10", "D/10")

    def job(name: str) -> dict[str, Any]:
        prompt = copy.deepcopy(slow)
        prompt["1"]["inputs"]["color"] = ord(name)
        return {"prompt": prompt, "prompt_id": name, "client_id": "control"}

    for name in "ABCD":
        answer = await (await http.post("/prompt", json=job(name))).json()
        assert_shape(answer, steps[f"POST /prompt job {name}"]["response"])
    await comfy.wait_for_state("A", "running")
    queue = await (await http.get("/queue")).json()
    assert_shape(queue, steps["GET /queue with A running, B C D pending"]["full_response_example"]["body"])
    assert [item[1] for item in queue["queue_running"]] == ["A"]
    assert sorted(item[1] for item in queue["queue_pending"]) == ["B", "C", "D"]
    assert await (await http.get("/prompt")).json() == steps["GET /prompt"]["response"]
    assert (
        await (await http.get("/history/A")).json()
        == steps["GET /history/{A} while A runs and /history/{B} while B is pending"]["running_body"]
    )

    deleted = await http.post("/queue", json={"delete": ["C"]})
    assert (deleted.status, await deleted.text()) == (200, "")
    assert deleted.headers.get("Content-Type") is None
    await http.post("/queue", json={"delete": ["no-such-prompt-id"]})
    queue = await (await http.get("/queue")).json()
    assert sorted(item[1] for item in queue["queue_pending"]) == ["B", "D"]

    await http.post("/interrupt", json={"prompt_id": "B"})  # only pending: no effect
    await comfy.wait_until(lambda: comfy.jobs["A"].node == "10")
    await http.post("/interrupt")  # A is inside node 10: lands at the next node boundary
    comfy.release("A/10")
    interrupted = await ws.until_type("execution_interrupted")
    expected = steps["ws execution_interrupted for A received"]["frame"]
    assert_shape(interrupted, expected)
    assert interrupted["data"]["prompt_id"] == "A"
    for key in ("node_id", "node_type"):
        assert interrupted["data"][key] == expected["data"][key]
    assert sorted(interrupted["data"]["executed"]) == sorted(expected["data"]["executed"])

    await comfy.wait_until(lambda: comfy.jobs["B"].node == "10")
    await http.post("/interrupt", json={"prompt_id": "B"})  # B is running now: interrupted
    comfy.release("B/10")
    frame = await ws.until_type("execution_interrupted")
    assert frame["data"]["prompt_id"] == "B" and frame["data"]["node_id"] == "11"

    await comfy.wait_until(lambda: comfy.jobs["D"].node == "10")
    for name in "EF":
        await http.post("/prompt", json=job(name))
    queue = await (await http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == ["D"]
    assert sorted(item[1] for item in queue["queue_pending"]) == ["E", "F"]
    await http.post("/queue", json={"clear": True})
    queue = await (await http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == ["D"] and queue["queue_pending"] == []

    second = await connect("control")  # reconnect with the same clientId while D runs
    assert second.frames[-1][1]["data"]["sid"] == "control"
    rejoin = await second.recv()
    assert rejoin == ("text", {"type": "executing", "data": {"node": "10"}})
    comfy.release()
    await second.until_done("D")
    recorded_rejoin = QUEUE["ws_messages_reconnected_socket_same_client_id"]
    after_node_10 = (
        next(
            i
            for i, m in enumerate(recorded_rejoin)
            if m["json"]["type"] == "executing" and m["json"]["data"]["node"] == "10"
        )
        + 1
    )
    assert_frames_like(second.frames[2:], recorded_rejoin[after_node_10:])  # the rest of D, as recorded

    for name, expected_entry in QUEUE["history"].items():
        history = await (await http.get(f"/history/{name}")).json()
        if not expected_entry:
            assert history == {}, name
            continue
        assert_shape(history, expected_entry, dynamic=True)
        entry, recorded_entry = _history_entry(history), _history_entry(expected_entry)
        assert entry["status"]["status_str"] == recorded_entry["status"]["status_str"], name
        assert entry["status"]["completed"] == recorded_entry["status"]["completed"], name
        assert [m[0] for m in entry["status"]["messages"]] == [
            m[0] for m in recorded_entry["status"]["messages"]
        ]
        assert (
            set(entry["outputs"]) == set(recorded_entry["outputs"])
            and entry["meta"].keys() == recorded_entry["meta"].keys()
        )
    assert comfy.stats.deletes == 1 and comfy.stats.interrupts == 3

    await comfy.stop()  # the replaced socket now gets its close frame: everything sent to it came before
    await ws.until(lambda f: f[0] == "closed")
    of_d = [f[1] for f in ws.frames if f[0] == "text" and f[1]["data"].get("prompt_id") == "D"]
    assert of_d[-1] == {"type": "executing", "data": {"node": "10", "display_node": "10", "prompt_id": "D"}}
