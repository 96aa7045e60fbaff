"""Imports point one way: models/errors/config <- comfy <- providers <- resilience, shadow <- connect, CLI.

modal_app/ and contrib/runpod_worker/ use gpubridge.comfy and the models, never the client-side providers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "gpubridge"

# layer of each top-level part of the package; a module may import only from its own layer or lower ones
LAYERS = {
    "errors": 0, "models": 0, "config": 0, "fetch": 0, "download": 0, "gate": 0, "plugins": 0, "runner": 0, "__init__": 6,
    "comfy": 1,
    "manifest": 1, "lock": 1, "storage": 1, "templates": 1,
    "providers": 2,
    "resilience": 3, "shadow": 3, "routing": 3,
    "server": 4, "connect": 4, "testing": 4,
    "cli": 5, "cli_models": 5, "cli_shadow": 5, "cli_serve": 5, "cli_templates": 5, "cli_route": 5,
}
FORBIDDEN_SIDEWAYS = {("resilience", "shadow"), ("shadow", "resilience"), ("resilience", "providers"),
                      ("shadow", "providers")}


def part_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def imported_parts(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    parts: set[str] = set()
    pkg = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target and target[0] == "gpubridge" and len(target) > 1:
                parts.add(target[1])
            elif target == ["gpubridge"]:
                parts.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                t = alias.name.split(".")
                if t[0] == "gpubridge" and len(t) > 1:
                    parts.add(t[1])
    return parts


MODULES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path):
    me = part_of(path)
    if me == "__init__":
        return
    for other in imported_parts(path):
        if other not in LAYERS or other == me:
            continue
        assert LAYERS[other] <= LAYERS[me], f"{path.relative_to(SRC)} ({me}) imports {other}"
        assert (me, other) not in FORBIDDEN_SIDEWAYS, f"{path.relative_to(SRC)} ({me}) imports {other}"


@pytest.mark.parametrize("folder", ["modal_app", "contrib/runpod_worker"])
def test_deployables_never_import_client_side_providers(folder: str):
    for path in (ROOT / folder).rglob("*.py"):
        text = path.read_text()
        for banned in ("gpubridge.providers", "gpubridge.resilience", "gpubridge.shadow", "gpubridge.connect"):
            assert banned not in text, f"{path.relative_to(ROOT)} uses {banned}"


def test_only_comfy_speaks_comfyui_protocol():
    """ComfyUI's wire details (the websocket route, /prompt, /history) live in gpubridge.comfy alone; the
    Modal app and the RunPod worker use it rather than a client of their own."""
    deployables = [*(ROOT / "modal_app").rglob("*.py"), *(ROOT / "contrib" / "runpod_worker").rglob("*.py")]
    for path in [*MODULES, *deployables]:
        if path.is_relative_to(SRC) and part_of(path) in ("comfy", "testing"):
            continue
        text = path.read_text()
        for marker in ('"/prompt"', '"/history', "/ws?clientId", '"/view"'):
            assert marker not in text, f"{path.relative_to(ROOT)} contains ComfyUI protocol detail {marker}"
