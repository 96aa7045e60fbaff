"""What the double's nodes "compute": sizes and kinds of values, flowing through the graph.

Nothing here touches pixels. A node's outputs are small descriptions (:class:`Img` is "N images of
W x H", :class:`Latent` the same in latent space, ...), enough to give every output file its realistic
size and a colour derived from the node's inputs (so the same prompt always gives the same bytes):

- ``EmptyImage`` makes its images (its ``color`` input is the colour); ``EmptyLatentImage``,
  ``EmptySD3LatentImage`` and any node with ``width``/``height`` widgets make latents/images of that size;
  ``VAEDecode``/``VAEEncode`` (and any node that turns one kind into another) carry the size over;
  ``ImageScale``/``...By``/``LatentUpscale``/``ImageUpscaleWithModel`` rescale; ``LoadImage`` reads the real
  file's size; any other node passes its first linked input of the right kind through.
- Output nodes write their files (PNG with ComfyUI's ``prompt``/extra_pnginfo tEXt chunks, APNG, video
  placeholders) and return ComfyUI's ``ui`` dict.

A node's failure is a real Python exception (LoadImage of a missing file raises ``FileNotFoundError``,
of a non-image ``PIL.UnidentifiedImageError``); the engine reports it as ComfyUI does.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _media

if TYPE_CHECKING:
    from ._double import _Job, _Store

IMAGE, LATENT, MASK, VIDEO = "IMAGE", "LATENT", "MASK", "VIDEO"


# ------------------------------------------------------------------------------------------ values


def _rgb_from_key(key: int, index: int) -> tuple[int, int, int]:
    x = (key + index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 32
    return ((x >> 16) & 0xFF, (x >> 8) & 0xFF, x & 0xFF)


@dataclass(slots=True)
class Img:
    """``n`` images of ``w`` x ``h``; ``rgb`` fixes their colour, else it is derived from ``key``."""

    w: int
    h: int
    n: int = 1
    rgb: tuple[int, int, int] | None = None
    key: int = 0
    c: int = 3  # channels: 4 after JoinImageWithAlpha

    def color(self, index: int = 0) -> tuple[int, int, int]:
        return self.rgb if self.rgb is not None else _rgb_from_key(self.key, index)

    def __str__(self) -> str:
        return f"tensor(<image batch of shape [{self.n}, {self.h}, {self.w}, {self.c}]>)"


@dataclass(slots=True)
class Latent:
    """A latent batch for ``n`` images of ``w`` x ``h`` pixels."""

    w: int
    h: int
    n: int = 1
    key: int = 0

    def __str__(self) -> str:
        return f"{{'samples': tensor(<latent of shape [{self.n}, 4, {self.h // 8}, {self.w // 8}]>)}}"


@dataclass(slots=True)
class Mask:
    w: int
    h: int
    n: int = 1

    def __str__(self) -> str:
        return f"tensor(<mask of shape [{self.n}, {self.h}, {self.w}]>)"


@dataclass(slots=True)
class Video:
    frames: Img
    fps: float = 24.0

    def __str__(self) -> str:
        return (
            f"<VideoFromComponents {self.frames.w}x{self.frames.h}, {self.frames.n} frames @ {self.fps} fps>"
        )


@dataclass(slots=True)
class Opaque:
    """Anything the double does not model (MODEL, CLIP, VAE, CONDITIONING, ...)."""

    type: str
    key: int = 0
    steps: int | None = None  # SIGMAS: how many sampling steps they describe

    def __str__(self) -> str:
        return f"<{self.type} object>"


def format_value(value: Any) -> Any:
    """ComfyUI's ``format_value`` for ``current_inputs``: primitives as is, everything else as str."""
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


# ------------------------------------------------------------------------------------------ context


@dataclass(slots=True)
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None
    texts: list[str] = field(default_factory=list)  # binary TEXT frames (GetImageSize)
    ws_images: list[bytes] = field(default_factory=list)  # SaveImageWebsocket: one PNG per image


