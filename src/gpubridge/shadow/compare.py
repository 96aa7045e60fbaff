"""Compare two outcomes of one request (control against candidate, or control against itself) into a
:class:`Comparison`, the record the shadow layer stores. Pure functions; no I/O.

What is compared:

- outcome parity (:class:`Outcome`) and, when both failed, error-class parity (same exception class name);
- latency (queue, execution, total, from ``JobResult.timings``; total falls back to the time the shadow
  layer measured) and cost (``JobResult.cost.usd``; a failed job's cost when its error carries one);
- outputs, per kind (every artifact is compared, or counted in ``not_compared`` by kind, never a match):

  - images and animations (GIF, WebP, APNG): artifact count, kinds, pixel size, frame count and total
    duration, colour (greyscale or not) and alpha (any pixel not opaque); for every frame pair, the
    perceptual-hash distance (``imagehash.phash``, 64 bits) on grey levels *and* on each of the R, G, B
    (and A when both have alpha) channels, the largest of these; SSIM on grey levels. Images are decoded
    to pixels first (box-reduced to at most 256 px a side), so metadata never counts. A batch whose
    images come back in another order is paired by content (``scipy.optimize.linear_sum_assignment`` on
    the distances);
  - video, with PyAV (``av``) installed: duration, frame count, frame size, and the hash distance of up
    to :data:`VIDEO_SAMPLES` frames sampled evenly; without PyAV, not compared;
  - audio, with PyAV: duration, sample rate, channels and a spectral fingerprint (log band energies,
    correlated); without PyAV, not compared;
  - text: normalised equality (Unicode NFKC, case-folded, whitespace collapsed) and a similarity score
    (``difflib``); different and less than :data:`TEXT_SIMILARITY` similar is a mismatch;
  - artifacts without bytes (URL-only) and other files: not compared.

Whether a pair is a *mismatch* depends on the workflow's noise floor and is decided at report time by
:func:`pair_status` (see :mod:`gpubridge.shadow.report`).

Workflow identity (:func:`workflow_key`): ``request.tags["workflow"]`` when the caller sets it; for a job
made from a template (:mod:`gpubridge.templates`), ``NAME@VERSION`` (the version is a hash of the template's
workflow and manifest, so records and the report's go/no-go are per template and version, whatever the
parameters); otherwise ``wf-`` and 12 hex digits of a SHA-256 over the API graph's node ids, class types, links and input values,
with per-request values normalised away: seeds (``seed``, ``noise_seed``, ``*_seed``), prompt texts
(string inputs named ``text``, ``prompt``, ``positive``, ``negative``, ``string``, ``text_*``, ``*_text``),
``filename_prefix``, ``LoadImage``-style ``image``/``video``/``audio`` file names, and ``_meta`` titles.
Sizes, steps, samplers and model names stay: changing them makes another workflow.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import io
import json
import math
import re
import time
import unicodedata
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..models import Artifact, ArtifactKind, JobRequest, JobResult

__all__ = [
    "Outcome",
    "Side",
    "Comparison",
    "compare",
    "is_mismatch",
    "pair_status",
    "have_pyav",
    "workflow_key",
    "phash_distance",
    "ssim",
]

Kind = Literal["candidate", "noise"]

_SEED = re.compile(r"^(seed|noise_seed|.+_seed)$")
_TEXT = re.compile(r"^(text|prompt|positive|negative|string|text_.+|.+_text)$")
_FILE_INPUTS = {"image", "video", "audio", "filename_prefix"}
SSIM_MAX_SIDE = 256
MAX_FRAMES = 1000
"""Frames of an animation decoded at most; beyond, the artifact counts as not compared."""
VIDEO_SAMPLES = 8
TEXT_SIMILARITY = 0.9
"""Texts that differ after normalisation and are less similar than this (``difflib`` ratio) mismatch."""
AUDIO_SIMILARITY = 0.9
"""Audio whose spectral fingerprints correlate less than this mismatch."""
GREY_CHROMA = 8
"""An image whose channels never differ by more than this (of 255) is greyscale."""


class Outcome(str, enum.Enum):
    BOTH_OK = "both_ok"
    CANDIDATE_FAILED = "candidate_failed"
    """The control succeeded and the candidate did not."""
    CONTROL_FAILED = "control_failed"
    """The candidate succeeded and the control did not."""
    BOTH_FAILED = "both_failed"

    def __str__(self) -> str:
        return self.value


class Side(BaseModel):
    """One side of a pair: its outcome, latency, cost and output shape."""

    provider: str | None = None
    job_id: str | None = None
    ok: bool
    error_type: str | None = None
    error: str | None = None
    queued_s: float | None = None
    executing_s: float | None = None
    total_s: float | None = None
    cost_usd: float | None = None
    artifacts: int = 0
    images: int = 0
    kinds: list[str] = Field(default_factory=list)
    dims: list[str] = Field(default_factory=list)
    """``WxH`` of each image in pairing order (``?`` when it could not be decoded)."""
    frames: list[int] = Field(default_factory=list)
    """Frame count of each image or animation, in pairing order."""
    durations_ms: list[int] = Field(default_factory=list)
    """Total duration of each animation (ms), in pairing order."""
    modes: list[str] = Field(default_factory=list)
    """``colour``/``grey``, plus ``+alpha`` when any pixel is not opaque, of each image, in pairing order."""
    media: list[str] = Field(default_factory=list)
    """Video and audio properties (duration, frames, size, rate), in order."""


class Comparison(BaseModel):
    """The record of one pair. For ``kind="noise"`` the ``candidate`` side is the control's second run."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = Field(default_factory=time.time)
    kind: Kind = "candidate"
    workflow: str
    request_id: str | None = None
    control: Side
    candidate: Side
    outcome: Outcome
    error_match: bool | None = None
    """Both failed with the same error class (None unless both failed)."""
    count_match: bool | None = None
    kinds_match: bool | None = None
    dims_match: bool | None = None
    image_pairs: int = 0
    phash_distance: float | None = None
    """Largest pHash distance (bits) over the image pairs; None without image pairs."""
    ssim: float | None = None
    """Smallest SSIM over the image pairs; None without image pairs."""
    frames_match: bool | None = None
    """Same frame counts and durations (animations)."""
    colour_match: bool | None = None
    """Same colour/greyscale and alpha, image by image."""
    media_match: bool | None = None
    """Video/audio properties and fingerprints agree (None without video or audio compared)."""
    text_pairs: int = 0
    text_match: bool | None = None
    text_similarity: float | None = None
    """Smallest ``difflib`` similarity over the text pairs."""
    paired_by_content: bool = False
    """The images were paired by content because they came back in another order."""
    not_compared: dict[str, int] = Field(default_factory=dict)
    """Artifact pairs not compared, by kind (URL-only, no decoder, too many frames): never a match."""
    notes: list[str] = Field(default_factory=list)

    @property
    def structure_match(self) -> bool | None:
        if self.outcome is not Outcome.BOTH_OK:
            return None
        flags = (self.count_match, self.kinds_match, self.dims_match, self.frames_match, self.colour_match,
                 self.media_match)
        return all(flag is not False for flag in flags) and bool(self.count_match and self.kinds_match)


