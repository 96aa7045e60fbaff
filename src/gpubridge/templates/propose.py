"""A manifest proposed for a workflow: the parameters a user usually wants, found by node class.

``gpubridge templates new NAME --from WORKFLOW.json`` writes what :func:`propose` returns as a starting
point: the prompt (and negative prompt, by which sampler input the text encoder feeds), seed, steps, cfg,
denoise below 1, width and height, video length, input images, LoRAs, the model files the loaders name,
and the save nodes as outputs. Defaults are the workflow's own values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models import Workflow

__all__ = ["propose", "to_toml"]

_SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "CFGGuider", "SamplerCustomAdvanced"}
_TEXT = {"CLIPTextEncode", "CLIPTextEncodeFlux", "CLIPTextEncodeSD3", "CLIPTextEncodeSDXL"}
_SIZE = {"EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "EmptyImage",
         "EmptyMochiLatentVideo", "EmptyLTXVLatentVideo", "EmptyCosmosLatentVideo", "ImageScale",
         "WanImageToVideo"}
_SAVE = {"SaveImage": "image", "PreviewImage": "image", "SaveAnimatedWEBP": "image", "SaveAnimatedPNG": "image",
         "SaveVideo": "video", "SaveWEBM": "video", "VHS_VideoCombine": "video", "SaveAudio": "audio"}
_MODEL_INPUTS = ("ckpt_name", "unet_name", "vae_name", "clip_name", "clip_name1", "clip_name2", "clip_name3",
                 "lora_name", "control_net_name", "upscale_model", "model_name", "instantid_file")
_PASS_THROUGH = ("conditioning", "conditioning_1", "positive", "cond")
_MAX_SIZE = 16384  # ComfyUI's MAX_RESOLUTION


def _ref(wf: Workflow, node_id: str) -> str:
    """The node's title when it names that node alone (readable, survives re-export), else its id."""
    title = wf.title(node_id)
    if title and "." not in title and sum(1 for n in wf if wf.title(n) == title) == 1 and title not in wf:
        return title
    return node_id


def _text_source(wf: Workflow, link: Any, depth: int = 0) -> str | None:
    """The text-encoder node a conditioning link comes from, through guidance/zero-out nodes."""
    if not isinstance(link, list) or not link or depth > 8:
        return None
    node_id = str(link[0])
    if node_id not in wf:
        return None
    node = wf[node_id]
    if node.get("class_type") in _TEXT:
        return node_id
    for name in _PASS_THROUGH:
        found = _text_source(wf, (node.get("inputs") or {}).get(name), depth + 1)
        if found:
            return found
    return None


