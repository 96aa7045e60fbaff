"""Runs before ComfyUI imports its nodes: make ``get_torch_device`` fall back to the CPU without CUDA.

During Modal's memory snapshot no GPU is attached, and ComfyUI's unpatched
``torch.device(torch.cuda.current_device())`` would fail. The patch is applied once (the original file is
kept beside it as model_management_original.py) and is a no-op when a GPU is present.
"""

import shutil
from pathlib import Path

_ORIGINAL = "return torch.device(torch.cuda.current_device())"

comfy_dir = Path(__file__).resolve().parent.parent.parent / "comfy"
target = comfy_dir / "model_management.py"
backup = comfy_dir / "model_management_original.py"


def _patch() -> None:
    text = target.read_text(encoding="utf-8")
    if _ORIGINAL not in text:
        print("[memory_snapshot_helper] get_torch_device not found; ComfyUI changed, not patching")
        return
    shutil.copy(target, backup)
    lines = []
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith(_ORIGINAL):
            pad = line[: len(line) - len(stripped)]
            lines.append(f"{pad}if torch.cuda.is_available():\n")
            lines.append(f"{pad}    {_ORIGINAL}\n")
            lines.append(f"{pad}return torch.device('cpu')  # gpubridge: no GPU during a memory snapshot\n")
        else:
            lines.append(line)
    target.write_text("".join(lines), encoding="utf-8")
    print("[memory_snapshot_helper] patched comfy/model_management.py for CPU memory snapshots")


if not backup.exists() and target.exists():
    _patch()
