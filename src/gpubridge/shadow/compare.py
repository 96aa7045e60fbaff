"""Compare two outcomes of one request (control against candidate, or control against itself) into a
:class:`Comparison`, the record the shadow layer stores. Pure functions; no I/O.

What is compared:

- outcome parity (:class:`Outcome`) and, when both failed, error-class parity (same exception class name);
- latency (queue, execution, total, from ``JobResult.timings``; total falls back to the time the shadow
  layer measured) and cost (``JobResult.cost.usd``);
- outputs: artifact count, kinds, image dimensions, and for each image pair the perceptual-hash distance
  (``imagehash.phash``, 64 bits, so 0..64) and SSIM (7x7 window), both on grey levels box-reduced to at
  most 256 px a side. Images are decoded to pixels first, so metadata (PNG text chunks, EXIF, encoder
  settings) never counts.

Images are paired in output order: artifacts sorted by node id, then by their order within the node.

Whether a pair is a *mismatch* depends on the workflow's noise floor and is decided at report time by
:func:`is_mismatch` (see :mod:`gpubridge.shadow.report`).

Workflow identity (:func:`workflow_key`): ``request.tags["workflow"]`` when the caller sets it; otherwise
``wf-`` and 12 hex digits of a SHA-256 over the API graph's node ids, class types, links and input values,
with per-request values normalised away: seeds (``seed``, ``noise_seed``, ``*_seed``), prompt texts
(string inputs named ``text``, ``prompt``, ``positive``, ``negative``, ``string``, ``text_*``, ``*_text``),
``filename_prefix``, ``LoadImage``-style ``image``/``video``/``audio`` file names, and ``_meta`` titles.
Sizes, steps, samplers and model names stay: changing them makes another workflow.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import math
import re
import time
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
    "workflow_key",
    "phash_distance",
    "ssim",
]

Kind = Literal["candidate", "noise"]

_SEED = re.compile(r"^(seed|noise_seed|.+_seed)$")
_TEXT = re.compile(r"^(text|prompt|positive|negative|string|text_.+|.+_text)$")
_FILE_INPUTS = {"image", "video", "audio", "filename_prefix"}
SSIM_MAX_SIDE = 256


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
    notes: list[str] = Field(default_factory=list)

    @property
    def structure_match(self) -> bool | None:
        if self.outcome is not Outcome.BOTH_OK:
            return None
        return bool(self.count_match and self.kinds_match and self.dims_match)


def is_mismatch(record: Comparison, threshold: float) -> bool | None:
    """Whether a pair's outputs differ beyond ``threshold`` (pHash bits). None unless both succeeded.

    A difference in artifact count, kinds or image dimensions is always a mismatch.
    """
    if record.outcome is not Outcome.BOTH_OK:
        return None
    if not record.structure_match:
        return True
    if record.phash_distance is None:
        return False
    return record.phash_distance > threshold


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


class _Decoded:
    """An image's pixel size, and its grey levels box-reduced to at most ``SSIM_MAX_SIDE`` a side (the
    hash and SSIM work on that: the same reduction on both sides, a fraction of the cost)."""

    __slots__ = ("width", "height", "grey")

    def __init__(self, img):
        self.width, self.height = img.size
        grey = img.convert("L")
        factor = math.ceil(max(self.width, self.height) / SSIM_MAX_SIDE)
        self.grey = grey.reduce(factor) if factor > 1 else grey


def _decode(data: bytes) -> _Decoded:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)  # first frame of an animation
        return _Decoded(img.convert("RGB"))


def _grey(img):
    return img.grey if isinstance(img, _Decoded) else img.convert("L")


def phash_distance(a, b) -> int:
    """Hamming distance between the 64-bit perceptual hashes of two images (0..64)."""
    import imagehash

    return int(imagehash.phash(_grey(a)) - imagehash.phash(_grey(b)))


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


# ---------------------------------------------------------------------------------------------- compare


def _ordered(result: JobResult) -> list[Artifact]:
    def node_order(node_id: str) -> tuple[int, int | str]:
        return (0, int(node_id)) if node_id.isdigit() else (1, node_id)

    indexed = list(enumerate(result.artifacts))
    indexed.sort(key=lambda item: (node_order(item[1].node_id), item[0]))
    return [a for _, a in indexed]


def _is_image(art: Artifact) -> bool:
    return art.kind in (ArtifactKind.IMAGE, ArtifactKind.ANIMATION)


def _side(
    outcome: JobResult | BaseException,
    measured_s: float | None,
    provider: str | None,
    notes: list[str],
    label: str,
) -> tuple[Side, list[Any]]:
    """The side's record, and its decoded images in pairing order (None where undecodable)."""
    if isinstance(outcome, BaseException):
        return (
            Side(
                provider=getattr(outcome, "provider", None) or provider,
                job_id=getattr(outcome, "job_id", None),
                ok=False,
                error_type=type(outcome).__name__,
                error=str(outcome)[:500],
                total_s=measured_s,
            ),
            [],
        )
    arts = _ordered(outcome)
    images: list[Any] = []
    dims: list[str] = []
    for art in arts:
        if not _is_image(art):
            continue
        img = None
        if art.data is not None:
            try:
                img = _decode(art.data)
            except Exception as exc:  # a corrupt image is a finding, not a crash
                notes.append(f"{label}: cannot decode {art.filename or art.node_id}: {type(exc).__name__}")
        else:
            notes.append(f"{label}: {art.filename or art.node_id} has no bytes")
        images.append(img)
        if img is not None:
            dims.append(f"{img.width}x{img.height}")
        elif art.width and art.height:
            dims.append(f"{art.width}x{art.height}")
        else:
            dims.append("?")
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
        images=len(images),
        kinds=sorted(a.kind.value for a in arts),
        dims=dims,
    )
    return side, images


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
    ``timings.total_s``. CPU-bound (image decoding): call it off the event loop.
    """
    notes: list[str] = []
    a, a_images = _side(control, control_measured_s, control_provider, notes, "control")
    b, b_images = _side(candidate, candidate_measured_s, candidate_provider, notes, kind)
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
    record.count_match = a.artifacts == b.artifacts
    record.kinds_match = a.kinds == b.kinds
    record.dims_match = a.dims == b.dims and "?" not in a.dims
    distances: list[int] = []
    similarities: list[float] = []
    for x, y in zip(a_images, b_images, strict=False):
        if x is None or y is None:
            continue
        distances.append(phash_distance(x, y))
        if with_ssim:
            similarities.append(ssim(x, y))
    record.image_pairs = len(distances)
    record.phash_distance = float(max(distances)) if distances else None
    record.ssim = min(similarities) if similarities else None
    return record
