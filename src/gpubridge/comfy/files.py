"""A finished job's files in ComfyUI's folders, removed so a long-lived worker never fills its disk.

Each job writes under its own output folder (``output_prefix``, e.g. ``output/gpubridge/3fa2c1d04b5e/``) and
uploads its inputs content-addressed (``input/gpubridge/<sha>.png``), where two jobs with the same bytes share
one file. :class:`JobFiles` removes a job's output folder once its result is built, and the uploaded inputs
once no job is in flight on this worker (a job between its upload and its run may need the same file).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["JobFiles"]

log = logging.getLogger("gpubridge.comfy")


def _inside(base: Path, relative: str) -> Path | None:
    """``base / relative`` when it stays inside ``base`` (never a path a prompt could steer elsewhere)."""
    if not relative:
        return None
    target = (base / relative).resolve()
    return target if target != base and base in target.parents else None


class JobFiles:
    """Removes the files of a worker's jobs from ``output_dir`` and ``input_dir`` (ComfyUI's folders)."""

    def __init__(self, output_dir: str | Path | None, input_dir: str | Path | None):
        self.output_dir = Path(output_dir).resolve() if output_dir else None
        self.input_dir = Path(input_dir).resolve() if input_dir else None
        self.active = 0
        self._inputs: set[str] = set()

    def begin(self) -> None:
        """A job starts (before its inputs are uploaded)."""
        self.active += 1

    def end(self, job: Any | None) -> None:
        """A job ended and its outputs were read: remove its output folder, and every finished job's inputs
        if no other job is in flight."""
        self.active = max(0, self.active - 1)
        if job is not None:
            tags = getattr(job, "tags", {}) or {}
            self._remove_output(tags.get("output_prefix"))
            self._inputs.update(tags.get("input_paths") or ())
        if self.active == 0 and self._inputs:
            self._remove_inputs(self._inputs)
            self._inputs.clear()

    def _remove_output(self, prefix: str | None) -> None:
        if self.output_dir is None or not prefix:
            return
        folder = _inside(self.output_dir, prefix)
        if folder is not None and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    def _remove_inputs(self, paths: Iterable[str]) -> None:
        if self.input_dir is None:
            return
        for relative in paths:
            target = _inside(self.input_dir, relative)
            if target is not None:
                try:
                    target.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not remove input %s: %s", relative, exc)
