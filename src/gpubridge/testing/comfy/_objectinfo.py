"""The double's ``/object_info``: the recorded one (ComfyUI 0.3.64, 365 classes) plus model-file lists.

The recording machine had no model files, so every model COMBO list in it is empty. The double fills
them from its ``model_files`` option, keyed by ComfyUI's model folder names (``checkpoints``,
``diffusion_models``, ``text_encoders``, ``vae``, ``loras``, ...), so that realistic Flux and SDXL
workflows validate. ``VHS_VideoCombine`` (ComfyUI-VideoHelperSuite) is added; it is **not** from the
recording (see :data:`VHS_VIDEO_COMBINE`).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

# GET /models on the recording server, in its order.
MODEL_FOLDERS: tuple[str, ...] = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)

# ComfyUI's legacy folder names, accepted as keys of ``model_files``.
FOLDER_ALIASES = {"clip": "text_encoders", "unet": "diffusion_models", "t2i_adapter": "controlnet"}

# Which model folder fills which (class_type, input) COMBO.
MODEL_INPUTS: dict[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("unCLIPCheckpointLoader", "ckpt_name"): "checkpoints",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
    ("CreateHookModelAsLora", "ckpt_name"): "checkpoints",
    ("CreateHookModelAsLoraModelOnly", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("CreateHookLora", "lora_name"): "loras",
    ("CreateHookLoraModelOnly", "lora_name"): "loras",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders",
    ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name1"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name2"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name3"): "text_encoders",
    ("QuadrupleCLIPLoader", "clip_name4"): "text_encoders",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("VAELoader", "vae_name"): "vae",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("DiffControlNetLoader", "control_net_name"): "controlnet",
    ("StyleModelLoader", "style_model_name"): "style_models",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("GLIGENLoader", "gligen_name"): "gligen",
    ("DiffusersLoader", "model_path"): "diffusers",
    ("HypernetworkLoader", "hypernetwork_name"): "hypernetworks",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("PhotoMakerLoader", "photomaker_model_name"): "photomaker",
    ("ModelPatchLoader", "name"): "model_patches",
}

DEFAULT_MODEL_FILES: dict[str, list[str]] = {
    "checkpoints": [
        "flux1-schnell-fp8.safetensors",
        "sd_xl_base_1.0.safetensors",
        "sd_xl_refiner_1.0.safetensors",
        "v1-5-pruned-emaonly.safetensors",
    ],
    "diffusion_models": [
        "flux1-dev.safetensors",
        "flux1-schnell.safetensors",
        "flux1-schnell-fp8.safetensors",
        "wan2.1_t2v_1.3B_fp16.safetensors",
    ],
    "text_encoders": [
        "clip_g.safetensors",
        "clip_l.safetensors",
        "t5xxl_fp16.safetensors",
        "t5xxl_fp8_e4m3fn.safetensors",
        "t5xxl_fp8_e4m3fn_scaled.safetensors",
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    ],
    "vae": ["ae.safetensors", "sdxl_vae.safetensors", "wan_2.1_vae.safetensors"],
    "loras": ["example_lora.safetensors"],
    "upscale_models": ["RealESRGAN_x4plus.pth"],
    "controlnet": ["control_v11p_sd15_canny.pth"],
    "clip_vision": ["clip_vision_g.safetensors"],
    "embeddings": ["easynegative.safetensors"],
}

# ComfyUI-VideoHelperSuite's "Video Combine" node. NOT from the recording: written from the node's
# source (Kosinkadink/ComfyUI-VideoHelperSuite, videohelpersuite/nodes.py) so workflows that end in it
# validate and run on the double. It reports its file under "gifs", not "images".
VHS_FORMATS = [
    "image/gif",
    "image/webp",
    "video/16bit-png",
    "video/8bit-png",
    "video/av1-webm",
    "video/ffmpeg-gif",
    "video/ffv1-mkv",
    "video/h264-mp4",
    "video/h265-mp4",
    "video/nvenc_av1-mp4",
    "video/nvenc_h264-mp4",
    "video/nvenc_hevc-mp4",
    "video/ProRes",
    "video/webm",
]
VHS_VIDEO_COMBINE: dict[str, Any] = {
    "input": {
        "required": {
            "images": ["IMAGE"],
            "frame_rate": ["FLOAT", {"default": 8, "min": 1, "step": 1}],
            "loop_count": ["INT", {"default": 0, "min": 0, "max": 100, "step": 1}],
            "filename_prefix": ["STRING", {"default": "AnimateDiff"}],
            "format": [VHS_FORMATS, {}],
            "pingpong": ["BOOLEAN", {"default": False}],
            "save_output": ["BOOLEAN", {"default": True}],
        },
        "optional": {"audio": ["AUDIO"], "meta_batch": ["VHS_BatchManager"], "vae": ["VAE"]},
        "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
    },
    "input_order": {
        "required": [
            "images",
            "frame_rate",
            "loop_count",
            "filename_prefix",
            "format",
            "pingpong",
            "save_output",
        ],
        "optional": ["audio", "meta_batch", "vae"],
        "hidden": ["prompt", "extra_pnginfo", "unique_id"],
    },
    "output": ["VHS_FILENAMES"],
    "output_is_list": [False],
    "output_name": ["Filenames"],
    "name": "VHS_VideoCombine",
    "display_name": "Video Combine 🎥🅥🅗🅢",
    "description": "",
    "python_module": "custom_nodes.ComfyUI-VideoHelperSuite",
    "category": "Video Helper Suite 🎥🅥🅗🅢",
    "output_node": True,
}

EXTRA_NODES: dict[str, dict[str, Any]] = {"VHS_VideoCombine": VHS_VIDEO_COMBINE}


@functools.lru_cache(maxsize=1)
def recorded_object_info() -> dict[str, Any]:
    """The recorded ``GET /object_info`` of ComfyUI 0.3.64 (365 classes). Shared: do not mutate."""
    data = resources.files("gpubridge.testing").joinpath("data", "object_info.json.gz").read_bytes()
    return json.loads(gzip.decompress(data))


def normalize_model_files(model_files: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Merge ``model_files`` over :data:`DEFAULT_MODEL_FILES` (per folder; legacy names accepted).

    ``configs`` defaults to the config files ComfyUI ships (as CheckpointLoader lists them).
    """
    merged = {folder: list(files) for folder, files in DEFAULT_MODEL_FILES.items()}
    loader = recorded_object_info().get("CheckpointLoader", {})
    merged["configs"] = list(loader.get("input", {}).get("required", {}).get("config_name", [[]])[0])
    for folder, files in (model_files or {}).items():
        merged[FOLDER_ALIASES.get(folder, folder)] = [str(f) for f in files]
    return merged