def pair_status(record: Comparison, threshold: float) -> str | None:
    """``"mismatch"``, ``"match"`` or ``"not-compared"`` for a pair where both succeeded (else None).

    A difference in artifact count, kinds, image size, frames, colour or alpha, video/audio properties, or
    text is a mismatch, and so is a hash distance above ``threshold`` (pHash bits). A pair with anything
    not compared and no mismatch found is ``not-compared``: never counted as a match.
    """
    if record.outcome is not Outcome.BOTH_OK:
        return None
    if not record.structure_match or record.text_match is False:
        return "mismatch"
    if record.phash_distance is not None and record.phash_distance > threshold:
        return "mismatch"
    if sum(record.not_compared.values()):
        return "not-compared"
    return "match"


def is_mismatch(record: Comparison, threshold: float) -> bool | None:
    """Whether a pair's outputs differ beyond ``threshold`` (see :func:`pair_status`); None unless both
    succeeded and the pair was compared."""
    status = pair_status(record, threshold)
    return None if status in (None, "not-compared") else status == "mismatch"


# -------------------------------------------------------------------------------------------- workflow id


def _normalise_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if _SEED.match(name) and not isinstance(value, list):
            continue
        if isinstance(value, str) and (_TEXT.match(name) or name in _FILE_INPUTS):
            continue
        out[name] = value
    return out


