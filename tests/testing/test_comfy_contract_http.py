"""Replay the recorded HTTP exchanges of a real ComfyUI 0.3.64 against the double (over a real socket)."""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import aiohttp
import pytest

from gpubridge.testing import ComfyDouble

from .conftest import assert_shape, png_info, recorded_png, recording, small_png

GET = recording("get_endpoints.json")
VALIDATION = recording("prompt_validation_errors.json")["cases"]
ACCEPTED = recording("prompt_accepted_variants.json")
UPLOADS = recording("upload_image.json")
VIEW = recording("view.json")
QUEUE = recording("queue_control.json")

TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"


def _content_type(headers: Any) -> str | None:
    return headers.get("Content-Type")


async def _request(
    http: aiohttp.ClientSession, request: dict[str, Any], **extra: Any
) -> aiohttp.ClientResponse:
    kwargs: dict[str, Any] = {"headers": dict(request.get("headers", {}))}
    if "json" in request:
        kwargs["json"] = request["json"]
    elif "raw_body" in request:
        kwargs["data"] = request["raw_body"].encode()
    kwargs.update(extra)
    return await http.request(request["method"], request["path"], **kwargs)


async def _body(response: aiohttp.ClientResponse, recorded: dict[str, Any]) -> Any:
    if "body" in recorded:
        return await response.json()
    return await response.text()


# ------------------------------------------------------------------------------------------ GET endpoints


EXACT = {
    "/queue",
    "/prompt",
    "/history",
    "/history?max_items=1",
    "/history/00000000-0000-0000-0000-000000000000",
    "/embeddings",
    "/features",
    "/models",
    "/models/checkpoints",
    "/object_info/EmptyImage",
    "/object_info/NoSuchNode",
    "/users",
}


@pytest.mark.parametrize("exchange", GET["endpoints"], ids=lambda e: e["request"]["path"])
async def test_get_endpoints(bare_comfy: ComfyDouble, exchange: dict[str, Any]) -> None:
    recorded = exchange["response"]
    async with aiohttp.ClientSession(base_url=bare_comfy.url) as http:
        response = await http.get(exchange["request"]["path"])
        assert response.status == recorded["status"]
        assert _content_type(response.headers) == recorded["headers"].get("Content-Type")
        body = await _body(response, recorded)
    if exchange["request"]["path"] in EXACT:
        assert body == recorded["body"]
    elif "body" in recorded:
        expected = recorded["body"]
        if isinstance(expected, list) and expected and expected[-1] == "...truncated":
            expected = expected[:-1]
        assert_shape(body, expected)
    else:
        assert body == recorded["body_text"]


@pytest.mark.parametrize("check", GET["api_prefix_check"], ids=lambda c: c["path"])
async def test_api_prefix(comfy: ComfyDouble, http: aiohttp.ClientSession, check: dict[str, Any]) -> None:
    if check["path"].startswith("POST "):
        plain = await http.post(check["path"][5:], json=check["request_json"])
        api = await http.post(check["api_path"][5:], json=check["request_json"])
        recorded = check["api_response"]
        assert api.status == plain.status == check["api_status"]
        assert await api.text() == await plain.text() == recorded["body_text"]
        assert _content_type(api.headers) == recorded["headers"].get("Content-Type")
        return
    plain = await http.get(check["path"])
    api = await http.get(check["api_path"])
    assert (plain.status, api.status) == (check["plain_status"], check["api_status"])
    plain_body, api_body = await plain.read(), await api.read()
    if check["same_body"] and check["path"] != "/system_stats":  # ram_free changes between two calls
        assert plain_body == api_body
    if "api_response" in check:
        assert _content_type(api.headers) == check["api_response"]["headers"].get("Content-Type")


