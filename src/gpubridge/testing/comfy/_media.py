"""Placeholder media files for the ComfyUI double: right size, right magic bytes, cheap to make.

PNGs (and APNGs) are real, decodable, solid-colour images with ComfyUI's tEXt chunks. They are built
without touching every pixel: the first row is compressed, the identical rows after it (PNG "Up" filter,
so all zero) come from a per-size cache, and the zlib checksums are combined arithmetically. A
1024x1024 PNG costs about as much as a 64x64 one.

Video and animated-WebP files are placeholders: a valid container header (MP4 ``ftyp``, WebM EBML,
RIFF/WEBP with VP8X+ANIM, GIF89a) that identifies the format and carries the size, not playable frames.
"""

from __future__ import annotations

import functools
import json
import struct
import zlib
from collections.abc import Iterable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ADLER_BASE = 65521
_SMALL_RAW = 1 << 16  # below this many raw bytes, compress the whole image in one go


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """The Adler-32 of A+B from adler32(A), adler32(B) and len(B) (zlib's adler32_combine)."""
    rem = len2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 += (adler2 & 0xFFFF) + _ADLER_BASE - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + _ADLER_BASE - rem
    sum1 %= _ADLER_BASE
    sum2 %= _ADLER_BASE
    return sum1 | (sum2 << 16)


@functools.lru_cache(maxsize=64)
def _rest_rows(width: int, height: int) -> tuple[bytes, int, int]:
    """Raw-deflate of rows 2..height (each: filter byte 2 = Up, then zeros), its adler32 and length."""
    rest = (b"\x02" + bytes(3 * width)) * (height - 1)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = comp.compress(rest) + comp.flush(zlib.Z_FINISH)
    return data, zlib.adler32(rest), len(rest)


@functools.lru_cache(maxsize=256)
def solid_idat(width: int, height: int, rgb: tuple[int, int, int], level: int = 4) -> bytes:
    """The zlib stream (IDAT payload) of a ``width`` x ``height`` 8-bit RGB image of one colour."""
    first = b"\x00" + bytes(rgb) * width
    if (3 * width + 1) * height <= _SMALL_RAW or height == 1:
        raw = first + (b"\x02" + bytes(3 * width)) * (height - 1)
        return zlib.compress(raw, level)
    head = zlib.compressobj(level, zlib.DEFLATED, -15)
    first_deflated = head.compress(first) + head.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, not final
    rest_deflated, rest_adler, rest_len = _rest_rows(width, height)
    adler = adler32_combine(zlib.adler32(first), rest_adler, rest_len)
    return b"\x78\x01" + first_deflated + rest_deflated + struct.pack(">I", adler)