def workflow_key(request: JobRequest) -> str:
    """The workflow identity used to group figures (see the module docstring)."""
    tagged = request.tags.get("workflow")
    if tagged:
        return tagged
    if request.template:
        return f"{request.template}@{request.template_version or 'unversioned'}"
    graph = {
        node_id: {
            "class_type": node.get("class_type"),
            "inputs": _normalise_inputs(node.get("inputs") or {}),
        }
        for node_id, node in request.workflow.to_api().items()
    }
    text = json.dumps(graph, sort_keys=True, separators=(",", ":"), default=str)
    return "wf-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- images


def _reduce(img, factor: int):
    return img.reduce(factor) if factor > 1 else img


class _Frame:
    """One frame's channels (grey, R, G, B, and A when not opaque), box-reduced to at most
    ``SSIM_MAX_SIDE`` a side: the hash and SSIM work on that, the same reduction on both sides."""

    __slots__ = ("grey", "channels", "alpha", "colour")

    def __init__(self, img, factor: int):
        import numpy as np

        rgba = img.convert("RGBA")
        r, g, b, a = (_reduce(c, factor) for c in rgba.split())
        self.grey = _reduce(img.convert("RGB").convert("L"), factor)
        self.channels = (r, g, b)
        amin = a.getextrema()[0]
        self.alpha = a if amin < 255 else None
        px = np.asarray(_reduce(img.convert("RGB"), factor), dtype=np.int16)
        spread = int((px.max(axis=2) - px.min(axis=2)).max()) if px.size else 0
        self.colour = spread > GREY_CHROMA


class _Decoded:
    """An image or animation: pixel size, frames (every one, up to ``MAX_FRAMES``), total duration."""

    __slots__ = ("width", "height", "frames", "duration_ms", "truncated")

    def __init__(self, img):
        from PIL import ImageSequence

        self.width, self.height = img.size
        factor = math.ceil(max(self.width, self.height) / SSIM_MAX_SIDE)
        self.frames: list[_Frame] = []
        self.duration_ms = 0
        self.truncated = False
        for i, frame in enumerate(ImageSequence.Iterator(img)):
            if i >= MAX_FRAMES:
                self.truncated = True
                break
            frame.load()  # WebP sets a frame's duration when it is loaded
            self.duration_ms += int(frame.info.get("duration", 0) or 0)
            self.frames.append(_Frame(frame, factor))

    @property
    def grey(self):
        return self.frames[0].grey

    @property
    def mode(self) -> str:
        colour = any(f.colour for f in self.frames)
        alpha = any(f.alpha is not None for f in self.frames)
        return ("colour" if colour else "grey") + ("+alpha" if alpha else "")


def _decode(data: bytes) -> _Decoded:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return _Decoded(img)


def _grey(img):
    if isinstance(img, _Decoded):
        return img.grey
    if isinstance(img, _Frame):
        return img.grey
    return img.convert("L")


def phash_distance(a, b) -> int:
    """Hamming distance between the 64-bit perceptual hashes of two images (0..64), on grey levels."""
    import imagehash

    return int(imagehash.phash(_grey(a)) - imagehash.phash(_grey(b)))


