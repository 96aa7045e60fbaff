"""The container image, built from the pins in ``modal_app/comfyui.toml`` and the lock beside it.

:class:`ImageSpec` is the parsed pin file (pure data, checked against its lock offline); :func:`build_image`
turns it into a ``modal.Image``: the base image of a pinned Modal image builder at an exact Python, Debian
packages at exact versions, the hashed lock installed by a pinned uv without resolving, ComfyUI checked out
at its commit by comfy-cli (no requirements, no torch, no Manager), custom nodes at commits, the
memory-snapshot helper node, and gpubridge + this package as local sources (added last).

:func:`render` turns a ``modal.Image`` into its Dockerfile lines offline, with Modal's own code, and
:func:`unpinned` names every install among them that is not pinned. ``python -m modal_app.image`` prints both
and exits 1 when something is unpinned; the deploy workflow runs it before ``modal deploy``.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from gpubridge.errors import ConfigError
from gpubridge.lock import Lock, python_series, read_lock

from .config import MODAL_APP_DIR, REMOTE_TEMPLATES_DIR, TEMPLATES_DIR, AppConfig

if TYPE_CHECKING:
    import modal

__all__ = ["MIN_COMFY_CLI", "REMOTE_APP_DIR", "SPEC_FILE", "CustomNode", "ImageSpec", "build_image", "render",
           "unpinned"]

SPEC_FILE = MODAL_APP_DIR / "comfyui.toml"
REMOTE_APP_DIR = "/root/modal_app"
MIN_COMFY_CLI = (1, 5, 4)  # 1.5.3 looks release tags up in GitHub's first page of 30 releases (comfy-cli #340)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_VERSION = re.compile(r"^\d+(\.\d+)*([.-]?[A-Za-z0-9]+)*$")
_PYTHON = re.compile(r"^3\.\d+\.\d+$")
_BUILDER = re.compile(r"^\d{4}\.\d{2}$")
_APT = re.compile(r"^[a-z0-9][a-z0-9.+\-]*=[A-Za-z0-9.+:~\-]+$")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@dataclass(frozen=True)
class CustomNode:
    """A custom node pinned to a commit of its git repository."""

    git: str
    commit: str

    @property
    def dirname(self) -> str:
        return PurePosixPath(self.git.rstrip("/")).name.removesuffix(".git")

    def install_command(self, comfy_path: str) -> str:
        dest = f"{comfy_path}/custom_nodes/{self.dirname}"
        q = shlex.quote
        return f"git clone {q(self.git)} {q(dest)} && git -C {q(dest)} checkout --detach {q(self.commit)}"


@dataclass(frozen=True)
class ImageSpec:
    builder: str
    python: str
    uv: str
    comfyui_version: str
    comfyui_commit: str
    comfy_cli: str
    lock_path: Path
    lock: Lock
    apt: tuple[str, ...] = ()
    custom_nodes: tuple[CustomNode, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, path: str | Path = SPEC_FILE) -> ImageSpec:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read the image pins in {path}: {exc}") from None
        return cls.from_dict(data, where=str(path), base=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "comfyui.toml", base: Path = MODAL_APP_DIR
                  ) -> ImageSpec:
        image, comfy, py = data.get("image", {}), data.get("comfyui", {}), data.get("python", {})

        def need(value: Any, pattern: re.Pattern[str], what: str) -> str:
            if not isinstance(value, str) or not pattern.match(value):
                raise ConfigError(f"{where}: {what} must be pinned exactly, got {value!r}")
            return value

        builder = need(image.get("builder"), _BUILDER, "[image] builder (a Modal image builder version)")
        python = need(image.get("python"), _PYTHON, "[image] python (X.Y.Z)")
        uv = need(image.get("uv"), _VERSION, "[image] uv")
        apt = tuple(image.get("apt", []))
        for pkg in apt:
            if not isinstance(pkg, str) or not _APT.match(pkg):
                raise ConfigError(f"{where}: Debian package {pkg!r} is not pinned (NAME=VERSION)")
        version = need(comfy.get("version"), _VERSION, "[comfyui] version")
        commit = need(comfy.get("commit"), _COMMIT, "[comfyui] commit (40 hex)")
        comfy_cli = need(comfy.get("comfy_cli"), _VERSION, "[comfyui] comfy_cli")
        if _version_tuple(comfy_cli) < MIN_COMFY_CLI:
            raise ConfigError(f"{where}: comfy-cli {comfy_cli} cannot install an older ComfyUI release (it looks "
                              "the tag up in GitHub's first 30 releases, comfy-cli #340); use 1.5.4 or later")
        if comfy.get("manager", False) is not False:
            raise ConfigError(f"{where}: [comfyui] manager must be false: ComfyUI-Manager would be cloned at "
                              "HEAD and its requirements resolved at build time")
        nodes = []
        for i, raw in enumerate(data.get("custom_nodes", []), 1):
            extra = set(raw) - {"git", "commit"}
            if "registry" in raw:
                raise ConfigError(f"{where}: custom node #{i} ({raw['registry']}): Registry installs resolve "
                                  "their dependencies at build time; give its git repository and commit instead")
            if extra:
                raise ConfigError(f"{where}: custom node #{i} has unknown keys {sorted(extra)}")
            git, node_commit = raw.get("git"), raw.get("commit")
            if not git or not isinstance(node_commit, str) or not _COMMIT.match(node_commit):
                raise ConfigError(f"{where}: custom node #{i} needs 'git' and a 40-hex 'commit'")
            nodes.append(CustomNode(git=str(git), commit=node_commit))
        lock_path = base / str(py.get("lock", "requirements.lock"))
        lock = read_lock(lock_path)
        spec = cls(builder=builder, python=python, uv=uv, comfyui_version=version, comfyui_commit=commit,
                   comfy_cli=comfy_cli, lock_path=lock_path, lock=lock, apt=apt, custom_nodes=tuple(nodes))
        problems = spec.lock_problems()
        if problems:
            raise ConfigError(f"{where}: the lock {lock_path.name} does not fit: " + "; ".join(problems))
        return spec

    def lock_problems(self) -> list[str]:
        """Where the lock and the pins disagree (each must describe the same image)."""
        head, pins = self.lock.header, self.lock.pins
        problems = list(self.lock.problems)
        if head.comfyui_commit != self.comfyui_commit:
            problems.append(f"it was made from ComfyUI {head.comfyui_commit[:12]}, the pin is "
                            f"{self.comfyui_commit[:12]}; run `gpubridge lock` again")
        if head.comfyui_version != self.comfyui_version:
            problems.append(f"it was made from ComfyUI {head.comfyui_version}, the pin is {self.comfyui_version}")
        if python_series(head.python) != python_series(self.python):
            problems.append(f"it is for Python {head.python}, the image has {self.python}")
        if pins.get("comfy-cli") != self.comfy_cli:
            problems.append(f"it has comfy-cli {pins.get('comfy-cli')}, the pin is {self.comfy_cli}")
        if "torch" not in pins:
            problems.append("it has no torch")
        return problems

    def comfy_install_command(self, comfy_path: str) -> str:
        """comfy-cli checks ComfyUI out at the release (requirements, torch and Manager come from elsewhere),
        then the build fails unless the checkout is the pinned commit."""
        q = shlex.quote
        return (
            f"comfy --skip-prompt --workspace {q(comfy_path)} install --nvidia --version {q(self.comfyui_version)} "
            "--skip-manager --skip-torch-or-directml --skip-requirement && "
            f'test "$(git -C {q(comfy_path)} rev-parse HEAD)" = {q(self.comfyui_commit)}'
        )


def build_image(config: AppConfig, spec: ImageSpec | None = None) -> modal.Image:
    """The image for every function of the app. Defining it does no I/O; Modal builds it on deploy."""
    import modal

    spec = spec or ImageSpec.load()
    image = modal.Image.debian_slim(python_version=spec.python)
    if spec.apt:
        image = image.apt_install(*spec.apt)
    image = image.uv_pip_install(requirements=[str(spec.lock_path)], uv_version=spec.uv,
                                 extra_options="--require-hashes --no-deps")
    image = image.run_commands(spec.comfy_install_command(config.comfy_path))
    if spec.custom_nodes:
        image = image.run_commands(*(node.install_command(config.comfy_path) for node in spec.custom_nodes))
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
    # Local sources last: Modal mounts them at container start instead of building a layer. The workflow
    # templates ride along, so a deploy carries the templates its job API accepts.
    image = image.add_local_python_source("gpubridge").add_local_dir(
        MODAL_APP_DIR, remote_path=REMOTE_APP_DIR, ignore=["**/__pycache__/**", "**/*.pyc"]
    )
    if TEMPLATES_DIR.is_dir():
        image = image.add_local_dir(TEMPLATES_DIR, remote_path=REMOTE_TEMPLATES_DIR)
    return image


# ------------------------------------------------------------------------------------------ offline audit


def render(image: modal.Image, builder: str) -> list[list[str]]:
    """The Dockerfile of each layer of ``image`` (base first), as Modal's image builder ``builder`` would
    write it, without a network call. Reads Modal's lazy loader: a Modal upgrade that changes it fails the
    image test loudly rather than passing it."""
    from modal._utils.async_utils import synchronizer

    inner = synchronizer._translate_in(image)  # noqa: SLF001
    load = inner._load  # noqa: SLF001
    cells = dict(zip(load.__code__.co_freevars, (c.cell_contents for c in load.__closure__ or ()), strict=True))
    layers: list[list[str]] = []
    bases = list((cells.get("base_images") or {}).values())
    if cells.get("base_image") is not None:  # a local-files layer (add_local_*) over its base
        bases.append(cells["base_image"])
    for base in bases:
        layers += render(synchronizer._translate_out(base), builder)  # noqa: SLF001
    dockerfile = cells.get("dockerfile_function")
    if dockerfile is not None:
        layers.append(list(dockerfile(builder).commands))
    return layers


_PIP = re.compile(r"\b(?:pip|uv pip|/uv pip) install\b")
_PINNED_REQ = re.compile(r"^[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,\-]+\])?==[A-Za-z0-9_.\-+]+$")


def _pip_problem(cmd: str) -> str | None:
    rest = re.sub(r"\$\([^)]*\)", "$SUBST", cmd[_PIP.search(cmd).end():])  # type: ignore[union-attr]
    args = shlex.split(rest)
    reqs, files, hashed, i = [], [], "--require-hashes" in args, 0
    while i < len(args):
        arg = args[i]
        if arg in ("-r", "--requirement", "--requirements"):
            files.append(args[i + 1])
            i += 2
            continue
        if arg in ("--python", "--index-url", "--extra-index-url", "-i", "--find-links", "-c", "--constraint"):
            i += 2
            continue
        if arg in ("&&", ";", "||"):
            break
        if not arg.startswith(("-", "$")):
            reqs.append(arg)
        i += 1
    if files and not hashed:
        return f"installs {files} without --require-hashes"
    loose = [r for r in reqs if not _PINNED_REQ.match(r)]
    return f"installs unpinned {loose}" if loose else None


def unpinned(layers: list[list[str]], *, skip_base: bool = True) -> list[str]:
    """Every step of the rendered layers that installs something not pinned to an exact version, hash or
    commit. The first layer (Modal's base image for the builder version and Python release) is Modal's
    own and is skipped unless ``skip_base`` is false."""
    problems: list[str] = []
    for layer in layers[1:] if skip_base else layers:
        steps = [line.split(" ", 1)[1] if " " in line else "" for line in layer if line.startswith(("RUN ", "COPY "))]
        for line, step in zip([ln for ln in layer if ln.startswith(("RUN ", "COPY "))], steps, strict=True):
            if line.startswith("COPY ") and "--from=" in line:
                ref = line.split("--from=", 1)[1].split()[0]
                if ref.endswith(":latest") or ":" not in ref.rsplit("/", 1)[-1]:
                    problems.append(f"{line}: copies from an image that is not pinned ({ref})")
                continue
            if line.startswith("COPY "):
                continue
            if "apt-get install" in step:
                pkgs = [a for a in shlex.split(step.split("apt-get install", 1)[1]) if not a.startswith("-")]
                loose = [p for p in pkgs if not _APT.match(p)]
                if loose:
                    problems.append(f"{line}: Debian packages without a version {loose}")
            if _PIP.search(step):
                why = _pip_problem(step)
                if why:
                    problems.append(f"{line}: {why}")
            if "comfy node install" in step or "--fast-deps" in step:
                problems.append(f"{line}: resolves dependencies at build time")
            if re.search(r"\bcomfy\b.*\binstall\b", step) and "comfy node" not in step:
                missing = [f for f in ("--skip-requirement", "--skip-torch-or-directml", "--skip-manager")
                           if f not in step]
                if missing or "rev-parse HEAD" not in step:
                    problems.append(f"{line}: installs ComfyUI with its own resolution ({missing}) or unchecked")
            for clone in re.finditer(r"git clone\s+(\S+)\s+(\S+)", step):
                rest = step[clone.end():]
                if not re.search(r"checkout (--detach )?'?[0-9a-f]{40}'?", rest):
                    problems.append(f"{line}: clones {clone.group(1)} without checking out a commit")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m modal_app.image``: print the image's Dockerfile lines and exit 1 on an unpinned install."""
    from .config import load_config

    spec = ImageSpec.load()
    layers = render(build_image(load_config(), spec), spec.builder)
    for layer in layers:
        print("\n".join(layer), end="\n\n")
    problems = unpinned(layers)
    for problem in problems:
        print(f"UNPINNED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
