"""Model manifests: which model files a ComfyUI deployment needs, where they come from, where they go.

A manifest is a TOML file with one ``[[models]]`` table per file::

    [[models]]
    name = "flux1-schnell.safetensors"          # file name in ComfyUI's folder
    folder = "diffusion_models"                 # ComfyUI models/ subfolder
    repo = "black-forest-labs/FLUX.1-schnell"   # a Hugging Face repo ...
    file = "flux1-schnell.safetensors"          # ... and the file in it
    revision = "main"                           # optional: branch, tag or commit
    sha256 = "..."                              # optional: checked after download

    [[models]]
    name = "4x-UltraSharp.pth"
    folder = "upscale_models"
    url = "https://example.com/4x-UltraSharp.pth"   # or a plain URL

Files live in a *store*: a directory (a Modal Volume, a RunPod network volume, a local disk) laid out as::

    hf/models--ORG--NAME/...        the Hugging Face hub cache (refs/, snapshots/, blobs/)
    files/FOLDER/NAME               files downloaded from URLs

:func:`download` fills a store, :func:`plan` compares a manifest with a store (a directory, a listing of
one, or nothing at all when offline), and :func:`link` symlinks the files into ComfyUI's ``models/``
folders. Nothing here needs network except :func:`download`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ConfigError

__all__ = [
    "COMFY_MODEL_FOLDERS",
    "FILES_DIR",
    "HF_DIR",
    "LinkReport",
    "Manifest",
    "ManifestError",
    "ModelEntry",
    "Plan",
    "PlanItem",
    "SyncReport",
    "download",
    "link",
    "plan",
    "present",
    "resolve",
    "sha256_file",
    "store_files",
]

log = logging.getLogger("gpubridge.manifest")

HF_DIR = "hf"
FILES_DIR = "files"

COMFY_MODEL_FOLDERS = frozenset(
    {
        "checkpoints",
        "loras",
        "vae",
        "vae_approx",
        "clip",
        "text_encoders",
        "unet",
        "diffusion_models",
        "clip_vision",
        "controlnet",
        "t2i_adapter",
        "upscale_models",
        "embeddings",
        "hypernetworks",
        "style_models",
        "gligen",
        "photomaker",
        "diffusers",
        "configs",
        "model_patches",
        "audio_encoders",
        "latent_upscale_models",
        "ipadapter",
        "instantid",
        "insightface",
        "sams",
        "ultralytics",
        "facerestore_models",
        "animatediff_models",
        "animatediff_motion_lora",
        "LLM",
    }
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KEYS = {"name", "folder", "repo", "file", "revision", "url", "sha256", "gated", "size", "description"}


class ManifestError(ConfigError):
    """The manifest cannot be read, or an entry in it is invalid."""


def _safe_relpath(value: str, what: str, where: str) -> PurePosixPath:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts or "\\" in value or value.strip() != value:
        raise ManifestError(f"{where}: {what} must be a relative path without '..', got {value!r}")
    return p


@dataclass(frozen=True)
class ModelEntry:
    """One model file: its source (a Hugging Face repo file or a URL) and its place in ComfyUI."""

    name: str
    folder: str
    repo: str | None = None
    file: str | None = None
    revision: str | None = None
    url: str | None = None
    sha256: str | None = None
    gated: bool = False
    size: int | None = None
    description: str | None = None

    @property
    def is_hf(self) -> bool:
        return self.repo is not None

    @property
    def target(self) -> PurePosixPath:
        """Where ComfyUI sees the file, relative to its ``models/`` folder."""
        return PurePosixPath(self.folder) / self.name

    @property
    def source(self) -> str:
        if self.repo is not None:
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf://{self.repo}/{self.file}{rev}"
        return str(self.url)

    def hf_repo_dir(self) -> PurePosixPath:
        assert self.repo is not None
        return PurePosixPath(HF_DIR) / ("models--" + self.repo.replace("/", "--"))

    def store_path(self, commit: str | None = None) -> PurePosixPath:
        """The file's path in a store. For a Hugging Face file, ``commit`` names the snapshot."""
        if self.repo is not None:
            rev = commit or (self.revision if self.revision and _COMMIT.match(self.revision) else None)
            if rev is None:
                raise ValueError(f"{self.name}: the snapshot path of {self.source} needs its commit")
            return self.hf_repo_dir() / "snapshots" / rev / str(self.file)
        return PurePosixPath(FILES_DIR) / self.folder / self.name


