"""The double beyond the recordings: ways to run it, hooks, counters, model files, outputs, caching."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from PIL import Image

from gpubridge.comfy.validate import validate_prompt
from gpubridge.testing import ComfyDouble
from gpubridge.testing.comfy import recorded_object_info

from .conftest import png_info, recording, small_png
from .test_comfy_faults import TINY, sampler_prompt, submit

FLUX_SCHNELL = {
    "10": {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "flux1-schnell.safetensors", "weight_dtype": "default"},
    },
    "11": {
        "class_type": "DualCLIPLoader",
        "inputs": {
            "clip_name1": "t5xxl_fp8_e4m3fn.safetensors",
            "clip_name2": "clip_l.safetensors",
            "type": "flux",
        },
    },
    "12": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["11", 0]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
    "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["10", 0],
            "seed": 42,
            "steps": 4,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["12", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux/schnell"}},
}

SDXL = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "10": {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["4", 0],
            "clip": ["4", 1],
            "lora_name": "example_lora.safetensors",
            "strength_model": 0.8,
            "strength_clip": 0.8,
        },
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle", "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 2}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["10", 0],
            "seed": 7,
            "steps": 3,
            "cfg": 6.5,
            "sampler_name": "dpmpp_2m",
            "scheduler": "karras",
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sdxl"}},
}


def img2img(image: str) -> dict[str, Any]:
    return {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        },
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["4", 2]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "oil painting", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": 3,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["2", 0],
                "denoise": 0.6,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "i2i"}},
    }


async def outputs_of(comfy: ComfyDouble, http: aiohttp.ClientSession, prompt_id: str) -> dict[str, Any]:
    job = await comfy.wait_for_state(prompt_id)
    assert job.state == "success", job.error
    return (await (await http.get(f"/history/{prompt_id}")).json())[prompt_id]["outputs"]


async def fetch(http: aiohttp.ClientSession, item: dict[str, str]) -> bytes:
    response = await http.get("/view", params={k: item[k] for k in ("filename", "subfolder", "type")})
    assert response.status == 200
    return await response.read()


# ------------------------------------------------------------------------------------------ model files


async def test_realistic_workflows_validate_and_run_at_their_size(
    comfy: ComfyDouble, http: aiohttp.ClientSession
) -> None:
    flux = await submit(http, FLUX_SCHNELL)
    (image,) = (await outputs_of(comfy, http, flux))["9"]["images"]
    assert (image["subfolder"], image["filename"]) == ("flux", "schnell_00001_.png")
    info = png_info(await fetch(http, image))
    assert (info["png_width"], info["png_height"]) == (1024, 768)
    assert json.loads(info["texts"]["prompt"]) == FLUX_SCHNELL
    sdxl = await submit(http, SDXL)
    images = (await outputs_of(comfy, http, sdxl))["9"]["images"]
    assert [i["filename"] for i in images] == ["sdxl_00001_.png", "sdxl_00002_.png"]
    for item in images:
        info = png_info(await fetch(http, item))
        assert (info["png_width"], info["png_height"]) == (832, 1216)


async def test_img2img_takes_the_size_of_the_loaded_image(
    comfy: ComfyDouble, http: aiohttp.ClientSession
) -> None:
    form = aiohttp.FormData()
    form.add_field("image", small_png(300, 200, (9, 9, 9)), filename="photo.png", content_type="image/png")
    form.add_field("subfolder", "uploads")
    await http.post("/upload/image", data=form)
    prompt_id = await submit(http, img2img("uploads/photo.png"))
    (image,) = (await outputs_of(comfy, http, prompt_id))["9"]["images"]
    info = png_info(await fetch(http, image))
    assert (info["png_width"], info["png_height"]) == (300, 200)
    missing = await http.post("/prompt", json={"prompt": img2img("uploads/nope.png")})
    assert missing.status == 400
    assert (await missing.json())["node_errors"]["1"]["errors"][0]["type"] == "custom_validation_failed"


async def test_model_files_fill_the_combos(tmp_path: Path) -> None:
    files = {"checkpoints": ["mine.safetensors"], "unet": ["my-unet.safetensors"]}
    async with ComfyDouble(root=tmp_path, model_files=files) as comfy:
        async with aiohttp.ClientSession(base_url=comfy.url) as http:
            assert await (await http.get("/models/checkpoints")).json() == ["mine.safetensors"]
            assert await (await http.get("/models/diffusion_models")).json() == ["my-unet.safetensors"]
            info = await (await http.get("/object_info/UNETLoader")).json()
            assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == ["my-unet.safetensors"]
            vae = (await (await http.get("/object_info/VAELoader")).json())["VAELoader"]
            assert vae["input"]["required"]["vae_name"][0][-1] == "pixel_space"
            rejected = await http.post("/prompt", json={"prompt": FLUX_SCHNELL})
            assert rejected.status == 400
            comfy.set_model_files({"diffusion_models": ["flux1-schnell.safetensors"]})
            assert (await http.post("/prompt", json={"prompt": FLUX_SCHNELL})).status == 200
    # everything else in object_info is the recording, untouched
    recorded = recorded_object_info()
    assert len(recorded) == 365
    assert recorded == recording("object_info.json")


# ------------------------------------------------------------------------------------------ outputs


async def test_filename_prefix_semantics(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    folder = Path(comfy.output_dir) / "a" / "b"
    folder.mkdir(parents=True)
    (folder / "name_00007_.png").write_bytes(b"")
    prompt = copy.deepcopy(TINY)
    prompt["2"]["inputs"]["filename_prefix"] = "a/b/name"
    first = (await outputs_of(comfy, http, await submit(http, prompt)))["2"]["images"][0]
    prompt["1"]["inputs"]["color"] = 5
    second = (await outputs_of(comfy, http, await submit(http, prompt)))["2"]["images"][0]
    assert (first["subfolder"], first["filename"], second["filename"]) == (
        "a/b",
        "name_00008_.png",
        "name_00009_.png",
    )
    prompt["2"]["inputs"]["filename_prefix"] = "../outside"
    bad = await submit(http, prompt)
    job = await comfy.wait_for_state(bad)
    assert job.state == "error" and "Saving image outside the output folder" in job.error["exception_message"]


async def test_same_prompt_gives_the_same_bytes(tmp_path: Path) -> None:
    contents = []
    for run in range(2):
        async with ComfyDouble(root=tmp_path / str(run)) as comfy:
            async with aiohttp.ClientSession(base_url=comfy.url) as http:
                (image,) = (await outputs_of(comfy, http, await submit(http, SDXL)))["9"]["images"][:1]
                contents.append(await fetch(http, image))
    assert contents[0] == contents[1]


async def test_colours_follow_the_graph(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    prompt = recording("prompt_success.json")["request"]["json"]["prompt"]
    outputs = await outputs_of(comfy, http, await submit(http, prompt))
    saved = Image.open(io.BytesIO(await fetch(http, outputs["3"]["images"][0])))
    color = prompt["1"]["inputs"]["color"]
    rgb = ((color >> 16) & 255, (color >> 8) & 255, color & 255)
    assert saved.getpixel((0, 0)) == tuple(255 - c for c in rgb)  # ImageInvert of EmptyImage's colour
    assert saved.size == (prompt["1"]["inputs"]["width"], prompt["1"]["inputs"]["height"])


async def test_vhs_video_combine_reports_gifs(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 8, "color": 9}},
        "2": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["1", 0],
                "frame_rate": 12,
                "loop_count": 0,
                "filename_prefix": "anim/clip",
                "format": "video/h264-mp4",
                "pingpong": False,
                "save_output": True,
                "crf": 19,
            },
        },
    }
    outputs = (await outputs_of(comfy, http, await submit(http, prompt)))["2"]
    assert list(outputs) == ["gifs"]
    (item,) = outputs["gifs"]
    assert (item["filename"], item["subfolder"], item["type"], item["format"], item["frame_rate"]) == (
        "clip_00001.mp4",
        "anim",
        "output",
        "video/h264-mp4",
        12.0,
    )
    assert item["workflow"] == "clip_00001.png" and os.path.isfile(item["fullpath"])
    response = await http.get(
        "/view", params={"filename": item["filename"], "subfolder": "anim", "type": "output"}
    )
    assert response.headers["Content-Type"] == "video/mp4" and (await response.read())[4:8] == b"ftyp"


async def test_loadimage_of_an_output_file(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    first = (await outputs_of(comfy, http, await submit(http, TINY)))["2"]["images"][0]
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": f"{first['filename']} [output]"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    (preview,) = (await outputs_of(comfy, http, await submit(http, prompt)))["2"]["images"]
    info = png_info(await fetch(http, preview))
    assert preview["type"] == "temp" and (info["png_width"], info["png_height"]) == (64, 64)


# ------------------------------------------------------------------------------------------ caching


async def test_cache_keeps_only_the_last_prompt_s_nodes(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("cache")
    other = copy.deepcopy(TINY)
    other["1"]["inputs"]["color"] = 77

    async def cached(prompt: dict[str, Any]) -> list[str]:
        prompt_id = await submit(http, prompt, client_id="cache")
        frames = await ws.until_done(prompt_id)
        return next(
            f[1]["data"]["nodes"] for f in frames if f[0] == "text" and f[1]["type"] == "execution_cached"
        )

    assert await cached(TINY) == []
    assert await cached(TINY) == ["1", "2"]
    assert await cached(other) == []
    assert await cached(TINY) == []  # ComfyUI's classic cache dropped it when `other` ran
    await http.post("/free", json={"free_memory": True})
    assert await cached(TINY) == []
    comfy.cache = False
    assert await cached(TINY) == []


async def test_cache_follows_input_files_and_websocket_saves(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("files")
    path = Path(comfy.input_dir) / "in.png"
    path.write_bytes(small_png(8, 8, (1, 1, 1)))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "f"}},
        "4": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
    }

    async def cached() -> list[str]:
        prompt_id = await submit(http, prompt, client_id="files")
        frames = await ws.until_done(prompt_id)
        return next(
            f[1]["data"]["nodes"] for f in frames if f[0] == "text" and f[1]["type"] == "execution_cached"
        )

    assert await cached() == []
    assert await cached() == ["1", "2", "3"]  # SaveImageWebsocket's IS_CHANGED is the time: never cached
    path.write_bytes(small_png(16, 8, (2, 2, 2)))  # another file under the same name
    assert await cached() == []


# ------------------------------------------------------------------------------------------ hooks


async def test_hooks_and_counters(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    async with comfy.subscribe() as events:
        comfy.pause()
        ids = [await submit(http, TINY, client_id=None, prompt_id=f"p{i}") for i in range(3)]
        await http.post("/prompt", json={"prompt": {}})
        await comfy.wait_for_prompts(4)
        await http.post("/queue", json={"delete": ["p2"]})
        assert (await comfy.wait_for_state("p2")).state == "deleted"
        form = aiohttp.FormData()
        form.add_field("image", small_png(4, 4, (0, 0, 0)), filename="x.png", content_type="image/png")
        await http.post("/upload/image", data=form)
        await http.post("/interrupt")
        comfy.resume()
        await comfy.wait_for_idle()
        seen = []
        while not events.empty():
            event = events.get_nowait()
            seen.append((event.kind, event.prompt_id))
    assert comfy.stats.prompts_received == 4 and comfy.stats.prompts_accepted == 3
    assert comfy.stats.prompts_rejected == 1 and comfy.stats.deletes == 1 and comfy.stats.uploads == 1
    assert comfy.stats.interrupts == 1 and comfy.stats.jobs_finished == 2
    assert [s for s in seen if s[1] == "p0"] == [
        ("queued", "p0"),
        ("prompt", "p0"),
        ("started", "p0"),
        ("node", "p0"),
        ("node", "p0"),
        ("finished", "p0"),
    ]
    assert ("deleted", "p2") in seen and ("upload", None) in seen
    assert [comfy.jobs[i].state for i in ids] == ["success", "success", "deleted"]


async def test_replaced_socket_closing_unregisters_the_new_one(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    old = await connect("same")
    new = await connect("same")
    async with comfy.subscribe() as events:
        await old.ws.close()
        while (await events.get()).kind != "ws_close":
            pass
    assert "same" not in comfy._sockets and not new.ws.closed  # ComfyUI's quirk, reproduced


# ------------------------------------------------------------------------------------------ ways to run


def test_run_in_thread_for_sync_tests(tmp_path: Path) -> None:
    with ComfyDouble(root=tmp_path).run_in_thread() as comfy:
        comfy.pause()
        with httpx.Client(base_url=comfy.url) as http:
            answer = http.post("/prompt", json={"prompt": TINY}).json()
            assert comfy.jobs[answer["prompt_id"]].state == "pending"
            comfy.resume()
            job = comfy.wait_for_state(answer["prompt_id"], "success")
            assert job.history is not None
            assert http.get(f"/history/{answer['prompt_id']}").json()[answer["prompt_id"]]["status"][
                "completed"
            ]
            comfy.faults.hold = {"SaveImage"}
            second = http.post(
                "/prompt",
                json={"prompt": {**TINY, "1": {**TINY["1"], "inputs": {**TINY["1"]["inputs"], "color": 3}}}},
            ).json()["prompt_id"]
            comfy.wait_until(lambda: comfy.jobs[second].node == "2")
            comfy.faults.hold = set()
            comfy.wait_for_state(second)


def test_process_mode_prints_the_url_and_crashes_with_status_70(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpubridge.testing.comfy",
            "--port",
            "0",
            "--root",
            str(tmp_path),
            "--faults",
            json.dumps({"crash": {"class_type": "SaveImage"}}),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url) as http:
            assert http.get("/system_stats").status_code == 200
            assert http.get("/api/queue").json() == {"queue_running": [], "queue_pending": []}
            assert http.post("/prompt", json={"prompt": TINY}).status_code == 200
        assert process.wait(30) == 70
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


async def test_validator_accepts_what_the_double_runs(comfy: ComfyDouble) -> None:
    # the client-side validator with the double's object_info agrees with the double
    for prompt in (FLUX_SCHNELL, SDXL, sampler_prompt()):
        assert validate_prompt(prompt, comfy.object_info).ok
