"""Runners, images and records for the shadow tests."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, PngImagePlugin

from gpubridge.models import Artifact, ArtifactKind, Cost, JobRequest, JobResult, Timings
from gpubridge.runner import JobRef, job_id_of
from gpubridge.shadow.compare import Comparison, Outcome, Side
from tests.fakes import ScriptedRunner

WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "out"}},
}


def request(**fields: Any) -> JobRequest:
    return JobRequest(workflow=WORKFLOW, **fields)


def png(
    pattern: str = "gradient", size: tuple[int, int] = (64, 64), text: str | None = None, level: int = 6
) -> bytes:
    """A deterministic PNG; ``text`` adds a tEXt chunk (metadata that must not count)."""
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    for y in range(h):
        for x in range(w):
            if pattern == "gradient":
                px[x, y] = (x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), 128)
            elif pattern == "checker":
                v = 255 if (x // 8 + y // 8) % 2 else 0
                px[x, y] = (v, v, v)
            else:  # "stripes"
                v = 255 if (x // 4) % 2 else 0
                px[x, y] = (v, 0, 255 - v)
    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", text)
    buf = io.BytesIO()
    img.save(buf, "PNG", pnginfo=info, compress_level=level)
    return buf.getvalue()


def result(job_id: str = "j1", provider: str = "ctl", images: list[bytes] | None = None, *,
           total_s: float | None = None, cost: float | None = None) -> JobResult:
    images = images if images is not None else [png()]
    arts = [Artifact(node_id="9", kind=ArtifactKind.IMAGE, filename=f"{job_id}_{i}.png", data=data,
                     mime_type="image/png") for i, data in enumerate(images)]
    return JobResult(job_id=job_id, provider=provider, artifacts=arts, timings=Timings(total_s=total_s),
                     cost=Cost(usd=cost) if cost is not None else None)


class ImageRunner(ScriptedRunner):
    """A ScriptedRunner whose results carry real PNGs. ``results[job_id]`` (set by the test) is returned as
    is, the same object on every wait; otherwise a result with ``self.image`` is built once per job."""

    def __init__(self, name: str = "fake", *, auto: str | None = None, image: bytes | None = None,
                 submit_error: BaseException | None = None):
        super().__init__(name, auto=auto)
        self.image = image if image is not None else png()
        self.results: dict[str, JobResult] = {}
        self.submit_error = submit_error
        self.waits = 0

    async def submit(self, request: JobRequest):
        if self.submit_error is not None:
            raise self.submit_error
        return await super().submit(request)

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        self.waits += 1
        await super().wait(job, timeout=timeout)  # raises the scripted error, cancel or timeout
        jid = job_id_of(job)
        if jid not in self.results:
            self.results[jid] = result(jid, self.name, [self.image])
        return self.results[jid]


def record(workflow: str, kind: str = "candidate", *, ctl_ok: bool = True, cand_ok: bool = True,
           ctl_s: float | None = None, cand_s: float | None = None, ctl_cost: float | None = None,
           cand_cost: float | None = None, images: int = 1, distance: float | None = 0.0,
           structure: bool = True, at: float = 1_700_000_000.0, ctl_err: str = "JobFailed",
           cand_err: str = "JobFailed") -> Comparison:
    """A hand-made record (no images decoded) for report fixtures."""
    def side(ok: bool, s: float | None, cost: float | None, provider: str, err: str) -> Side:
        if not ok:
            return Side(provider=provider, ok=False, error_type=err, total_s=s)
        return Side(provider=provider, ok=True, total_s=s, cost_usd=cost, artifacts=images, images=images,
                    kinds=["image"] * images, dims=["64x64"] * images)

    a = side(ctl_ok, ctl_s, ctl_cost, "runpod", ctl_err)
    b = side(cand_ok, cand_s, cand_cost, "modal" if kind == "candidate" else "runpod", cand_err)
    outcome = {(True, True): Outcome.BOTH_OK, (True, False): Outcome.CANDIDATE_FAILED,
               (False, True): Outcome.CONTROL_FAILED, (False, False): Outcome.BOTH_FAILED}[(ctl_ok, cand_ok)]
    rec = Comparison(kind=kind, workflow=workflow, control=a, candidate=b, outcome=outcome, created_at=at)
    if outcome is Outcome.BOTH_FAILED:
        rec.error_match = ctl_err == cand_err
    if outcome is Outcome.BOTH_OK:
        rec.count_match = rec.kinds_match = True
        rec.dims_match = structure
        rec.phash_distance = distance
        rec.image_pairs = images if distance is not None else 0
    return rec


def frames(n: int, size: tuple[int, int] = (48, 48), *, offset: int = 0) -> list[Image.Image]:
    """``n`` visibly different RGB frames (a bar moving across a colour gradient)."""
    out = []
    w, h = size
    for i in range(n):
        img = Image.new("RGB", size)
        px = img.load()
        for y in range(h):
            for x in range(w):
                bar = ((x + (i + offset) * 7) // 6) % 2
                px[x, y] = (x * 255 // (w - 1), 255 * bar, y * 255 // (h - 1))
        out.append(img)
    return out


def animation(fmt: str, imgs: list[Image.Image], duration: int = 80) -> bytes:
    buf = io.BytesIO()
    first, rest = imgs[0], imgs[1:]
    if fmt == "GIF":
        first.save(buf, "GIF", save_all=True, append_images=rest, duration=duration, loop=0)
    elif fmt == "WEBP":
        first.save(buf, "WEBP", save_all=True, append_images=rest, duration=duration, lossless=True)
    else:
        first.save(buf, "PNG", save_all=True, append_images=rest, duration=duration)
    return buf.getvalue()


def rgba_png(transparent: bool = True) -> bytes:
    """A gradient with a transparent background around an opaque square (background removal output)."""
    img = Image.open(io.BytesIO(png("gradient"))).convert("RGBA")
    if transparent:
        px = img.load()
        for y in range(64):
            for x in range(64):
                if not (16 <= x < 48 and 16 <= y < 48):
                    r, g, b, _ = px[x, y]
                    px[x, y] = (r, g, b, 0)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def grey_png(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("L").convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def mp4(n_frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = 12) -> bytes:
    """A small real H.264/MPEG-4 video (PyAV)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for img in frames(n_frames, size):
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def wav(seconds: float = 0.5, freq: float = 440.0, rate: int = 16000) -> bytes:
    import math
    import struct
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(seconds * rate)
        w.writeframes(b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / rate)))
                               for i in range(n)))
    return buf.getvalue()


def media_result(job_id: str, items: list[tuple[ArtifactKind, bytes | None, str | None]],
                 provider: str = "ctl") -> JobResult:
    """A result with artifacts of any kind: ``(kind, data, text_or_url)``."""
    arts = []
    for i, (kind, data, extra) in enumerate(items):
        if kind is ArtifactKind.TEXT:
            arts.append(Artifact(node_id=str(10 + i), kind=kind, text=extra))
        else:
            arts.append(Artifact(node_id=str(10 + i), kind=kind, filename=f"{job_id}_{i}", data=data,
                                 url=extra))
    return JobResult(job_id=job_id, provider=provider, artifacts=arts)