@dataclass
class Manifest:
    """A parsed, validated manifest. ``warnings`` lists things worth knowing that are not errors."""

    entries: list[ModelEntry]
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"Model manifest not found: {path}") from None
        except OSError as exc:
            raise ManifestError(f"Cannot read model manifest {path}: {exc.strerror or exc}") from None
        return cls.parse(text, path=path)

    @classmethod
    def parse(cls, text: str, *, path: Path | None = None) -> Manifest:
        where = str(path) if path else "manifest"
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(f"Cannot parse {where}: {exc}") from None
        return cls.from_dict(data, path=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: Path | None = None) -> Manifest:
        where = str(path) if path else "manifest"
        unknown_top = set(data) - {"models"}
        if unknown_top:
            raise ManifestError(
                f"{where}: unknown top-level keys {sorted(unknown_top)} (expected [[models]])"
            )
        raw = data.get("models", [])
        if not isinstance(raw, list):
            raise ManifestError(f"{where}: 'models' must be an array of tables ([[models]])")
        entries: list[ModelEntry] = []
        warnings: list[str] = []
        seen: dict[PurePosixPath, str] = {}
        for i, item in enumerate(raw, 1):
            entry, notes = _entry(item, f"{where} model #{i}")
            if entry.target in seen:
                raise ManifestError(
                    f"{where}: model #{i} ({entry.source}) and {seen[entry.target]} both go to {entry.target}"
                )
            seen[entry.target] = entry.source
            entries.append(entry)
            warnings.extend(notes)
        return cls(entries=entries, path=path, warnings=warnings)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def select(self, names: Iterable[str] | None) -> list[ModelEntry]:
        """The entries named (by ``name`` or ``folder/name``); all of them when ``names`` is None/empty."""
        wanted = list(names or [])
        if not wanted:
            return list(self.entries)
        out: list[ModelEntry] = []
        for name in wanted:
            match = [e for e in self.entries if name in (e.name, str(e.target))]
            if not match:
                known = ", ".join(e.name for e in self.entries) or "none"
                raise ManifestError(f"No model {name!r} in the manifest (known: {known})")
            out.extend(m for m in match if m not in out)
        return out


def _entry(item: Any, where: str) -> tuple[ModelEntry, list[str]]:
    if not isinstance(item, Mapping):
        raise ManifestError(f"{where}: expected a table")
    unknown = set(item) - _KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    for key in ("name", "folder", "repo", "file", "revision", "url", "sha256", "description"):
        if key in item and not isinstance(item[key], str):
            raise ManifestError(f"{where}: {key} must be a string")
    name, folder = item.get("name"), item.get("folder")
    if not name or not folder:
        raise ManifestError(f"{where}: 'name' and 'folder' are required")
    _safe_relpath(name, "name", where)
    _safe_relpath(folder, "folder", where)
    repo, url = item.get("repo"), item.get("url")
    if (repo is None) == (url is None):
        raise ManifestError(f"{where} ({name}): give exactly one source, 'repo' (+ 'file') or 'url'")
    notes: list[str] = []
    if repo is not None:
        if not _REPO.match(repo):
            raise ManifestError(f"{where} ({name}): repo must look like 'org/name', got {repo!r}")
        if not item.get("file"):
            raise ManifestError(
                f"{where} ({name}): a Hugging Face source needs 'file' (the path in the repo)"
            )
        _safe_relpath(item["file"], "file", where)
        if item.get("revision") is not None and not item["revision"]:
            raise ManifestError(f"{where} ({name}): revision must not be empty")
    else:
        if not url.startswith(("https://", "http://")):
            raise ManifestError(f"{where} ({name}): url must be http(s), got {url!r}")
        for key in ("file", "revision"):
            if key in item:
                raise ManifestError(f"{where} ({name}): '{key}' only applies to a Hugging Face 'repo' source")
        if url.startswith("http://"):
            notes.append(f"{name}: downloaded over plain http ({url})")
    sha = item.get("sha256")
    if sha is not None:
        sha = sha.lower()
        if not _SHA256.match(sha):
            raise ManifestError(f"{where} ({name}): sha256 must be 64 hex characters")
    gated = item.get("gated", False)
    if not isinstance(gated, bool):
        raise ManifestError(f"{where} ({name}): gated must be true or false")
    size = item.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ManifestError(f"{where} ({name}): size must be a byte count")
    top = PurePosixPath(folder).parts[0]
    if top not in COMFY_MODEL_FOLDERS:
        notes.append(
            f"{name}: folder {folder!r} is not a core ComfyUI model folder (fine if a custom node uses it)"
        )
    if sha is None:
        notes.append(f"{name}: no sha256, the download is not verified")
    return (
        ModelEntry(
            name=name,
            folder=folder,
            repo=repo,
            file=item.get("file"),
            revision=item.get("revision"),
            url=url,
            sha256=sha,
            gated=gated,
            size=size,
            description=item.get("description"),
        ),
        notes,
    )


# ------------------------------------------------------------------------------------------ store layout


