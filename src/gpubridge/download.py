"""Streaming an artifact URL (a presigned object-store URL a backend returned) to a file: bounded memory, a
size cap, the checksum checked when the store reported one, nothing left behind when any of that fails.

Artifact URLs come from the backends gpubridge is configured with, not from callers; caller URLs go through
the guarded fetcher (:mod:`gpubridge.fetch`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx

from .errors import InputUnavailable, PayloadTooLarge, ProtocolError, redact_url

__all__ = ["DEFAULT_MAX_BYTES", "download"]

DEFAULT_MAX_BYTES = 20 * 2**30  # 20 GiB: a cap, not a budget (nothing is held in memory)
_CHUNK = 1 << 20


def download(url: str, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, sha256: str | None = None,
             expected_size: int | None = None, timeout: float = 60.0) -> int:
    """Write ``url``'s body to ``path`` (through a temporary file beside it, renamed at the end) and return the
    number of bytes. Raises :class:`PayloadTooLarge` past ``max_bytes``, :class:`ProtocolError` on a checksum or
    size mismatch, :class:`InputUnavailable` when the URL cannot be read (expired, 403, 5xx, unreachable)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    shown = redact_url(url.split("?", 1)[0]) + ("?..." if "?" in url else "")  # a presigned query is a secret
    digest = hashlib.sha256()
    size = 0
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise InputUnavailable(f"Could not download {shown}: HTTP {resp.status_code}"
                                       + (" (an expired presigned URL answers 403)" if resp.status_code == 403
                                          else ""), retryable=resp.status_code >= 500)
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise PayloadTooLarge(f"{shown} is {int(declared)} bytes, over the {max_bytes}-byte cap",
                                      size=int(declared), limit=max_bytes)
            with open(tmp, "wb") as fh:
                for chunk in resp.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"{shown} is over the {max_bytes}-byte cap", size=size,
                                              limit=max_bytes)
                    digest.update(chunk)
                    fh.write(chunk)
        if expected_size is not None and size != expected_size:
            raise ProtocolError(f"{shown} gave {size} bytes, the backend said {expected_size}")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise ProtocolError(f"{shown}: sha256 {digest.hexdigest()} is not the {sha256} the backend reported")
        os.replace(tmp, path)
        return size
    except httpx.HTTPError as exc:
        raise InputUnavailable(f"Could not download {shown}: {type(exc).__name__}: {exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