def _ihdr(width: int, height: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _text_chunks(texts: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(
        _chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
        for key, value in texts
    )


def png(
    width: int, height: int, rgb: tuple[int, int, int], texts: Iterable[tuple[str, str]] = (), level: int = 4
) -> bytes:
    """A solid-colour RGB PNG with tEXt chunks (ComfyUI writes ``prompt`` and one per extra_pnginfo key)."""
    return b"".join(
        (
            PNG_SIGNATURE,
            _ihdr(width, height),
            _text_chunks(texts),
            _chunk(b"IDAT", solid_idat(width, height, rgb, level)),
            _chunk(b"IEND", b""),
        )
    )


def apng(
    width: int,
    height: int,
    frames: int,
    rgb: tuple[int, int, int],
    fps: float,
    comf: Iterable[tuple[str, str]] = (),
    level: int = 4,
) -> bytes:
    """An animated PNG of ``frames`` identical solid-colour frames.

    ``comf``: metadata as ComfyUI's SaveAnimatedPNG writes it, private ``comf`` chunks after the image data.
    """
    frames = max(1, frames)
    idat = solid_idat(width, height, rgb, level)
    delay_num, delay_den = 1000, max(1, int(round(fps * 1000)))
    parts = [PNG_SIGNATURE, _ihdr(width, height), _chunk(b"acTL", struct.pack(">II", frames, 0))]
    seq = 0
    for index in range(frames):
        parts.append(
            _chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, delay_num, delay_den, 0, 0))
        )
        seq += 1
        if index == 0:
            parts.append(_chunk(b"IDAT", idat))
        else:
            parts.append(_chunk(b"fdAT", struct.pack(">I", seq) + idat))
            seq += 1
    for key, value in comf:
        parts.append(_chunk(b"comf", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def _describe(kind: str, width: int, height: int, frames: int, fps: float) -> bytes:
    return json.dumps(
        {"gpubridge_placeholder": kind, "width": width, "height": height, "frames": frames, "fps": fps}
    ).encode()


def mp4(width: int, height: int, frames: int, fps: float) -> bytes:
    """An MP4 placeholder: ``ftyp`` (isom), a ``free`` box describing the video, an empty ``mdat``."""
    ftyp = struct.pack(">I", 32) + b"ftypisom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"
    note = _describe("mp4", width, height, frames, fps)
    free = struct.pack(">I", 8 + len(note)) + b"free" + note
    return ftyp + free + struct.pack(">I", 8) + b"mdat"


def mov(width: int, height: int, frames: int, fps: float) -> bytes:
    """A QuickTime placeholder (``ftyp`` qt)."""
    ftyp = struct.pack(">I", 20) + b"ftypqt  " + struct.pack(">I", 0x200) + b"qt  "
    note = _describe("mov", width, height, frames, fps)
    return ftyp + struct.pack(">I", 8 + len(note)) + b"free" + note


def _ebml(doc_type: bytes, width: int, height: int, frames: int, fps: float) -> bytes:
    body = (
        b"\x42\x86\x81\x01"
        b"\x42\xf7\x81\x01"
        b"\x42\xf2\x81\x04"
        b"\x42\xf3\x81\x08" + b"\x42\x82" + bytes([0x80 | len(doc_type)]) + doc_type + b"\x42\x87\x81\x04"
        b"\x42\x85\x81\x02"
    )
    header = b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(body)]) + body
    note = _describe(doc_type.decode(), width, height, frames, fps)
    void = b"\xec" + b"\x01" + len(note).to_bytes(7, "big") + note  # EBML Void element, 8-byte size
    return header + b"\x18\x53\x80\x67" + b"\x01\xff\xff\xff\xff\xff\xff\xff" + void


def webm(width: int, height: int, frames: int, fps: float) -> bytes:
    """A WebM placeholder: EBML header with DocType webm, then an unknown-size Segment."""
    return _ebml(b"webm", width, height, frames, fps)


def mkv(width: int, height: int, frames: int, fps: float) -> bytes:
    """A Matroska placeholder."""
    return _ebml(b"matroska", width, height, frames, fps)


def webp(width: int, height: int, frames: int, fps: float) -> bytes:
    """An animated-WebP placeholder: RIFF/WEBP with a VP8X (animation flag, canvas size) and ANIM chunk."""
    vp8x = struct.pack("<B3x", 0x02) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    anim = struct.pack("<IH", 0, 0)
    body = (
        b"WEBP"
        + b"VP8X"
        + struct.pack("<I", len(vp8x))
        + vp8x
        + b"ANIM"
        + struct.pack("<I", len(anim))
        + anim
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def gif(width: int, height: int, frames: int, fps: float) -> bytes:
    """A GIF placeholder: a GIF89a header with the logical screen size, a comment, the trailer."""
    note = _describe("gif", width, height, frames, fps)[:255]
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0, 0, 0)
        + b"\x21\xfe"
        + bytes([len(note)])
        + note
        + b"\x00\x3b"
    )


def latent_file(width: int, height: int, batch: int) -> bytes:
    """A ``.latent`` placeholder in safetensors layout (header only)."""
    header = json.dumps(
        {
            "__metadata__": {
                "gpubridge_placeholder": "latent",
                "width": str(width),
                "height": str(height),
                "batch": str(batch),
            }
        }
    ).encode()
    return struct.pack("<Q", len(header)) + header


CONTAINERS = {"mp4": mp4, "mov": mov, "webm": webm, "mkv": mkv, "webp": webp, "gif": gif}

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".json": "application/json",
    ".txt": "text/plain",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".wav": "audio/x-wav",
    ".ogg": "audio/ogg",
}