def _frame_distance(x: _Frame, y: _Frame) -> int:
    """The largest pHash distance over grey levels, R, G, B, and A when both frames have alpha."""
    import imagehash

    pairs = [(x.grey, y.grey), *zip(x.channels, y.channels, strict=True)]
    if x.alpha is not None and y.alpha is not None:
        pairs.append((x.alpha, y.alpha))
    return max(int(imagehash.phash(p) - imagehash.phash(q)) for p, q in pairs)


def _image_distance(x: _Decoded, y: _Decoded) -> int:
    """The largest frame distance over the frame pairs (the common frames, in order)."""
    return max((_frame_distance(f, g) for f, g in zip(x.frames, y.frames, strict=False)), default=0)


def ssim(a, b) -> float:
    """Mean SSIM of two images on grey levels (7x7 uniform window), resized to a common size of at most
    ``SSIM_MAX_SIDE`` pixels a side.
    """
    import numpy as np
    from PIL import Image
    from scipy.ndimage import uniform_filter

    ga, gb = _grey(a), _grey(b)
    w = max(min(ga.width, gb.width, SSIM_MAX_SIDE), 7)
    h = max(min(ga.height, gb.height, SSIM_MAX_SIDE), 7)

    def pixels(g):
        same = g.size == (w, h)
        return np.asarray(g if same else g.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)

    x, y = pixels(ga), pixels(gb)
    win, n = 7, 49
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ux, uy = uniform_filter(x, win), uniform_filter(y, win)
    uxx, uyy, uxy = uniform_filter(x * x, win), uniform_filter(y * y, win), uniform_filter(x * y, win)
    cov = n / (n - 1)
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = win // 2
    return float(s[pad:-pad, pad:-pad].mean())


# --------------------------------------------------------------------------------------- video, audio


def have_pyav() -> bool:
    """Whether PyAV (``av``) can be imported: without it, video and audio are not compared."""
    try:
        import av  # noqa: F401
    except Exception:
        return False
    return True


class _Video:
    __slots__ = ("duration", "frames", "width", "height", "samples")

    def __init__(self, data: bytes):
        import av
        from PIL import Image

        kept: list[Any] = []
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            count = 0
            last_pts = 0.0
            for frame in container.decode(stream):
                count += 1
                if frame.pts is not None and frame.time_base is not None:
                    last_pts = max(last_pts, float(frame.pts * frame.time_base))
                img = frame.to_image()
                img.thumbnail((64, 64), Image.Resampling.BOX)
                kept.append(img)
            if stream.duration is not None and stream.time_base is not None:
                self.duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                self.duration = container.duration / av.time_base
            else:
                self.duration = last_pts
        self.frames = count
        picks = sorted({round(i * (count - 1) / max(VIDEO_SAMPLES - 1, 1)) for i in range(VIDEO_SAMPLES)}) \
            if count else []
        self.samples = [_Frame(kept[i], 1) for i in picks]
        if count == 0:
            raise ValueError("no video frames")

    def describe(self) -> str:
        return f"video {self.width}x{self.height} {self.frames} frames {self.duration:.3f} s"


