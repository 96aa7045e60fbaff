"""The container image, built from the pins in ``modal_app/comfyui.toml``.

:class:`ImageSpec` is the parsed pin file (pure data, tested offline); :func:`build_image` turns it into a
``modal.Image``: Debian slim, comfy-cli, a pinned ComfyUI, pinned custom nodes, gpubridge's runtime
packages, the memory-snapshot helper node, and gpubridge + this package as local sources (added last).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from gpubridge.errors import ConfigError

from .config import MODAL_APP_DIR, AppConfig

if TYPE_CHECKING:
    import modal

__all__ = ["REMOTE_APP_DIR", "SPEC_FILE", "CustomNode", "ImageSpec", "build_image"]

SPEC_FILE = MODAL_APP_DIR / "comfyui.toml"
REMOTE_APP_DIR = "/root/modal_app"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_VERSION = re.compile(r"^\d+(\.\d+)*([.-]?[A-Za-z0-9]+)*$")
_PINNED = re.compile(r"^[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,\-]+\])?==[A-Za-z0-9_.\-+]+$")


@dataclass(frozen=True)
class CustomNode:
    """A pinned custom node: a ComfyUI Registry id at a version, or a git repository at a commit."""

    registry: str | None = None
    version: str | None = None
    git: str | None = None
    commit: str | None = None

    @property
    def dirname(self) -> str:
        if self.registry:
            return self.registry
        return PurePosixPath(str(self.git).rstrip("/")).name.removesuffix(".git")

    def install_commands(self, comfy_path: str) -> list[str]:
        if self.registry:
            return [f"comfy node install --fast-deps {shlex.quote(f'{self.registry}@{self.version}')}"]
        dest = f"{comfy_path}/custom_nodes/{self.dirname}"
        q = shlex.quote
        return [
            (
                f"git clone {q(str(self.git))} {q(dest)} && "
                f"git -C {q(dest)} checkout --detach {q(str(self.commit))}"
            ),
            f"if [ -f {q(dest)}/requirements.txt ]; then pip install -r {q(dest)}/requirements.txt; fi",
        ]


@dataclass(frozen=True)
class ImageSpec:
    python: str
    comfy_cli: str
    comfyui_version: str
    apt: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    custom_nodes: tuple[CustomNode, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, path: str | Path = SPEC_FILE) -> ImageSpec:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read the image pins in {path}: {exc}") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "comfyui.toml") -> ImageSpec:
        image = data.get("image", {})
        comfy = data.get("comfyui", {})
        py = data.get("python", {})
        comfy_cli, version = comfy.get("comfy_cli"), comfy.get("version")
        if not comfy_cli or not _VERSION.match(str(comfy_cli)):
            raise ConfigError(f"{where}: [comfyui] comfy_cli must be a pinned version, got {comfy_cli!r}")
        if not version or not _VERSION.match(str(version)):
            raise ConfigError(f"{where}: [comfyui] version must be a pinned ComfyUI version, got {version!r}")
        packages = tuple(py.get("packages", []))
        for pkg in packages:
            if not _PINNED.match(pkg):
                raise ConfigError(f"{where}: python package {pkg!r} is not pinned (NAME==VERSION)")
        nodes = []
        for i, raw in enumerate(data.get("custom_nodes", []), 1):
            node = CustomNode(**{k: raw.get(k) for k in ("registry", "version", "git", "commit")})
            extra = set(raw) - {"registry", "version", "git", "commit"}
            if extra:
                raise ConfigError(f"{where}: custom node #{i} has unknown keys {sorted(extra)}")
            if node.registry:
                if node.git or not node.version or not _VERSION.match(node.version):
                    raise ConfigError(f"{where}: custom node #{i} ({node.registry}) needs a pinned version")
            elif node.git:
                if not node.commit or not _COMMIT.match(node.commit):
                    raise ConfigError(f"{where}: custom node #{i} ({node.git}) needs a 40-hex commit")
            else:
                raise ConfigError(
                    f"{where}: custom node #{i} needs 'registry' + 'version' or 'git' + 'commit'"
                )
            nodes.append(node)
        return cls(
            python=str(image.get("python", "3.11")),
            comfy_cli=str(comfy_cli),
            comfyui_version=str(version),
            apt=tuple(image.get("apt", [])),
            packages=packages,
            custom_nodes=tuple(nodes),
        )

    def comfy_install_command(self) -> str:
        return (
            f"comfy --skip-prompt install --fast-deps --nvidia --version {shlex.quote(self.comfyui_version)}"
        )

    def node_commands(self, comfy_path: str) -> list[str]:
        return [cmd for node in self.custom_nodes for cmd in node.install_commands(comfy_path)]


def build_image(config: AppConfig, spec: ImageSpec | None = None) -> modal.Image:
    """The image for every function of the app. Defining it does no I/O; Modal builds it on deploy."""
    import modal

    spec = spec or ImageSpec.load()
    image = modal.Image.debian_slim(python_version=spec.python)
    if spec.apt:
        image = image.apt_install(*spec.apt)
    image = image.uv_pip_install(f"comfy-cli=={spec.comfy_cli}").run_commands(spec.comfy_install_command())
    node_cmds = spec.node_commands(config.comfy_path)
    if node_cmds:
        image = image.run_commands(*node_cmds)
    if spec.packages:
        image = image.uv_pip_install(*spec.packages)
    if config.memory_snapshot and not config.gpu_snapshot:  # CPU snapshot: the CUDA-after-restore node
        image = image.add_local_dir(
            MODAL_APP_DIR / "memory_snapshot_helper",
            remote_path=f"{config.comfy_path}/custom_nodes/memory_snapshot_helper",
            copy=True,
        )
    image = image.env(
        {
            "HF_HUB_CACHE": f"{config.models_mount}/hf",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1",
            **config.to_env(),
        }
    )
    # Local sources last: Modal mounts them at container start instead of building a layer.
    return image.add_local_python_source("gpubridge").add_local_dir(
        MODAL_APP_DIR, remote_path=REMOTE_APP_DIR, ignore=["**/__pycache__/**", "**/*.pyc"]
    )