class Ctx:
    """One node's execution: its inputs (``values`` has links resolved) and the double's services."""

    __slots__ = ("node_id", "class_type", "info", "inputs", "values", "key", "job", "store")

    def __init__(
        self,
        node_id: str,
        class_type: str,
        info: Mapping[str, Any],
        inputs: Mapping[str, Any],
        values: dict[str, Any],
        key: int,
        job: _Job,
        store: _Store,
    ):
        self.node_id = node_id
        self.class_type = class_type
        self.info = info
        self.inputs = inputs
        self.values = values
        self.key = key
        self.job = job
        self.store = store

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name, default)
        return default if value is None else value

    def int(self, name: str, default: int = 0) -> int:
        value = self.values.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return default
        return int(value)

    def first(self, *kinds: type) -> Any:
        """The first linked input value of one of ``kinds``, in input order."""
        for value in self.values.values():
            if isinstance(value, kinds):
                return value
        return None


def _as_img(value: Any, key: int) -> Img | None:
    if isinstance(value, Img):
        return value
    if isinstance(value, Latent):
        return Img(value.w, value.h, value.n, None, key)
    if isinstance(value, Mask):
        return Img(value.w, value.h, value.n, None, key)
    if isinstance(value, Video):
        return value.frames
    return None


def _size_from_widgets(ctx: Ctx, base: Any) -> tuple[int, int] | None:
    width, height = ctx.values.get("width"), ctx.values.get("height")
    if isinstance(width, bool) or isinstance(height, bool):
        return None
    if not isinstance(width, (int, float)) or not isinstance(height, (int, float)):
        return None
    w, h = int(width), int(height)
    bw, bh = (base.w, base.h) if base is not None and hasattr(base, "w") else (0, 0)
    if w == 0 and h == 0:
        w, h = bw or 512, bh or 512
    elif w == 0:
        w = max(1, round(bw * h / bh)) if bh else h
    elif h == 0:
        h = max(1, round(bh * w / bw)) if bw else w
    return w, h


def _scaled(ctx: Ctx, base: Any) -> tuple[int, int] | None:
    if base is None or not hasattr(base, "w"):
        return None
    scale = ctx.values.get("scale_by")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return max(1, round(base.w * scale)), max(1, round(base.h * scale))
    megapixels = ctx.values.get("megapixels")
    if isinstance(megapixels, (int, float)) and not isinstance(megapixels, bool):
        factor = math.sqrt(megapixels * 1024 * 1024 / max(1, base.w * base.h))
        return max(1, round(base.w * factor)), max(1, round(base.h * factor))
    return None


def _batch(ctx: Ctx, base: Any) -> int:
    batch_size = ctx.values.get("batch_size")
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
        return batch_size
    if base is not None and hasattr(base, "n"):
        amount = ctx.values.get("amount")
        if isinstance(amount, int) and not isinstance(amount, bool) and amount > 0:
            return base.n * amount
        return base.n
    return 1


def _derive(ctx: Ctx, out_type: Any, slot: int) -> Any:
    """The default value of output ``slot`` of type ``out_type``."""
    key = ctx.key + slot
    if out_type in (IMAGE, LATENT, MASK, VIDEO):
        same = {IMAGE: Img, LATENT: Latent, MASK: Mask, VIDEO: Video}[out_type]
        base = ctx.first(same) or ctx.first(Img, Latent, Mask, Video)
        if isinstance(base, Video):
            base = base.frames if out_type != VIDEO else base
        size = _size_from_widgets(ctx, base if not isinstance(base, Video) else base.frames)
        if size is None:
            size = _scaled(ctx, base)
        if size is None and base is not None:
            frames = base.frames if isinstance(base, Video) else base
            size = (frames.w, frames.h)
        if size is None:
            size = (512, 512)
        n = _batch(ctx, base.frames if isinstance(base, Video) else base)
        w, h = size
        if out_type == IMAGE:
            same_size = isinstance(base, Img) and (base.w, base.h) == size
            return Img(w, h, n, base.rgb if same_size else None, key, base.c if isinstance(base, Img) else 3)
        if out_type == LATENT:
            return Latent(w, h, n, key)
        if out_type == MASK:
            return Mask(w, h, n)
        fps = base.fps if isinstance(base, Video) else float(ctx.get("fps", 24.0))
        return Video(Img(w, h, n, None, key), fps)
    if out_type == "SIGMAS":
        steps = ctx.values.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool):
            upstream = ctx.first(Opaque)
            steps = upstream.steps if isinstance(upstream, Opaque) and upstream.type == "SIGMAS" else None
        return Opaque("SIGMAS", key, steps)
    if out_type in ("INT", "FLOAT", "STRING", "BOOLEAN"):
        names = ctx.info.get("output_name") or ()
        name = names[slot].lower() if slot < len(names) and isinstance(names[slot], str) else ""
        if name in ctx.values and not isinstance(ctx.values[name], (Img, Latent, Mask, Video, Opaque)):
            return ctx.values[name]
        for value in ctx.values.values():
            if type(value) is {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}[out_type]:
                return value
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[out_type]
    upstream = next((v for v in ctx.values.values() if isinstance(v, Opaque) and v.type == out_type), None)
    return upstream if upstream is not None else Opaque(str(out_type), key)


