"""Every output kind is compared, or counted as not compared (issue 22, defects 5-7 and batch pairing)."""

from __future__ import annotations

import pytest

from gpubridge.models import ArtifactKind
from gpubridge.shadow import compare as compare_mod
from gpubridge.shadow.compare import Outcome, compare, is_mismatch

from .helpers import animation, frames, grey_png, media_result, mp4, png, result, rgba_png, wav

K = ArtifactKind


def pair_status(rec, threshold: float) -> str | None:
    """match / mismatch / not-compared, through the public is_mismatch."""
    verdict = is_mismatch(rec, threshold)
    if verdict is None:
        return "not-compared" if rec.outcome is Outcome.BOTH_OK else None
    return "mismatch" if verdict else "match"


def test_pair_status_agrees():
    from gpubridge.shadow.compare import pair_status as real

    rec = compare(result(), result(), workflow="w")
    assert real(rec, 0) == pair_status(rec, 0) == "match"


def test_greyscale_output_against_colour_is_a_mismatch():
    """Defect 5: pHash/SSIM on grey levels scored a fully greyscale output distance 0."""
    colour = png("gradient")
    rec = compare(result(images=[colour]), result(images=[grey_png(colour)]), workflow="w")
    assert pair_status(rec, 64) == "mismatch"
    assert rec.colour_match is False
    assert rec.control.modes == ["colour"] and rec.candidate.modes == ["grey"]


def test_dropped_alpha_channel_is_a_mismatch():
    """Defect 5: a background removal whose alpha channel is dropped scored distance 0."""
    rec = compare(result(images=[rgba_png(True)]), result(images=[rgba_png(False)]), workflow="w")
    assert is_mismatch(rec, 64) is True
    assert rec.control.modes == ["colour+alpha"] and rec.candidate.modes == ["colour"]
    assert rec.colour_match is False
    same = compare(result(images=[rgba_png(True)]), result(images=[rgba_png(True)]), workflow="w")
    assert same.colour_match is True and same.phash_distance == 0 and is_mismatch(same, 0) is False


def test_swapped_colour_channels_move_the_distance():
    from PIL import Image
    import io

    img = Image.open(io.BytesIO(png("gradient")))
    r, g, b = img.split()
    buf = io.BytesIO()
    Image.merge("RGB", (b, g, r)).save(buf, "PNG")
    rec = compare(result(images=[png("gradient")]), result(images=[buf.getvalue()]), workflow="w")
    assert rec.phash_distance is not None and rec.phash_distance > 10


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_every_frame_of_an_animation_is_compared(fmt: str):
    """Defect 6: 16 frames against 4 different frames scored distance 0 (first frame only)."""
    ctl = animation(fmt, frames(16))
    cand = animation(fmt, frames(1) + frames(3, offset=5))
    a = media_result("c", [(K.ANIMATION, ctl, None)])
    b = media_result("k", [(K.ANIMATION, cand, None)])
    rec = compare(a, b, workflow="w")
    assert pair_status(rec, 64) == "mismatch"
    assert rec.control.frames == [16] and rec.candidate.frames == [4] and rec.frames_match is False
    # same frame count, one different frame in the middle: the distance sees it
    c2 = animation(fmt, frames(8)[:4] + frames(1, offset=20) + frames(8)[5:])
    rec2 = compare(media_result("c", [(K.ANIMATION, animation(fmt, frames(8)), None)]),
                   media_result("k", [(K.ANIMATION, c2, None)]), workflow="w")
    assert rec2.frames_match is True and rec2.phash_distance is not None and rec2.phash_distance > 8
    same = compare(a, media_result("k", [(K.ANIMATION, ctl, None)]), workflow="w")
    assert same.frames_match and same.phash_distance == 0 and pair_status(same, 0) == "match"
    assert same.control.durations_ms[0] > 0


