"""Lock files for the deployables: ComfyUI's Python requirements, torch and an image's own packages, resolved
once by uv with hashes, so that an image build installs exactly what was resolved and nothing else.

    gpubridge lock --comfyui ~/src/ComfyUI -r modal_app/requirements.in -o modal_app/requirements.lock

``--comfyui`` is a ComfyUI checkout (or a bare git directory with ``--rev``); its ``requirements.txt`` is read
at that commit, and the lock's first line records the ComfyUI version and commit it was made from, so a build
can refuse a lock that belongs to another ComfyUI (:func:`read_lock`). Custom nodes add their
``requirements.txt`` with more ``-r``. The pure parts (the command line, the header, the audit of a lock) are
functions here; :func:`make_lock` runs uv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "DEFAULT_PLATFORM",
    "HEADER_PREFIX",
    "ComfySource",
    "Lock",
    "LockHeader",
    "compile_command",
    "make_lock",
    "read_comfy_source",
    "read_lock",
]

HEADER_PREFIX = "# gpubridge-lock:"
DEFAULT_PLATFORM = "x86_64-manylinux_2_28"  # Debian bookworm and Ubuntu 24.04 images, glibc >= 2.28
_VERSION_PY = re.compile(r"""__version__\s*=\s*["']([^"']+)["']""")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)(\[[^\]]*\])?==([^\s;\\]+)")


@dataclass(frozen=True)
class ComfySource:
    """ComfyUI's requirements at one commit."""

    version: str
    commit: str
    requirements: str


@dataclass(frozen=True)
class LockHeader:
    comfyui_version: str
    comfyui_commit: str
    python: str
    platform: str

    def line(self) -> str:
        return (f"{HEADER_PREFIX} comfyui={self.comfyui_version} commit={self.comfyui_commit} "
                f"python={self.python} platform={self.platform}")

    @classmethod
    def parse(cls, line: str) -> LockHeader | None:
        if not line.startswith(HEADER_PREFIX):
            return None
        fields = dict(part.split("=", 1) for part in line[len(HEADER_PREFIX):].split() if "=" in part)
        try:
            return cls(fields["comfyui"], fields["commit"], fields["python"], fields["platform"])
        except KeyError:
            return None


@dataclass(frozen=True)
class Lock:
    header: LockHeader
    pins: dict[str, str]
    """Normalised package name -> exact version."""
    problems: tuple[str, ...]
    """Lines that are not ``name==version`` with at least one ``--hash``."""


def _git(args: list[str]) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ConfigError("gpubridge lock needs git on PATH to read a ComfyUI checkout") from None
    if done.returncode != 0:
        raise ConfigError(f"git {' '.join(args)} failed: {done.stderr.strip()[:300]}")
    return done.stdout


def read_comfy_source(path: str | Path, rev: str | None = None) -> ComfySource:
    """ComfyUI's ``requirements.txt``, version and commit from a checkout (its HEAD, or ``rev``) or a bare git
    directory (``rev``, default HEAD)."""
    path = Path(path)
    if (path / ".git").exists() or (path / "requirements.txt").exists():
        git = ["-C", str(path)]
    elif (path / "objects").is_dir() and (path / "HEAD").exists():
        git = ["--git-dir", str(path)]
    else:
        raise ConfigError(f"{path} is neither a ComfyUI checkout nor a git directory")
    ref = rev or "HEAD"
    commit = _git([*git, "rev-parse", f"{ref}^{{commit}}"]).strip()
    requirements = _git([*git, "show", f"{commit}:requirements.txt"])
    match = _VERSION_PY.search(_git([*git, "show", f"{commit}:comfyui_version.py"]))
    if not match:
        raise ConfigError(f"{path}: comfyui_version.py at {commit[:12]} has no __version__")
    return ComfySource(version=match.group(1), commit=commit, requirements=requirements)