def default_node(ctx: Ctx) -> NodeResult:
    outputs = ctx.info.get("output") or ()
    return NodeResult(tuple(_derive(ctx, t, i) for i, t in enumerate(outputs)))


# ------------------------------------------------------------------------------------------ sources


def _empty_image(ctx: Ctx) -> NodeResult:
    color = ctx.int("color", 0)
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return NodeResult(
        (Img(ctx.int("width", 512), ctx.int("height", 512), ctx.int("batch_size", 1), rgb, ctx.key),)
    )


def _image_invert(ctx: Ctx) -> NodeResult:
    image = _as_img(ctx.get("image"), ctx.key) or Img(512, 512)
    rgb = tuple(255 - c for c in image.rgb) if image.rgb is not None else None
    return NodeResult((Img(image.w, image.h, image.n, rgb, ctx.key, image.c),))  # type: ignore[arg-type]


def _solid_mask(ctx: Ctx) -> NodeResult:
    return NodeResult((Mask(ctx.int("width", 512), ctx.int("height", 512), 1),))


def _mask_to_image(ctx: Ctx) -> NodeResult:
    mask = ctx.first(Mask) or Mask(512, 512)
    return NodeResult((Img(mask.w, mask.h, mask.n, None, ctx.key),))


def _join_image_with_alpha(ctx: Ctx) -> NodeResult:
    image = _as_img(ctx.get("image"), ctx.key) or Img(512, 512)
    return NodeResult((Img(image.w, image.h, image.n, image.rgb, ctx.key, 4),))


def _porter_duff(ctx: Ctx) -> NodeResult:
    source = _as_img(ctx.get("source"), ctx.key) or Img(512, 512)
    destination = _as_img(ctx.get("destination"), ctx.key) or Img(512, 512)
    if source.c != destination.c:  # ComfyUI asserts the channel counts match: a bare AssertionError
        raise AssertionError()
    return NodeResult(
        (
            Img(destination.w, destination.h, destination.n, None, ctx.key, destination.c),
            Mask(destination.w, destination.h, destination.n),
        )
    )


def _upscale_with_model(ctx: Ctx) -> NodeResult:
    image = _as_img(ctx.get("image"), ctx.key) or Img(512, 512)
    return NodeResult((Img(image.w * 4, image.h * 4, image.n, image.rgb, ctx.key),))


def _load_image(ctx: Ctx) -> NodeResult:
    from PIL import Image  # pillow is in the testing extra

    path = ctx.store.input_path(ctx.inputs.get("image"))
    with Image.open(path) as img:
        width, height = img.size
        has_alpha = "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)
    if ctx.class_type == "LoadImageMask":  # converted to RGBA first: every channel exists
        return NodeResult((Mask(width, height, 1),))
    mask = Mask(width, height, 1) if has_alpha else Mask(64, 64, 1)  # ComfyUI: 64x64 zeros without alpha
    return NodeResult((Img(width, height, 1, None, ctx.key), mask))