def _hf_commit(entry: ModelEntry, root: Path) -> str | None:
    rev = entry.revision or "main"
    if _COMMIT.match(rev):
        return rev
    ref = root / entry.hf_repo_dir() / "refs" / rev
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT.match(commit) else None


def resolve(entry: ModelEntry, root: str | Path) -> Path | None:
    """The file of ``entry`` in the store at ``root``, or None when it is not there."""
    root = Path(root)
    if entry.is_hf:
        commit = _hf_commit(entry, root)
        if commit is None:
            return None
        path = root / entry.store_path(commit)
    else:
        path = root / entry.store_path()
    return path if path.is_file() else None


def store_files(entry: ModelEntry, root: str | Path) -> list[tuple[Path | bytes, str]]:
    """What to copy so another store holds ``entry`` as ``root`` does: ``(local path or bytes, relpath)``.

    For a Hugging Face file that is the snapshot file and the ref naming its commit. Raises
    FileNotFoundError when ``root`` does not hold the file.
    """
    root = Path(root)
    path = resolve(entry, root)
    if path is None:
        raise FileNotFoundError(f"{entry.name} is not in {root}")
    if not entry.is_hf:
        return [(path, str(entry.store_path()))]
    commit = _hf_commit(entry, root)
    assert commit is not None
    out: list[tuple[Path | bytes, str]] = [(path, str(entry.store_path(commit)))]
    rev = entry.revision or "main"
    if rev != commit:
        out.append((commit.encode(), str(entry.hf_repo_dir() / "refs" / rev)))
    return out


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlanItem:
    """What to do about one entry: ``present``, ``download``, or ``unknown`` (no store to compare with)."""

    entry: ModelEntry
    action: str
    path: str | None = None
    reason: str = ""


@dataclass
class Plan:
    items: list[PlanItem]
    store: str

    @property
    def to_download(self) -> list[ModelEntry]:
        return [i.entry for i in self.items if i.action != "present"]

    @property
    def present(self) -> list[ModelEntry]:
        return [i.entry for i in self.items if i.action == "present"]


def plan(
    manifest: Manifest | Sequence[ModelEntry],
    *,
    root: str | Path | None = None,
    listing: Iterable[str] | None = None,
    store: str | None = None,
) -> Plan:
    """Compare the manifest with a store: a directory (``root``), the file paths of one (``listing``,
    relative to the store root, e.g. a Volume's), or nothing (offline: every entry is ``unknown``)."""
    entries = list(manifest)
    items: list[PlanItem] = []
    if root is not None:
        root = Path(root)
        for e in entries:
            path = resolve(e, root)
            items.append(
                PlanItem(e, "present", str(path))
                if path
                else PlanItem(e, "download", reason=f"not in {root}")
            )
        return Plan(items, store or str(root))
    if listing is not None:
        files = {p.strip("/") for p in listing}
        for e in entries:
            found = _in_listing(e, files)
            items.append(
                PlanItem(e, "present", found) if found else PlanItem(e, "download", reason="not in the store")
            )
        return Plan(items, store or "listing")
    for e in entries:
        items.append(PlanItem(e, "unknown", reason="no store to compare with (offline)"))
    return Plan(items, store or "offline")


def _in_listing(entry: ModelEntry, files: set[str]) -> str | None:
    if not entry.is_hf:
        path = str(entry.store_path())
        return path if path in files else None
    rev = entry.revision or "main"
    if _COMMIT.match(rev):
        path = str(entry.store_path(rev))
        return path if path in files else None
    # A listing does not say which commit a branch points at: any snapshot with the file counts.
    prefix = f"{entry.hf_repo_dir()}/snapshots/"
    suffix = f"/{entry.file}"
    if f"{entry.hf_repo_dir()}/refs/{rev}" not in files:
        return None
    for f in sorted(files):
        if f.startswith(prefix) and f.endswith(suffix) and f[len(prefix) : -len(suffix)].count("/") == 0:
            return f
    return None


# ------------------------------------------------------------------------------------------- download


@dataclass
class SyncReport:
    """The outcome of a download or sync. ``ok`` is False when an entry failed (gated ones only warn)."""

    downloaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    gated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "downloaded": self.downloaded,
            "present": self.present,
            "gated": self.gated,
            "failed": self.failed,
            "warnings": self.warnings,
        }


HfDownload = Callable[..., str]