def _uv() -> list[str]:
    found = shutil.which("uv")
    if found:
        return [found]
    try:
        import uv  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("gpubridge lock needs uv: pip install uv (or put uv on PATH)") from None
    return [uv.find_uv_bin()]


def compile_command(sources: list[str], *, python: str, platform: str, output: str, index_url: str | None = None,
                    find_links: list[str] | None = None, no_index: bool = False) -> list[str]:
    """The ``uv pip compile`` arguments (after the uv executable) for a hashed, platform-specific lock."""
    args = ["pip", "compile", *sources, "--python-version", python, "--python-platform", platform,
            "--generate-hashes", "--no-header", "--quiet", "--output-file", output]
    if index_url:
        args += ["--index-url", index_url]
    for link in find_links or []:
        args += ["--find-links", link]
    if no_index:
        args.append("--no-index")
    return args


def make_lock(comfy: ComfySource, requirements: list[Path], output: Path, *, python: str,
              platform: str = DEFAULT_PLATFORM, index_url: str | None = None, find_links: list[str] | None = None,
              no_index: bool = False) -> Lock:
    """Resolve ComfyUI's requirements plus ``requirements`` into ``output``, with its header; return it read."""
    for req in requirements:
        if not req.is_file():
            raise ConfigError(f"no requirements file {req}")
    with tempfile.TemporaryDirectory(prefix="gpubridge-lock-") as tmp:
        comfy_req = Path(tmp) / "comfyui-requirements.txt"
        comfy_req.write_text(comfy.requirements, encoding="utf-8")
        raw = Path(tmp) / "lock.txt"
        cmd = _uv() + compile_command([str(comfy_req), *map(str, requirements)], python=python, platform=platform,
                                      output=str(raw), index_url=index_url, find_links=find_links,
                                      no_index=no_index)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"uv could not resolve the lock:\n{done.stderr.strip()[-2000:]}")
        body = raw.read_text(encoding="utf-8").replace(str(comfy_req), "comfyui/requirements.txt")
    for req in requirements:
        body = body.replace(str(req), req.name)
    header = LockHeader(comfy.version, comfy.commit, python, platform)
    text = (f"{header.line()}\n# Made by `gpubridge lock`; do not edit. Every line is an exact version with "
            f"hashes.\n{body}")
    output.write_text(text, encoding="utf-8")
    return parse_lock(text, where=str(output))


def parse_lock(text: str, *, where: str = "lock") -> Lock:
    lines = text.splitlines()
    header = LockHeader.parse(lines[0]) if lines else None
    if header is None:
        raise ConfigError(f"{where} does not start with a '{HEADER_PREFIX}' line; make it with `gpubridge lock`")
    if not _COMMIT.match(header.comfyui_commit):
        raise ConfigError(f"{where}: the header's commit {header.comfyui_commit!r} is not a 40-hex commit")
    pins: dict[str, str] = {}
    problems: list[str] = []
    # Join continuation lines: "name==1.0 \" + "    --hash=sha256:..." is one requirement.
    entries: list[str] = []
    for line in lines[1:]:
        stripped = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not stripped:
            continue
        if entries and entries[-1].endswith("\\"):
            entries[-1] = entries[-1][:-1].rstrip() + " " + stripped
        else:
            entries.append(stripped)
    for entry in entries:
        if entry.startswith("--"):
            problems.append(f"option line {entry[:80]!r} (options belong in the build, not the lock)")
            continue
        match = _REQ.match(entry)
        if not match:
            problems.append(f"{entry[:80]!r} is not pinned (name==version)")
            continue
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        if "--hash=" not in entry:
            problems.append(f"{name}=={match.group(3)} has no hash")
        pins[name] = match.group(3)
    return Lock(header=header, pins=pins, problems=tuple(problems))


def read_lock(path: str | Path) -> Lock:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read the lock {path}: {exc}") from None
    return parse_lock(text, where=str(path))


def python_series(version: str) -> str:
    return ".".join(version.split(".")[:2])