def _get_image_size(ctx: Ctx) -> NodeResult:
    image = _as_img(ctx.get("image"), ctx.key) or Img(512, 512)
    text = f"width: {image.w}, height: {image.h}\n batch size: {image.n}"
    return NodeResult((image.w, image.h, image.n), texts=[text])


def _primitive(ctx: Ctx) -> NodeResult:
    return NodeResult((ctx.values.get("value"),))


def _string_concatenate(ctx: Ctx) -> NodeResult:
    return NodeResult((f"{ctx.get('string_a', '')}{ctx.get('delimiter', '')}{ctx.get('string_b', '')}",))


def _regex_match(ctx: Ctx) -> NodeResult:
    flags = 0
    if ctx.get("case_insensitive"):
        flags |= re.IGNORECASE
    if ctx.get("multiline"):
        flags |= re.MULTILINE
    if ctx.get("dotall"):
        flags |= re.DOTALL
    try:
        found = re.search(str(ctx.get("regex_pattern", "")), str(ctx.get("string", "")), flags) is not None
    except re.error:
        found = False
    return NodeResult((found,))


def _create_video(ctx: Ctx) -> NodeResult:
    frames = _as_img(ctx.get("images"), ctx.key) or Img(512, 512)
    fps = ctx.get("fps", 30.0)
    return NodeResult((Video(frames, float(fps)),))


def _video_components(ctx: Ctx) -> NodeResult:
    video = ctx.first(Video) or Video(Img(512, 512, 1, None, ctx.key))
    return NodeResult((video.frames, Opaque("AUDIO", ctx.key), float(video.fps)))


# ------------------------------------------------------------------------------------------ outputs


def _images_of(ctx: Ctx, name: str = "images") -> Img:
    value = ctx.values.get(name)
    image = _as_img(value, ctx.key)
    if image is None:
        raise AttributeError(f"'{type(value).__name__}' object has no attribute 'shape'")
    return image


def _save_pngs(ctx: Ctx, image: Img, prefix: str, folder: str, level: int) -> list[dict[str, str]]:
    texts = ctx.job.pnginfo()
    full_folder, filename, counter, subfolder = ctx.store.save_path(prefix, folder, image.w, image.h)
    results = []
    for index in range(image.n):
        name = filename.replace("%batch_num%", str(index))
        file = f"{name}_{counter:05}_.png"
        ctx.store.write(
            os.path.join(full_folder, file), _media.png(image.w, image.h, image.color(index), texts, level)
        )
        results.append({"filename": file, "subfolder": subfolder, "type": folder})
        counter += 1
    ctx.store.advance(full_folder, filename, counter)
    return results


def _save_image(ctx: Ctx) -> NodeResult:
    image = _images_of(ctx)
    prefix = str(ctx.values.get("filename_prefix", "ComfyUI"))
    return NodeResult(ui={"images": _save_pngs(ctx, image, prefix, "output", 4)})


def _preview_image(ctx: Ctx) -> NodeResult:
    if ctx.class_type == "MaskPreview":
        mask = ctx.first(Mask) or Mask(512, 512)
        image = Img(mask.w, mask.h, mask.n, None, ctx.key)
    else:
        image = _images_of(ctx)
    prefix = ctx.store.preview_prefix(ctx.node_id, ctx.class_type)
    return NodeResult(ui={"images": _save_pngs(ctx, image, prefix, "temp", 1)})


def _save_one(
    ctx: Ctx, prefix: str, folder: str, w: int, h: int, ext: str, data: bytes, underscore: bool = True
) -> dict[str, str]:
    full_folder, filename, counter, subfolder = ctx.store.save_path(prefix, folder, w, h)
    file = f"{filename}_{counter:05}_.{ext}" if underscore else f"{filename}_{counter:05}.{ext}"
    ctx.store.write(os.path.join(full_folder, file), data)
    ctx.store.advance(full_folder, filename, counter + 1)
    return {"filename": file, "subfolder": subfolder, "type": folder}


