"""The Modal image, rendered offline with Modal's own Dockerfile code: every install is pinned (exact versions,
hashes, commits, image tags), the lock belongs to the pinned ComfyUI, and the audit catches each kind of
unpinned step, the image as it was before issue 13 included. `gpubridge lock` makes a hashed lock from a
ComfyUI checkout, offline against a local wheel folder."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import tomllib
from modal_app.config import AppConfig
from modal_app.image import SPEC_FILE, ImageSpec, build_image, render, unpinned
from typer.testing import CliRunner

import modal
from gpubridge.cli import app
from gpubridge.errors import ConfigError
from gpubridge.lock import parse_lock


def _spec_data() -> dict:
    return tomllib.loads(SPEC_FILE.read_text())


def test_the_image_renders_offline_with_every_install_pinned():
    spec = ImageSpec.load()
    layers = render(build_image(AppConfig(), spec), spec.builder)
    lines = [line for layer in layers for line in layer]
    assert lines[0] == f"FROM python:{spec.python}-slim-bookworm"  # the builder version's base, exact Python
    assert f"COPY --from=ghcr.io/astral-sh/uv:{spec.uv} /uv /.uv/uv" in lines
    install = next(line for line in lines if "uv pip install" in line)
    assert "--require-hashes" in install and "--no-deps" in install and "requirements.lock" in install
    comfy = next(line for line in lines if "comfy --skip-prompt" in line)
    assert "--fast-deps" not in comfy and spec.comfyui_commit in comfy
    assert unpinned(layers) == []
    assert spec.lock.pins["comfy-cli"] == spec.comfy_cli and spec.lock.header.comfyui_commit == spec.comfyui_commit
    assert not spec.lock.problems and len(spec.lock.pins) > 50  # ComfyUI's whole tree, not a stub


def test_the_image_before_issue_13_fails_the_audit():
    """comfy-cli 1.5.3 from uv:latest, ComfyUI resolving its own requirements and torch (--fast-deps), a
    Registry node installed with its dependencies, packages without versions."""
    old = (
        modal.Image.debian_slim(python_version="3.11")
        .apt_install("git", "libgl1")
        .uv_pip_install("comfy-cli==1.5.3")
        .run_commands("comfy --skip-prompt install --fast-deps --nvidia --version 0.3.75")
        .run_commands("comfy node install --fast-deps comfyui-videohelpersuite@1.7.4")
        .run_commands("git clone https://github.com/o/Node /root/comfy/ComfyUI/custom_nodes/Node")
        .pip_install("httpx>=0.27", "pydantic")
    )
    problems = unpinned(render(old, "2025.06"))
    text = "\n".join(problems)
    assert "Debian packages without a version ['git', 'libgl1']" in text
    assert "uv:latest" in text
    assert "resolves dependencies at build time" in text  # --fast-deps and comfy node install
    assert "installs ComfyUI with its own resolution" in text
    assert "clones https://github.com/o/Node without checking out a commit" in text
    assert "installs unpinned ['httpx>=0.27', 'pydantic']" in text
    with pytest.raises(ConfigError, match="comfy-cli #340"):
        data = _spec_data()
        data["comfyui"]["comfy_cli"] = "1.5.3"
        ImageSpec.from_dict(data)


def test_a_lock_installed_without_hash_checking_is_unpinned(tmp_path):
    lock = tmp_path / "r.lock"
    lock.write_text("httpx==0.28.1\n")
    image = modal.Image.debian_slim(python_version="3.11.12").uv_pip_install(requirements=[str(lock)],
                                                                             uv_version="0.9.5")
    assert any("without --require-hashes" in p for p in unpinned(render(image, "2025.06")))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["comfyui"].update(commit="b" * 40), "run `gpubridge lock` again"),
        (lambda d: d["comfyui"].update(version="0.3.75"), "the pin is 0.3.75"),
        (lambda d: d["comfyui"].update(comfy_cli="1.6.0"), "comfy-cli 1.5.4, the pin is 1.6.0"),
        (lambda d: d["image"].update(python="3.12.10"), "the image has 3.12.10"),
        (lambda d: d["image"].update(python="3.11"), r"\[image\] python"),
        (lambda d: d["image"].update(apt=["git"]), "'git' is not pinned"),
        (lambda d: d["comfyui"].update(manager=True), "manager must be false"),
        (lambda d: d.setdefault("custom_nodes", []).append({"registry": "x", "version": "1.0"}), "Registry"),
        (lambda d: d.setdefault("custom_nodes", []).append({"git": "https://g/o/r", "commit": "main"}), "40-hex"),
    ],
)
def test_pins_that_do_not_fit_are_refused(edit, message):
    data = _spec_data()
    edit(data)
    with pytest.raises(ConfigError, match=message):
        ImageSpec.from_dict(data)


def test_custom_nodes_are_cloned_at_their_commit():
    data = _spec_data()
    data["custom_nodes"] = [{"git": "https://github.com/org/Some-Node.git", "commit": "c" * 40}]
    spec = ImageSpec.from_dict(data)
    layers = render(build_image(AppConfig(), spec), spec.builder)
    clone = next(line for layer in layers for line in layer if "git clone" in line)
    assert "/custom_nodes/Some-Node" in clone and f"checkout --detach {'c' * 40}" in clone
    assert unpinned(layers) == []


def test_parse_lock_names_loose_lines():
    head = "# gpubridge-lock: comfyui=0.3.64 commit=" + "a" * 40 + " python=3.11 platform=x86_64-manylinux_2_28\n"
    lock = parse_lock(head + "torch==2.8.0 \\\n    --hash=sha256:00\nnumpy>=1.25\nav==14.0\n--index-url https://x\n")
    assert lock.pins == {"torch": "2.8.0", "av": "14.0"}
    assert any("numpy>=1.25" in p for p in lock.problems) and any("av==14.0 has no hash" in p for p in lock.problems)
    assert any("option line" in p for p in lock.problems)
    with pytest.raises(ConfigError, match="gpubridge-lock"):
        parse_lock("torch==2.8.0\n")


def _wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A minimal pure-Python wheel, enough for uv to resolve and hash."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{dist}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                             + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()
    ) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name_, data in files.items():
            zf.writestr(name_, data)
        zf.writestr(f"{dist}/RECORD", record)
    return path


def test_gpubridge_lock_makes_a_hashed_lock_from_a_comfyui_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "tinydep", "2.0")
    tiny = _wheel(wheels, "tinycomfy", "1.0", ["tinydep>=1"])
    _wheel(wheels, "tinyextra", "3.1")
    repo = tmp_path / "ComfyUI"
    repo.mkdir()
    (repo / "requirements.txt").write_text("tinycomfy\n")
    (repo / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    extra = tmp_path / "requirements.in"
    extra.write_text("tinyextra==3.1\n")
    out = tmp_path / "requirements.lock"
    result = CliRunner().invoke(app, ["lock", "--comfyui", str(repo), "-r", str(extra), "-o", str(out),
                                      "--no-index", "--find-links", str(wheels)])
    assert result.exit_code == 0, result.output
    lock = parse_lock(out.read_text())
    assert lock.header.comfyui_commit == commit and lock.header.comfyui_version == "9.9.9"
    assert lock.pins == {"tinycomfy": "1.0", "tinydep": "2.0", "tinyextra": "3.1"} and not lock.problems
    assert f"sha256:{hashlib.sha256(tiny.read_bytes()).hexdigest()}" in out.read_text()
    assert str(tmp_path) not in out.read_text()  # no machine paths in a committed file

    (repo / "requirements.txt").write_text("tinycomfy==7.0\n")  # unsatisfiable: a clear error, exit 2
    subprocess.run([*git, "commit", "-qam", "d"], check=True)
    result = CliRunner().invoke(app, ["lock", "--comfyui", str(repo), "-o", str(out), "--no-index",
                                      "--find-links", str(wheels)])
    assert result.exit_code == 2 and "could not resolve" in result.output