class _Audio:
    __slots__ = ("duration", "rate", "channels", "fingerprint")

    RATE = 16000

    def __init__(self, data: bytes):
        import av
        import numpy as np

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            self.rate = stream.codec_context.sample_rate
            self.channels = stream.codec_context.channels
            resampler = av.AudioResampler(format="flt", layout="mono", rate=self.RATE)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        if samples.size == 0:
            raise ValueError("no audio samples")
        self.duration = samples.size / self.RATE
        self.fingerprint = self._fingerprint(samples)

    @staticmethod
    def _fingerprint(samples):
        """Log energies of 32 frequency bands over 1024-sample windows (rows: time)."""
        import numpy as np

        win = 1024
        n = max(1, samples.size // win)
        frames = np.resize(samples, n * win).reshape(n, win) if samples.size >= win else \
            np.pad(samples, (0, win - samples.size)).reshape(1, win)
        spectrum = np.abs(np.fft.rfft(frames * np.hanning(win), axis=1)) ** 2
        bands = np.array_split(spectrum, 32, axis=1)
        return np.log1p(np.stack([b.sum(axis=1) for b in bands], axis=1))

    def similarity(self, other: _Audio) -> float:
        import numpy as np

        n = min(len(self.fingerprint), len(other.fingerprint))
        a, b = self.fingerprint[:n].ravel(), other.fingerprint[:n].ravel()
        if a.std() == 0 or b.std() == 0:
            return 1.0 if np.allclose(a, b) else 0.0
        return float(np.corrcoef(a, b)[0, 1])

    def describe(self) -> str:
        return f"audio {self.rate} Hz {self.channels} ch {self.duration:.3f} s"


def _norm_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _text_of(art: Artifact) -> str | None:
    if art.text is not None:
        return art.text
    if art.data is not None:
        return art.data.decode("utf-8", "replace")
    return None


# ---------------------------------------------------------------------------------------------- compare


def _ordered(result: JobResult) -> list[Artifact]:
    def node_order(node_id: str) -> tuple[int, int | str]:
        return (0, int(node_id)) if node_id.isdigit() else (1, node_id)

    indexed = list(enumerate(result.artifacts))
    indexed.sort(key=lambda item: (node_order(item[1].node_id), item[0]))
    return [a for _, a in indexed]


def _is_image(art: Artifact) -> bool:
    return art.kind in (ArtifactKind.IMAGE, ArtifactKind.ANIMATION)


URL_ONLY = "url-only"


class _Outputs:
    """One side's decoded outputs by kind (None where undecodable or without bytes)."""

    def __init__(self) -> None:
        self.images: list[_Decoded | str | None] = []
        """Decoded images; None where undecodable; ``URL_ONLY`` where there are no bytes."""
        self.image_names: list[str] = []
        self.videos: list[_Video | None] = []
        self.audios: list[_Audio | None] = []
        self.texts: list[str | None] = []
        self.others: list[Artifact] = []
        self.url_only: dict[str, int] = {}


def _side(
    outcome: JobResult | BaseException,
    measured_s: float | None,
    provider: str | None,
    notes: list[str],
    label: str,
) -> tuple[Side, _Outputs]:
    """The side's record, and its decoded outputs in pairing order."""
    out = _Outputs()
    if isinstance(outcome, BaseException):
        cost = getattr(outcome, "cost", None)
        cost_usd = getattr(cost, "usd", cost) if cost is not None else None
        return (
            Side(
                provider=getattr(outcome, "provider", None) or provider,
                job_id=getattr(outcome, "job_id", None),
                ok=False,
                error_type=type(outcome).__name__,
                error=str(outcome)[:500],
                total_s=measured_s,
                cost_usd=cost_usd if isinstance(cost_usd, (int, float)) else None,
            ),
            out,
        )
    arts = _ordered(outcome)
    dims: list[str] = []
    frames: list[int] = []
    durations: list[int] = []
    modes: list[str] = []
    media: list[str] = []
    pyav = have_pyav()
    for art in arts:
        name = art.filename or art.node_id
        if art.kind is ArtifactKind.TEXT:
            out.texts.append(_text_of(art))
            continue
        if art.data is None:
            out.url_only[art.kind.value] = out.url_only.get(art.kind.value, 0) + 1
            notes.append(f"{label}: {name} has no bytes (URL only): not compared")
            if _is_image(art):
                out.images.append(URL_ONLY)
                out.image_names.append(name)
                dims.append(f"{art.width}x{art.height}" if art.width and art.height else "?")
                frames.append(0)
                durations.append(0)
                modes.append("?")
            continue
        if _is_image(art):
            img = None
            try:
                img = _decode(art.data)
            except Exception as exc:  # a corrupt image is a finding, not a crash
                notes.append(f"{label}: cannot decode {name}: {type(exc).__name__}")
            out.images.append(img)
            out.image_names.append(name)
            if img is not None:
                dims.append(f"{img.width}x{img.height}")
                frames.append(len(img.frames))
                durations.append(img.duration_ms)
                modes.append(img.mode)
            else:
                dims.append("?")
                frames.append(0)
                durations.append(0)
                modes.append("?")
        elif art.kind in (ArtifactKind.VIDEO, ArtifactKind.AUDIO) and pyav:
            cls = _Video if art.kind is ArtifactKind.VIDEO else _Audio
            try:
                decoded = cls(art.data)
                media.append(decoded.describe())
            except Exception as exc:
                notes.append(f"{label}: cannot decode {name}: {type(exc).__name__}")
                decoded = None
                media.append(f"{art.kind.value} ?")
            target: list[Any] = out.videos if art.kind is ArtifactKind.VIDEO else out.audios
            target.append(decoded)
        else:
            out.others.append(art)
    t = outcome.timings
    side = Side(
        provider=outcome.provider or provider,
        job_id=outcome.job_id,
        ok=True,
        queued_s=t.queued_s,
        executing_s=t.executing_s,
        total_s=t.total_s if t.total_s is not None else measured_s,
        cost_usd=outcome.cost.usd if outcome.cost is not None else None,
        artifacts=len(arts),
        images=len(out.images),
        kinds=sorted(a.kind.value for a in arts),
        dims=dims,
        frames=frames,
        durations_ms=durations,
        modes=modes,
        media=media,
    )
    return side, out


def _pair_images(a: list[Any], b: list[Any]) -> tuple[list[int], bool]:
    """For each image of ``a``, the index of its partner in ``b``: output order, unless pairing by content
    (least total grey-hash distance) makes a better match of a same-size batch."""
    order = list(range(min(len(a), len(b))))
    if len(a) != len(b) or len(a) < 2 or not all(isinstance(x, _Decoded) for x in [*a, *b]):
        return order, False
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    cost = np.array([[phash_distance(x.frames[0], y.frames[0]) for y in b] for x in a], dtype=float)
    rows, cols = linear_sum_assignment(cost)
    if cost[rows, cols].sum() < cost[order, order].sum():
        return [int(c) for c in cols], True
    return order, False


def compare(
    control: JobResult | BaseException,
    candidate: JobResult | BaseException,
    *,
    workflow: str,
    kind: Kind = "candidate",
    request_id: str | None = None,
    control_measured_s: float | None = None,
    candidate_measured_s: float | None = None,
    control_provider: str | None = None,
    candidate_provider: str | None = None,
    with_ssim: bool = True,
) -> Comparison:
    """Compare two outcomes (a result or the exception raised instead) into a :class:`Comparison`.

    ``*_measured_s`` is the total latency measured around the job, used when its result has no
    ``timings.total_s``. CPU-bound (decoding): call it off the event loop.
    """
    notes: list[str] = []
    a, ao = _side(control, control_measured_s, control_provider, notes, "control")
    b, bo = _side(candidate, candidate_measured_s, candidate_provider, notes, kind)
    if a.ok and b.ok:
        outcome = Outcome.BOTH_OK
    elif a.ok:
        outcome = Outcome.CANDIDATE_FAILED
    elif b.ok:
        outcome = Outcome.CONTROL_FAILED
    else:
        outcome = Outcome.BOTH_FAILED
    record = Comparison(
        kind=kind,
        workflow=workflow,
        request_id=request_id,
        control=a,
        candidate=b,
        outcome=outcome,
        notes=notes,
    )
    if outcome is Outcome.BOTH_FAILED:
        record.error_match = a.error_type == b.error_type
    if outcome is not Outcome.BOTH_OK:
        return record
    not_compared: dict[str, int] = {}

    def skip(kind_name: str, count: int = 1) -> None:
        if count > 0:
            not_compared[kind_name] = not_compared.get(kind_name, 0) + count

    record.count_match = a.artifacts == b.artifacts
    record.kinds_match = a.kinds == b.kinds

    # images and animations
    partner, by_content = _pair_images(ao.images, bo.images)
    record.paired_by_content = by_content
    dims_ok = frames_ok = colour_ok = True
    distances: list[int] = []
    similarities: list[float] = []
    for i, j in enumerate(partner):
        x, y = ao.images[i], bo.images[j]
        if x == URL_ONLY or y == URL_ONLY or (x is None and y is None):
            skip("image")  # nothing to look at on one side, or undecodable on both
            continue
        if x is None or y is None:
            dims_ok = False  # one side decoded, the other did not
            continue
        if x.truncated or y.truncated:
            skip("animation")
            record.notes.append(f"more than {MAX_FRAMES} frames: not compared frame by frame")
        dims_ok &= (x.width, x.height) == (y.width, y.height)
        frames_ok &= len(x.frames) == len(y.frames) and x.duration_ms == y.duration_ms
        colour_ok &= x.mode == y.mode
        distances.append(_image_distance(x, y))
        if with_ssim:
            similarities.append(min(ssim(f.grey, g.grey) for f, g in zip(x.frames, y.frames, strict=False)))
    record.dims_match = dims_ok and len(ao.images) == len(bo.images)
    record.frames_match = frames_ok
    record.colour_match = colour_ok

    # video and audio (only decoded with PyAV; otherwise in "others", not compared)
    media_flags: list[bool] = []
    for x, y in zip(ao.videos, bo.videos, strict=False):
        if x is None and y is None:
            skip("video")
            continue
        if x is None or y is None:
            media_flags.append(False)
            continue
        frame_s = x.duration / x.frames if x.frames else 0.0
        media_flags.append((x.width, x.height) == (y.width, y.height) and x.frames == y.frames
                           and abs(x.duration - y.duration) <= max(0.05, frame_s))
        distances.append(max((_frame_distance(f, g) for f, g in zip(x.samples, y.samples, strict=False)),
                             default=0))
    for x, y in zip(ao.audios, bo.audios, strict=False):
        if x is None and y is None:
            skip("audio")
            continue
        if x is None or y is None:
            media_flags.append(False)
            continue
        media_flags.append(x.rate == y.rate and x.channels == y.channels
                           and abs(x.duration - y.duration) <= max(0.05, 0.01 * x.duration)
                           and x.similarity(y) >= AUDIO_SIMILARITY)
    record.media_match = all(media_flags) if media_flags else None

    # text
    text_flags: list[bool] = []
    text_sims: list[float] = []
    for x, y in zip(ao.texts, bo.texts, strict=False):
        if x is None or y is None:
            skip("text")
            continue
        nx, ny = _norm_text(x), _norm_text(y)
        sim = 1.0 if nx == ny else difflib.SequenceMatcher(None, nx, ny).ratio()
        text_sims.append(sim)
        text_flags.append(nx == ny or sim >= TEXT_SIMILARITY)
    record.text_pairs = len(text_flags)
    record.text_match = all(text_flags) if text_flags else None
    record.text_similarity = min(text_sims) if text_sims else None

    # what is not compared: artifacts without bytes, files, video/audio without PyAV
    for kind_name in sorted(set(ao.url_only) | set(bo.url_only)):
        if kind_name not in ("image", "animation"):
            skip(kind_name, max(ao.url_only.get(kind_name, 0), bo.url_only.get(kind_name, 0)))
    for art in ao.others:
        skip(art.kind.value)
        if art.kind in (ArtifactKind.VIDEO, ArtifactKind.AUDIO):
            record.notes.append(f"{art.kind.value} not compared: PyAV (av) is not installed")
    record.not_compared = not_compared

    record.image_pairs = len(distances)
    record.phash_distance = float(max(distances)) if distances else None
    record.ssim = min(similarities) if similarities else None
    return record