def _save_animated_webp(ctx: Ctx) -> NodeResult:
    image = _images_of(ctx)
    fps = float(ctx.get("fps", 6.0))
    result = _save_one(
        ctx,
        str(ctx.get("filename_prefix", "ComfyUI")),
        "output",
        image.w,
        image.h,
        "webp",
        _media.webp(image.w, image.h, image.n, fps),
    )
    return NodeResult(ui={"images": [result], "animated": [image.n != 1]})


def _save_animated_png(ctx: Ctx) -> NodeResult:
    image = _images_of(ctx)
    fps = float(ctx.get("fps", 6.0))
    data = _media.apng(
        image.w, image.h, image.n, image.color(0), fps, ctx.job.pnginfo(), int(ctx.get("compress_level", 4))
    )
    result = _save_one(
        ctx, str(ctx.get("filename_prefix", "ComfyUI")), "output", image.w, image.h, "png", data
    )
    return NodeResult(ui={"images": [result], "animated": [True]})


def _save_webm(ctx: Ctx) -> NodeResult:
    image = _images_of(ctx)
    fps = float(ctx.get("fps", 24.0))
    result = _save_one(
        ctx,
        str(ctx.get("filename_prefix", "ComfyUI")),
        "output",
        image.w,
        image.h,
        "webm",
        _media.webm(image.w, image.h, image.n, fps),
    )
    return NodeResult(ui={"images": [result], "animated": [True]})


def _save_video(ctx: Ctx) -> NodeResult:
    video = ctx.first(Video)
    if video is None:
        raise AttributeError("'NoneType' object has no attribute 'get_dimensions'")
    frames = video.frames
    ext = "mp4"  # VideoContainer "auto" and "mp4" both save .mp4
    result = _save_one(
        ctx,
        str(ctx.get("filename_prefix", "video/ComfyUI")),
        "output",
        frames.w,
        frames.h,
        ext,
        _media.mp4(frames.w, frames.h, frames.n, video.fps),
    )
    return NodeResult(ui={"images": [result], "animated": [True]})


def _save_latent(ctx: Ctx) -> NodeResult:
    latent = ctx.first(Latent) or Latent(512, 512)
    result = _save_one(
        ctx,
        str(ctx.get("filename_prefix", "latents/ComfyUI")),
        "output",
        0,
        0,
        "latent",
        _media.latent_file(latent.w, latent.h, latent.n),
    )
    return NodeResult(ui={"latents": [result]})


def _preview_any(ctx: Ctx) -> NodeResult:
    source = ctx.values.get("source")
    value = "None"
    if isinstance(source, str):
        value = source
    elif isinstance(source, (int, float, bool)):
        value = str(source)
    elif source is not None:
        try:
            value = json.dumps(source)
        except Exception:
            value = str(source)
    return NodeResult(ui={"text": [value]})


def _save_image_websocket(ctx: Ctx) -> NodeResult:
    image = _images_of(ctx)
    frames = [_media.png(image.w, image.h, image.color(i), (), 1) for i in range(image.n)]
    return NodeResult(ws_images=frames)


VHS_EXTENSIONS = {
    "image/gif": "gif",
    "image/webp": "webp",
    "video/webm": "webm",
    "video/av1-webm": "webm",
    "video/h264-mp4": "mp4",
    "video/h265-mp4": "mp4",
    "video/nvenc_h264-mp4": "mp4",
    "video/nvenc_hevc-mp4": "mp4",
    "video/nvenc_av1-mp4": "mp4",
    "video/ProRes": "mov",
    "video/ffv1-mkv": "mkv",
    "video/ffmpeg-gif": "gif",
}