def test_text_outputs_are_compared():
    """Defect 7: "a red fox" against "ERROR: OOM" counted as matching."""
    a = media_result("c", [(K.TEXT, None, "A red  fox\n")])
    rec = compare(a, media_result("k", [(K.TEXT, None, "ERROR: OOM")]), workflow="w")
    assert pair_status(rec, 64) == "mismatch"
    assert rec.text_match is False and rec.text_similarity is not None and rec.text_similarity < 0.5
    same = compare(a, media_result("k", [(K.TEXT, None, "a red fox")]), workflow="w")
    assert same.text_match is True and pair_status(same, 0) == "match"


def test_url_only_and_files_are_not_compared_never_a_match():
    """Defect 7: outputs that were never looked at counted as a match."""
    a = media_result("c", [(K.IMAGE, None, "https://cdn.example/a.png"), (K.FILE, b"x", None)])
    b = media_result("k", [(K.IMAGE, None, "https://cdn.example/b.png"), (K.FILE, b"y", None)])
    rec = compare(a, b, workflow="w")
    assert pair_status(rec, 64) == "not-compared" and is_mismatch(rec, 64) is None
    assert rec.not_compared == {"image": 1, "file": 1}
    # bytes on one side, a URL on the other: not compared either (neither match nor mismatch)
    one = compare(result(), media_result("k", [(K.IMAGE, None, "https://cdn.example/b.png")]), workflow="w")
    assert one.not_compared == {"image": 1} and pair_status(one, 64) == "not-compared"
    video = compare(media_result("c", [(K.VIDEO, None, "https://cdn.example/a.mp4")]),
                    media_result("k", [(K.VIDEO, None, "https://cdn.example/b.mp4")]), workflow="w")
    assert video.not_compared == {"video": 1} and pair_status(video, 64) == "not-compared"


def test_video_without_pyav_is_not_compared(monkeypatch):
    monkeypatch.setattr(compare_mod, "have_pyav", lambda: False)
    a = media_result("c", [(K.VIDEO, b"\x00" * 12, None)])
    rec = compare(a, media_result("k", [(K.VIDEO, b"\x01" * 12, None)]), workflow="w")
    assert rec.not_compared == {"video": 1} and pair_status(rec, 64) == "not-compared"
    assert any("PyAV" in n for n in rec.notes)


def test_video_is_decoded_and_compared():
    """Defect 7: a real mp4 against 12 garbage bytes counted as matching."""
    pytest.importorskip("av")
    real = mp4()
    a = media_result("c", [(K.VIDEO, real, None)])
    garbage = compare(a, media_result("k", [(K.VIDEO, b"\x00" * 12, None)]), workflow="w")
    assert pair_status(garbage, 64) == "mismatch" and garbage.media_match is False
    short = compare(a, media_result("k", [(K.VIDEO, mp4(n_frames=6), None)]), workflow="w")
    assert pair_status(short, 64) == "mismatch" and short.media_match is False
    same = compare(a, media_result("k", [(K.VIDEO, real, None)]), workflow="w")
    assert same.media_match is True and same.phash_distance == 0 and pair_status(same, 0) == "match"
    assert same.control.media == ["video 64x48 12 frames 1.000 s"]


def test_audio_is_decoded_and_compared():
    pytest.importorskip("av")
    a = media_result("c", [(K.AUDIO, wav(), None)])
    other = compare(a, media_result("k", [(K.AUDIO, wav(freq=2500.0), None)]), workflow="w")
    assert pair_status(other, 64) == "mismatch" and other.media_match is False
    longer = compare(a, media_result("k", [(K.AUDIO, wav(seconds=1.0), None)]), workflow="w")
    assert longer.media_match is False
    garbage = compare(a, media_result("k", [(K.AUDIO, b"RIFF0000", None)]), workflow="w")
    assert pair_status(garbage, 64) == "mismatch"
    same = compare(a, media_result("k", [(K.AUDIO, wav(), None)]), workflow="w")
    assert same.media_match is True and pair_status(same, 0) == "match"


def test_batch_in_another_order_is_paired_by_content():
    a = result(images=[png("gradient"), png("stripes")])
    b = result(images=[png("stripes"), png("gradient")])
    rec = compare(a, b, workflow="w")
    assert pair_status(rec, 0) == "match" and rec.phash_distance == 0 and rec.paired_by_content is True