async def test_api_prefix_websocket(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    recorded = GET["ws_api_prefix"]
    async with http.ws_connect(recorded["url"]) as ws:
        first = await ws.receive_json()
    assert first == recorded["messages"][0]["json"]


async def test_websocket_without_client_id_gets_a_uuid_hex_sid(
    comfy: ComfyDouble, http: aiohttp.ClientSession
) -> None:
    recorded = GET["ws_without_client_id"]["messages"][0]["json"]
    async with http.ws_connect(GET["ws_without_client_id"]["url"]) as ws:
        first = await ws.receive_json()
    assert_shape(first, recorded)
    assert re.fullmatch(r"[0-9a-f]{32}", first["data"]["sid"])
    assert re.fullmatch(r"[0-9a-f]{32}", recorded["data"]["sid"])


@pytest.mark.parametrize(
    "exchange",
    GET["misc"],
    ids=lambda e: (
        f"{e['request']['method']} {e['request']['path']} {e['request'].get('headers', {}).get('Origin', '')}"
    ),
)
async def test_misc_quirks(comfy: ComfyDouble, http: aiohttp.ClientSession, exchange: dict[str, Any]) -> None:
    request = copy.deepcopy(exchange["request"])
    origin = request.get("headers", {}).get("Origin")
    if origin == "http://127.0.0.1:8188":  # the recorded server's own origin: here, the double's
        request["headers"]["Origin"] = comfy.url
    recorded = exchange["response"]
    response = await _request(http, request)
    assert response.status == recorded["status"]
    headers = recorded["headers"]
    assert _content_type(response.headers) == headers.get("Content-Type")
    for name in ("Allow", "Transfer-Encoding"):
        assert response.headers.get(name) == headers.get(name)
    if request["path"] == "/":
        return  # the frontend's index.html
    if "body_binary" in recorded:
        assert len(await response.read()) == recorded["body_binary"]["length"]
    elif "body_text" in recorded:
        assert await response.text() == recorded["body_text"]
    else:
        assert await response.json() == recorded["body"]


# ------------------------------------------------------------------------------------------ POST /prompt


def _comparable(body: Any) -> Any:
    body = copy.deepcopy(body)
    if isinstance(body, dict):
        for entry in body.get("node_errors", {}).values():
            for error in entry["errors"]:
                if "traceback" in error.get("extra_info", {}):
                    error["extra_info"]["traceback"] = "<traceback>"
            entry["errors"].sort(key=lambda e: json.dumps(e, sort_keys=True))
    return body


@pytest.mark.parametrize("case", VALIDATION, ids=lambda c: c["case"])
async def test_prompt_validation_answers(bare_comfy: ComfyDouble, case: dict[str, Any]) -> None:
    recorded = case["response"]
    async with aiohttp.ClientSession(base_url=bare_comfy.url) as http:
        response = await _request(http, case["request"])
        assert response.status == recorded["status"]
        assert _content_type(response.headers) == recorded["headers"]["Content-Type"]
        if "body_text" in recorded:
            assert await response.text() == recorded["body_text"] == TROUBLE
            assert response.headers.get("Connection") == recorded["headers"].get("Connection")
            return
        body = await response.json()
    if recorded["status"] == 200:
        assert_shape(body, recorded["body"])
        assert _comparable({"node_errors": body["node_errors"]}) == _comparable(
            {"node_errors": recorded["body"]["node_errors"]}
        )
    else:
        assert _comparable(body) == _comparable(recorded["body"])


async def test_number_counts_every_post_without_an_explicit_number(
    comfy: ComfyDouble, http: aiohttp.ClientSession
) -> None:
    rejected = next(c for c in VALIDATION if c["case"] == "c2_value_above_max")["request"]["json"]
    valid = ACCEPTED["cases"][0]["request"]["json"]
    comfy.pause()
    assert (await http.post("/prompt", json=rejected)).status == 400
    assert (await http.post("/prompt", json={"client_id": "x"})).status == 400  # no_prompt counts too
    first = await (await http.post("/prompt", json=valid)).json()
    assert first["number"] == 2
    assert (await http.post("/prompt", data=b"{", headers={"Content-Type": "application/json"})).status == 500
    second = await (await http.post("/prompt", json=valid)).json()
    assert second["number"] == 3  # unreadable JSON never reaches the counter


@pytest.mark.parametrize("case", ACCEPTED["cases"], ids=lambda c: c["case"])
async def test_accepted_variants(
    comfy: ComfyDouble, http: aiohttp.ClientSession, case: dict[str, Any]
) -> None:
    comfy.pause()
    for _ in range(3):  # move the counter off 0 so that front:true shows its sign
        await http.post("/prompt", json={})
    request = case["request"]["json"]
    response = await http.post("/prompt", json=request)
    recorded = case["response"]
    assert response.status == recorded["status"]
    body = await response.json()
    assert_shape(body, recorded["body"])
    assert body["node_errors"] == recorded["body"]["node_errors"]
    if "prompt_id" in request:
        assert body["prompt_id"] == request["prompt_id"] == recorded["body"]["prompt_id"]
    if "number" in request:
        assert body["number"] == recorded["body"]["number"] == float(request["number"])
        assert isinstance(body["number"], float)
    if request.get("front"):
        assert body["number"] < 0 and recorded["body"]["number"] < 0
    queue = await (await http.get("/queue")).json()
    (item,) = queue["queue_pending"]
    assert item[0] == body["number"] and item[1] == body["prompt_id"]


async def test_coerced_values_are_what_gets_queued(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    case = next(c for c in ACCEPTED["cases"] if c["case"] == "c1b_numeric_string_for_int")
    comfy.pause()
    body = await (await http.post("/prompt", json=case["request"]["json"])).json()
    queue = await (await http.get("/queue")).json()
    queued = queue["queue_pending"][0][2]["1"]["inputs"]
    assert queued["width"] == int(case["request"]["json"]["prompt"]["1"]["inputs"]["width"])
    assert isinstance(queued["width"], int) and isinstance(queued["height"], int)
    assert body["prompt_id"] == queue["queue_pending"][0][1]


async def test_png_metadata_of_outputs(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    for recorded in ACCEPTED["png_metadata_of_outputs"]:
        case = next(c for c in ACCEPTED["cases"] if c["case"] == recorded["case"])
        request = case["request"]["json"]
        prompt_id = (await (await http.post("/prompt", json=request)).json())["prompt_id"]
        await comfy.wait_for_state(prompt_id, "success")
        history = await (await http.get(f"/history/{prompt_id}")).json()
        (output,) = history[prompt_id]["outputs"].values()
        image = output["images"][0]
        response = await http.get(
            "/view",
            params={"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]},
        )
        info = png_info(await response.read())
        assert recorded_png(recorded["png"]) == {k: v for k, v in info.items() if k != "texts"}
        assert json.loads(info["texts"]["prompt"]) == request["prompt"]
        for key, value in request.get("extra_data", {}).get("extra_pnginfo", {}).items():
            assert json.loads(info["texts"][key]) == value == recorded["png_text"][key]


async def test_queue_right_after_submit(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    recorded = recording("prompt_success.json")
    comfy.hold("SaveImage")
    body = await (await http.post("/prompt", json=recorded["request"]["json"])).json()
    await comfy.wait_for_state(body["prompt_id"], "running")
    response = await http.get("/queue")
    queue = await response.json()
    assert _content_type(response.headers) == recorded["queue_right_after_submit"]["headers"]["Content-Type"]
    assert_shape(queue, recorded["queue_right_after_submit"]["body"])
    running = queue["queue_running"][0]
    expected = recorded["queue_right_after_submit"]["body"]["queue_running"][0]
    assert running[2] == expected[2] and running[3] == expected[3]
    assert sorted(running[4]) == sorted(expected[4])
    prompt = await (await http.get("/prompt")).json()
    assert prompt == {"exec_info": {"queue_remaining": 1}}
    comfy.release()
    await comfy.wait_for_state(body["prompt_id"], "success")


# --------------------------------------------------------------------------------------- queue, free, history


async def test_free_and_misc(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    for exchange in QUEUE["free_and_misc"]:
        recorded = exchange["response"]
        response = await _request(http, exchange["request"])
        assert response.status == recorded["status"], exchange["request"]
        assert _content_type(response.headers) == recorded["headers"].get("Content-Type")
        assert await response.text() == recorded["body_text"]
        assert response.headers.get("Connection") == recorded["headers"].get("Connection")


async def test_history_delete_and_clear(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    prompt = ACCEPTED["cases"][0]["request"]["json"]
    ids = []
    for color in (1, 2):
        request = copy.deepcopy(prompt)
        request["prompt"]["1"]["inputs"]["color"] = color
        ids.append((await (await http.post("/prompt", json=request)).json())["prompt_id"])
    for prompt_id in ids:
        await comfy.wait_for_state(prompt_id, "success")
    delete, clear = QUEUE["history_delete"]
    response = await http.post("/history", json={"delete": [ids[0]]})
    assert (response.status, await response.text()) == (
        delete["response"]["status"],
        delete["response"]["body_text"],
    )
    assert await (await http.get(f"/history/{ids[0]}")).json() == delete["then_get_history_A"]["body"]
    assert ids[1] in await (await http.get("/history")).json()
    response = await http.post("/history", json={"clear": True})
    assert (response.status, await response.text()) == (
        clear["response"]["status"],
        clear["response"]["body_text"],
    )
    assert await (await http.get("/history")).json() == clear["then_get_history"]["body"]


# ------------------------------------------------------------------------------------------ uploads


async def test_upload_cases(bare_comfy: ComfyDouble) -> None:
    first, second = small_png(20, 12, (10, 20, 30)), small_png(20, 12, (40, 50, 60))
    contents: dict[str, bytes] = {}
    async with aiohttp.ClientSession(base_url=bare_comfy.url) as http:
        for case in UPLOADS["cases"]:
            request = case["request"]
            recorded = case["response"]
            if "raw_body" in request:
                response = await _request(http, request)
            else:
                form = aiohttp.FormData()
                for key, value in request["fields"].items():
                    form.add_field(key, value)
                spec = request.get("file")
                if spec is not None:
                    if spec["bytes"] < 40:
                        data = b"not an image at all"[: spec["bytes"]]
                    else:
                        # the recording used two different 20x12 PNGs: 80 and 82 bytes
                        data = second if spec["bytes"] == 82 else first
                    form.add_field(spec["field"], data, filename=spec["filename"], content_type="image/png")
                response = await http.post(request["path"], data=form)
            assert response.status == recorded["status"], case["case"]
            assert _content_type(response.headers) == recorded["headers"].get("Content-Type"), case["case"]
            if "body" in recorded:
                body = await response.json()
                assert body == recorded["body"], case["case"]
                contents[body["name"]] = data
            else:
                assert await response.text() == recorded["body_text"], case["case"]
        assert sorted(os.listdir(bare_comfy.input_dir)) == UPLOADS["input_dir_listing_after"]
        info = await (await http.get("/object_info/LoadImage")).json()
        assert info == UPLOADS["object_info_LoadImage_after_upload"]["body"]
        for exchange in UPLOADS["view_uploaded"]:
            response = await http.get(exchange["request"]["path"])
            assert response.status == exchange["response"]["status"]
            got = png_info(await response.read())
            assert {k: v for k, v in got.items() if k != "texts"} == recorded_png(
                exchange["response"]["body_binary"]
            )


# ------------------------------------------------------------------------------------------ /view


async def test_view_cases(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    recorded_run = recording("prompt_success.json")["request"]["json"]
    ws = await connect("viewer")
    prompt_id = (await (await http.post("/prompt", json={**recorded_run, "client_id": "viewer"})).json())[
        "prompt_id"
    ]
    frames = await ws.until_done(prompt_id)
    temp_name = next(
        f[1]["data"]["output"]["images"][0]["filename"]
        for f in frames
        if f[0] == "text" and f[1]["type"] == "executed" and f[1]["data"]["node"] == "5"
    )
    recorded_temp = "ComfyUI_temp_txxmt_00001_.png"
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", temp_name)

    for exchange in VIEW["outputs"] + VIEW["variants_and_errors"]:
        path = exchange["request"]["path"].replace(recorded_temp, temp_name)
        recorded = exchange["response"]
        response = await http.get(path)
        assert response.status == recorded["status"], path
        assert _content_type(response.headers) == recorded["headers"].get("Content-Type"), path
        disposition = recorded["headers"].get("Content-Disposition")
        if disposition is not None:
            disposition = disposition.replace(recorded_temp, temp_name)
        assert response.headers.get("Content-Disposition") == disposition, path
        data = await response.read()
        binary = recorded.get("body_binary")
        if binary is None:
            assert data == b""
            continue
        magic = bytes.fromhex(binary["first_16_bytes_hex"])
        length = 16 if binary.get("format") == "png" else 4  # a RIFF size follows the first 4 bytes
        assert data[:length] == magic[:length], path
        if binary.get("format") == "png":
            got = png_info(data)
            assert {k: v for k, v in got.items() if k != "texts"} == recorded_png(binary), path
            if "prompt" in got["texts"]:
                assert json.loads(got["texts"]["prompt"]) == recorded_run["prompt"]
        if exchange.get("same_bytes_as_plain"):
            plain = await http.get(path.replace("/api/view", "/view"))
            assert await plain.read() == data


async def test_object_info_is_the_recorded_one(bare_comfy: ComfyDouble) -> None:
    async with aiohttp.ClientSession(base_url=bare_comfy.url) as http:
        response = await http.get("/object_info")
        body = await response.json()
        api = await (await http.get("/api/object_info")).json()
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert body == api
    assert body.pop("VHS_VideoCombine")["output_node"] is True  # the one documented addition
    assert body == recording("object_info.json")