def _vhs_video_combine(ctx: Ctx) -> NodeResult:
    image = _images_of(ctx)
    fmt = str(ctx.get("format", "image/gif"))
    frame_rate = ctx.get("frame_rate", 8)
    save_output = bool(ctx.get("save_output", True))
    folder = "output" if save_output else "temp"
    full_folder, filename, counter, subfolder = ctx.store.save_path(
        str(ctx.get("filename_prefix", "AnimateDiff")), folder, image.w, image.h
    )
    first = f"{filename}_{counter:05}.png"
    ctx.store.write(
        os.path.join(full_folder, first), _media.png(image.w, image.h, image.color(0), ctx.job.pnginfo(), 4)
    )
    ext = VHS_EXTENSIONS.get(fmt, "png" if "png" in fmt else "mp4")
    file = f"{filename}_{counter:05}.{ext}"
    maker = _media.CONTAINERS.get(ext)
    data = (
        maker(image.w, image.h, image.n, float(frame_rate))
        if maker
        else _media.apng(image.w, image.h, image.n, image.color(0), float(frame_rate))
    )
    full = os.path.join(full_folder, file)
    ctx.store.write(full, data)
    ctx.store.advance(full_folder, filename, counter + 1)
    preview = {
        "filename": file,
        "subfolder": subfolder,
        "type": folder,
        "format": fmt,
        "frame_rate": frame_rate,
        "workflow": first,
        "fullpath": full,
    }
    return NodeResult(
        outputs=((save_output, [os.path.join(full_folder, first), full]),), ui={"gifs": [preview]}
    )


BEHAVIOURS: dict[str, Callable[[Ctx], NodeResult]] = {
    "EmptyImage": _empty_image,
    "ImageInvert": _image_invert,
    "SolidMask": _solid_mask,
    "MaskToImage": _mask_to_image,
    "ImageUpscaleWithModel": _upscale_with_model,
    "JoinImageWithAlpha": _join_image_with_alpha,
    "PorterDuffImageComposite": _porter_duff,
    "LoadImage": _load_image,
    "LoadImageOutput": _load_image,
    "LoadImageMask": _load_image,
    "GetImageSize": _get_image_size,
    "PrimitiveInt": _primitive,
    "PrimitiveFloat": _primitive,
    "PrimitiveString": _primitive,
    "PrimitiveStringMultiline": _primitive,
    "PrimitiveBoolean": _primitive,
    "StringConcatenate": _string_concatenate,
    "RegexMatch": _regex_match,
    "CreateVideo": _create_video,
    "GetVideoComponents": _video_components,
    "SaveImage": _save_image,
    "PreviewImage": _preview_image,
    "MaskPreview": _preview_image,
    "SaveAnimatedWEBP": _save_animated_webp,
    "SaveAnimatedPNG": _save_animated_png,
    "SaveWEBM": _save_webm,
    "SaveVideo": _save_video,
    "SaveLatent": _save_latent,
    "PreviewAny": _preview_any,
    "SaveImageWebsocket": _save_image_websocket,
    "VHS_VideoCombine": _vhs_video_combine,
}

# Nodes whose output is never taken from the cache (their IS_CHANGED changes every time).
NEVER_CACHED = frozenset({"SaveImageWebsocket"})
# Nodes whose cache key includes their input file (ComfyUI hashes the file in IS_CHANGED).
FILE_KEYED = {"LoadImage": "image", "LoadImageMask": "image", "LoadImageOutput": "image"}


def run_node(ctx: Ctx) -> NodeResult:
    return BEHAVIOURS.get(ctx.class_type, default_node)(ctx)


def sampler_steps(ctx: Ctx) -> int:
    """How many ``progress`` steps the node reports (0: none), like a sampler's progress bar."""
    values = ctx.values
    steps = values.get("steps")
    if ctx.class_type == "KSamplerAdvanced" and isinstance(steps, int):
        start = values.get("start_at_step", 0)
        end = values.get("end_at_step", steps)
        if isinstance(start, int) and isinstance(end, int):
            return max(0, min(end, steps) - start)
    if isinstance(steps, int) and not isinstance(steps, bool) and "LATENT" in (ctx.info.get("output") or ()):
        return max(0, steps)
    sigmas = values.get("sigmas")
    if isinstance(sigmas, Opaque) and sigmas.steps is not None and "LATENT" in (ctx.info.get("output") or ()):
        return max(0, sigmas.steps)
    return 0