def _input_spec(entry: dict[str, Any], name: str) -> list[Any] | None:
    for category in ("required", "optional"):
        spec = entry.get("input", {}).get(category, {}).get(name)
        if spec is not None:
            return spec
    return None


def build_object_info(
    model_files: Mapping[str, Sequence[str]],
    *,
    base: Mapping[str, Any] | None = None,
    extra_nodes: bool = True,
) -> dict[str, Any]:
    """The double's object_info: ``base`` (default: the recording) with the model COMBOs filled in.

    Classes that are changed are deep-copied; the others are shared with ``base``.
    """
    info = dict(recorded_object_info() if base is None else base)
    if extra_nodes:
        for name, entry in EXTRA_NODES.items():
            info.setdefault(name, entry)
    copied: set[str] = set()
    for (class_type, input_name), folder in MODEL_INPUTS.items():
        if class_type not in info:
            continue
        if class_type not in copied:
            info[class_type] = copy.deepcopy(info[class_type])
            copied.add(class_type)
        spec = _input_spec(info[class_type], input_name)
        if spec is None:
            continue
        files = list(model_files.get(folder, ()))
        if spec[0] == "COMBO":
            spec[1]["options"] = files
        elif isinstance(spec[0], list):
            # VAELoader also offers the built-in "pixel_space" (and approximations), after the files
            builtin = [x for x in spec[0] if x == "pixel_space"] if class_type == "VAELoader" else []
            spec[0] = files + builtin
    return info


# Classes whose COMBO lists the files at the top of input/ (recomputed when input/ changes).
INPUT_FILE_COMBOS: dict[tuple[str, str], str] = {
    ("LoadImage", "image"): "image",
    ("LoadImageMask", "image"): "image",
    ("LoadVideo", "file"): "video",
}
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v")


def with_input_files(info: Mapping[str, Any], input_files: Sequence[str]) -> dict[str, Any]:
    """``info`` with the input-folder COMBOs (LoadImage, LoadImageMask, LoadVideo) set to ``input_files``."""
    out = dict(info)
    for (class_type, input_name), kind in INPUT_FILE_COMBOS.items():
        if class_type not in out:
            continue
        entry = out[class_type] = copy.deepcopy(out[class_type])
        spec = _input_spec(entry, input_name)
        if spec is None:
            continue
        files = list(input_files)
        if kind == "video":
            files = [f for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
        if spec[0] == "COMBO":
            spec[1]["options"] = files
        else:
            spec[0] = files
    return out