def propose(workflow: Workflow | Mapping[str, Any], *, description: str = "",
            known_models: set[str] | None = None) -> dict[str, Any]:
    """A manifest (as a mapping) for ``workflow``; see the module docstring."""
    wf = workflow if isinstance(workflow, Workflow) else Workflow.load(workflow)
    params: dict[str, dict[str, Any]] = {}

    def add(name: str, kind: str, node_id: str, input_name: str | None, **spec: Any) -> None:
        target = _ref(wf, node_id) + (f".{input_name}" if input_name else "")
        if name in params:
            if params[name]["type"] == kind and params[name].get("default") == spec.get("default"):
                bind = params[name]["bind"]
                params[name]["bind"] = [*([bind] if isinstance(bind, str) else bind), target]
                return
            i = 2
            while f"{name}_{i}" in params:
                i += 1
            name = f"{name}_{i}"
        params[name] = {"type": kind, "bind": target, **spec}

    def value(node_id: str, input_name: str) -> Any:
        v = (wf[node_id].get("inputs") or {}).get(input_name)
        return None if isinstance(v, list) else v

    roles: dict[str, str] = {}
    for nid in wf:
        if wf.class_type(nid) in _SAMPLERS:
            inputs = wf[nid].get("inputs") or {}
            for role, key in (("prompt", "positive"), ("negative_prompt", "negative")):
                src = _text_source(wf, inputs.get(key))
                if src and src not in roles:
                    roles[src] = role
    for nid in wf:
        cls = wf.class_type(nid)
        if cls in _TEXT and isinstance(value(nid, "text"), str):
            role = roles.get(nid, "prompt")
            add(role, "string", nid, "text", default=value(nid, "text"),
                description="What to draw" if role == "prompt" else "What to avoid")
        if cls in _SAMPLERS or cls in ("RandomNoise",):
            for key in ("seed", "noise_seed"):
                if isinstance(value(nid, key), int):
                    add("seed", "int", nid, key, default=value(nid, key), min=0, max=2**64 - 1,
                        description="Random seed: the same seed and parameters give the same image")
        if cls in _SAMPLERS or cls == "BasicScheduler":
            if isinstance(value(nid, "steps"), int):
                add("steps", "int", nid, "steps", default=value(nid, "steps"), min=1, max=200,
                    description="Sampling steps")
            if isinstance(value(nid, "cfg"), (int, float)):
                add("cfg", "float", nid, "cfg", default=float(value(nid, "cfg")), min=0.0, max=30.0,
                    description="Classifier-free guidance scale")
            d = value(nid, "denoise")
            if isinstance(d, (int, float)) and d < 1:
                add("denoise", "float", nid, "denoise", default=float(d), min=0.0, max=1.0,
                    description="How much of the input image to repaint (0 keeps it, 1 replaces it)")
        if cls in _SIZE:
            for key in ("width", "height"):
                if isinstance(value(nid, key), int):
                    add(key, "int", nid, key, default=value(nid, key), min=16, max=_MAX_SIZE,
                        description=f"Output {key} in pixels")
            if isinstance(value(nid, "length"), int):
                add("frames", "int", nid, "length", default=value(nid, "length"), min=1, max=1024,
                    description="Video length in frames")
        if cls == "EmptyImage" and isinstance(value(nid, "color"), int):
            add("color", "int", nid, "color", default=value(nid, "color"), min=0, max=0xFFFFFF,
                description="Colour as 0xRRGGBB")
        if cls == "LoadImage" and isinstance(value(nid, "image"), str):
            add("image", "image", nid, "image", description="The input image")
        if cls in ("LoraLoader", "LoraLoaderModelOnly") and isinstance(value(nid, "lora_name"), str):
            strength = value(nid, "strength_model")
            add("lora", "lora", nid, None, default={"name": value(nid, "lora_name"),
                                                    "strength": float(strength if strength is not None else 1.0)},
                min=-10.0, max=10.0, description="A LoRA file and its strength")
    models: list[str] = []
    for nid in wf:
        for key in _MODEL_INPUTS:
            v = value(nid, key)
            if isinstance(v, str) and v not in models and (known_models is None or v in known_models):
                models.append(v)
    outputs = [{"node": _ref(wf, nid), "kind": _SAVE[cls]} for nid in wf if (cls := wf.class_type(nid)) in _SAVE]
    manifest: dict[str, Any] = {}
    if description:
        manifest["description"] = description
    manifest["models"] = models
    manifest["params"] = params
    manifest["outputs"] = outputs
    return manifest


def to_toml(manifest: Mapping[str, Any], *, workflow_file: str | None = None) -> str:
    """``manifest`` as TOML text (the small subset manifests use)."""
    lines: list[str] = []
    if manifest.get("description"):
        lines.append(f"description = {_toml(manifest['description'])}")
    if workflow_file:
        lines.append(f"workflow = {_toml(workflow_file)}")
    lines.append(f"models = {_toml(list(manifest.get('models') or []))}")
    for name, spec in (manifest.get("params") or {}).items():
        lines += ["", f"[params.{name}]"]
        lines += [f"{k} = {_toml(v)}" for k, v in spec.items()]
    for out in manifest.get("outputs") or []:
        lines += ["", "[[outputs]]"] + [f"{k} = {_toml(v)}" for k, v in out.items()]
    return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
