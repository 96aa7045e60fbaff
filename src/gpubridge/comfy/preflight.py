"""Can this ComfyUI run this workflow? A pure check of a prompt against a server's ``/object_info``.

Unlike :mod:`~gpubridge.comfy.validate` (which reproduces ComfyUI's own 400 answer), this names what a
*backend* lacks, so routing can skip a backend before any submit or cold start::

    problems = preflight(prompt, object_info)
    missing = [p for p in problems if p.backend_lacks]   # another backend may have them
    broken = [p for p in problems if not p.backend_lacks] # wrong everywhere: dangling links, no output

Kinds: ``missing_node_class`` (with the node pack when known), ``missing_model`` (a model file a loader
input names that the server does not list), ``dangling_link``, ``self_link``, ``no_output``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Problem", "preflight", "compact_object_info", "MODEL_EXTENSIONS", "NODE_PACKS"]

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx", ".pkl")

# Node classes of widely used node packs, to say what to install (a hint, not a registry).
NODE_PACKS = {
    "ReActorFaceSwap": "comfyui-reactor-node", "ReActorFaceSwapOpt": "comfyui-reactor-node",
    "ApplyInstantID": "ComfyUI_InstantID", "InstantIDModelLoader": "ComfyUI_InstantID",
    "InstantIDFaceAnalysis": "ComfyUI_InstantID", "IPAdapterUnifiedLoader": "ComfyUI_IPAdapter_plus",
    "IPAdapterAdvanced": "ComfyUI_IPAdapter_plus", "UnetLoaderGGUF": "ComfyUI-GGUF",
    "WanVideoSampler": "ComfyUI-WanVideoWrapper", "VHS_VideoCombine": "ComfyUI-VideoHelperSuite",
    "ControlNetPreprocessorSelector": "comfyui_controlnet_aux",
}

# Loader inputs and the model folder they read (ComfyUI's folder_paths names).
_FOLDERS = {
    "ckpt_name": "checkpoints", "lora_name": "loras", "vae_name": "vae", "unet_name": "diffusion_models",
    "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
    "clip_name3": "text_encoders", "control_net_name": "controlnet", "model_name": "upscale_models",
    "style_model_name": "style_models", "clip_vision": "clip_vision", "instantid_file": "instantid",
    "ipadapter_file": "ipadapter", "gligen_name": "gligen", "hypernetwork_name": "hypernetworks",
}


@dataclass(frozen=True)
class Problem:
    kind: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    input: str | None = None
    value: Any = None
    folder: str | None = None
    pack: str | None = None

    @property
    def backend_lacks(self) -> bool:
        """The backend lacks something another one may have (a node class, a model file)."""
        return self.kind in ("missing_node_class", "missing_model")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


def _input_specs(info: Mapping[str, Any]) -> dict[str, Any]:
    spec = info.get("input") or {}
    out: dict[str, Any] = {}
    for section in ("required", "optional"):
        part = spec.get(section) or {}
        if isinstance(part, Mapping):
            out.update(part)
    return out


def _options(spec: Any) -> list[Any] | None:
    """A combo input's options: ComfyUI's ``[[...options], {...}]`` or the newer ``["COMBO", {"options"}]``."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], Mapping):
        options = spec[1].get("options")
        return list(options) if isinstance(options, list) else None
    return None


def _looks_like_model(name: str, value: Any, options: list[Any]) -> bool:
    if not isinstance(value, str):
        return False
    if name in _FOLDERS:
        return True
    lowered = value.lower()
    return lowered.endswith(MODEL_EXTENSIONS) or any(
        isinstance(o, str) and o.lower().endswith(MODEL_EXTENSIONS) for o in options[:20])


def preflight(prompt: Mapping[str, Any], object_info: Mapping[str, Any]) -> list[Problem]:
    """Every problem that stops ``prompt`` (API format) from running on the server of ``object_info``."""
    problems: list[Problem] = []
    has_output = False
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping):
            continue
        class_type = node.get("class_type")
        inputs = node.get("inputs") if isinstance(node.get("inputs"), Mapping) else {}
        for name, value in inputs.items():
            if _is_link(value):
                source = str(value[0])
                if source == str(node_id):
                    problems.append(Problem("self_link", f"node {node_id} ({class_type}) input '{name}' links to "
                                            "its own output", str(node_id), class_type, name))
                elif source not in prompt:
                    problems.append(Problem("dangling_link", f"node {node_id} ({class_type}) input '{name}' links "
                                            f"to node {source}, which is not in the workflow", str(node_id),
                                            class_type, name, source))
        info = object_info.get(class_type) if isinstance(class_type, str) else None
        if not isinstance(info, Mapping):
            pack = NODE_PACKS.get(class_type) if isinstance(class_type, str) else None
            problems.append(Problem(
                "missing_node_class",
                f"node {node_id}: class {class_type!r} is not installed here"
                + (f" (node pack {pack})" if pack else ""),
                str(node_id), class_type, pack=pack))
            continue
        if info.get("output_node"):
            has_output = True
        specs = _input_specs(info)
        for name, value in inputs.items():
            if _is_link(value):
                continue
            options = _options(specs.get(name))
            if options is None or value in options or not _looks_like_model(name, value, options):
                continue
            folder = _FOLDERS.get(name)
            problems.append(Problem(
                "missing_model",
                f"node {node_id} ({class_type}) input '{name}': model file {value!r} is not "
                + (f"in {folder}/ here" if folder else "available here"),
                str(node_id), class_type, name, value, folder))
    if not has_output and not any(p.kind == "missing_node_class" for p in problems):
        problems.append(Problem("no_output", "the workflow has no output node (SaveImage, PreviewImage, ...): "
                                "nothing would run"))
    return problems


def compact_object_info(object_info: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`preflight` needs of ``/object_info``, a few percent of its size: each node class with
    ``output_node``, ``python_module`` and only its model-file inputs (combos of model files, or loader
    inputs such as ``ckpt_name``) with their options. A backend that must ship its capabilities through a
    size-limited channel (a RunPod job result) sends this; ``preflight`` reads it like the full one."""
    out: dict[str, Any] = {}
    for class_type, info in object_info.items():
        if not isinstance(info, Mapping):
            continue
        models: dict[str, Any] = {}
        for name, spec in _input_specs(info).items():
            options = _options(spec)
            if options is None:
                continue
            if name in _FOLDERS or any(isinstance(o, str) and o.lower().endswith(MODEL_EXTENSIONS)
                                       for o in options[:20]):
                models[name] = [list(options)]
        out[class_type] = {"output_node": bool(info.get("output_node")), "python_module": info.get("python_module"),
                           "input": {"required": models}}
    return out