def sha256_file(path: str | Path, *, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(
    entries: Manifest | Iterable[ModelEntry],
    root: str | Path,
    *,
    token: str | None = None,
    force: bool = False,
    hf_download: HfDownload | None = None,
    timeout: float = 60.0,
) -> SyncReport:
    """Download the entries that ``root`` lacks into the store at ``root``.

    Hugging Face files go through ``huggingface_hub.hf_hub_download`` with the store's ``hf/`` folder as
    its cache (resumable; ``token`` defaults to ``$HF_TOKEN``). A gated or private model without access
    is reported in ``gated`` with a warning and skipped; other failures land in ``failed``. Files with a
    ``sha256`` are verified, and removed again when they do not match.
    """
    root = Path(root)
    token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
    report = SyncReport()
    for entry in entries:
        existing = resolve(entry, root)
        if existing is not None and not force:
            report.present.append(entry.name)
            continue
        try:
            path = (
                _download_hf(entry, root, token, force, hf_download)
                if entry.is_hf
                else _download_url(entry, root, timeout)
            )
        except _Gated as exc:
            report.gated.append(entry.name)
            report.warnings.append(str(exc))
            log.warning("%s", exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the others
            report.failed[entry.name] = f"{type(exc).__name__}: {exc}"
            log.error("downloading %s (%s) failed: %s", entry.name, entry.source, exc)
            continue
        if entry.sha256:
            actual = sha256_file(path)
            if actual != entry.sha256:
                _discard(path)
                report.failed[entry.name] = f"sha256 mismatch: expected {entry.sha256}, got {actual}"
                continue
        report.downloaded.append(entry.name)
    return report


class _Gated(Exception):
    pass


def _gated_message(entry: ModelEntry, token: str | None) -> str:
    base = f"Model {entry.name} comes from {entry.repo}, which is gated or private on Hugging Face"
    if token:
        return (
            f"{base}, and the token in use has no access: accept the licence at https://huggingface.co/"
            f"{entry.repo} with the account that owns the token. Skipped."
        )
    return (
        f"{base}, and no token is set: accept the licence at https://huggingface.co/{entry.repo}, then set "
        "HF_TOKEN (on Modal: the 'huggingface' Secret). Skipped."
    )


def _download_hf(
    entry: ModelEntry, root: Path, token: str | None, force: bool, hf_download: HfDownload | None
) -> Path:
    if hf_download is None:
        try:
            from huggingface_hub import hf_hub_download as hf_download
        except ImportError:
            raise ConfigError(
                "Downloading from Hugging Face needs huggingface_hub: pip install 'gpubridge[modal]'"
            ) from None
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # an injected downloader without huggingface_hub installed
        GatedRepoError = RepositoryNotFoundError = ()  # type: ignore[assignment,misc]
    try:
        path = hf_download(
            repo_id=entry.repo,
            filename=entry.file,
            revision=entry.revision,
            cache_dir=str(root / HF_DIR),
            token=token,
            force_download=force,
        )
    except GatedRepoError:  # type: ignore[misc]
        raise _Gated(_gated_message(entry, token)) from None
    except RepositoryNotFoundError:  # type: ignore[misc]
        if token is None or entry.gated:
            raise _Gated(_gated_message(entry, token)) from None
        raise
    return Path(path)


def _download_url(entry: ModelEntry, root: Path, timeout: float) -> Path:
    import httpx

    dest = root / entry.store_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with httpx.stream("GET", str(entry.url), follow_redirects=True, timeout=timeout) as resp:
        if resp.status_code in (401, 403):
            raise PermissionError(f"{entry.url} answered {resp.status_code}")
        resp.raise_for_status()
        with open(part, "wb") as fh:
            fh.writelines(resp.iter_bytes(1024 * 1024))
    os.replace(part, dest)
    return dest


def _discard(path: Path) -> None:
    real = path.resolve()
    for p in {path, real}:
        try:
            p.unlink()
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------- link


@dataclass
class LinkReport:
    linked: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def link(entries: Manifest | Iterable[ModelEntry], root: str | Path, models_dir: str | Path) -> LinkReport:
    """Symlink each entry's file in the store at ``root`` into ``models_dir/FOLDER/NAME`` (idempotent).

    A regular file already at the destination is kept; a stale link is replaced; an entry the store
    lacks is reported in ``missing`` and nothing is linked for it.
    """
    root, models_dir = Path(root), Path(models_dir)
    report = LinkReport()
    for entry in entries:
        src = resolve(entry, root)
        dst = models_dir / entry.target
        if src is None:
            report.missing.append(str(entry.target))
            continue
        if dst.is_symlink():
            if os.readlink(dst) == str(src):
                report.linked.append(str(entry.target))
                continue
            dst.unlink()
        elif dst.exists():
            report.kept.append(str(entry.target))
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
        report.linked.append(str(entry.target))
    return report


def present(entries: Manifest | Iterable[ModelEntry], models_dir: str | Path) -> tuple[list[str], list[str]]:
    """Which entries ComfyUI can see under ``models_dir`` (following links): ``(present, missing)``."""
    models_dir = Path(models_dir)
    have, lack = [], []
    for entry in entries:
        (have if (models_dir / entry.target).is_file() else lack).append(str(entry.target))
    return have, lack
