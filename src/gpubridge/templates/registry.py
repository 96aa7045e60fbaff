"""The template registry: a folder of templates, loaded and checked at start.

Every ``NAME.toml`` (or ``NAME.template.json``) in the folder is a template's manifest, its workflow beside
it. :meth:`TemplateRegistry.load` refuses the whole folder (:class:`~gpubridge.errors.ConfigError`, naming
each file and problem) when a binding does not resolve, a default lies out of bounds, or a declared model
is not in the model manifest, so a bad template fails a deploy, not a job.

The folder is ``$GPUBRIDGE_TEMPLATES`` (or ``templates`` in the config file), else ``./workflows``.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TemplateNotFound
from ..manifest import Manifest
from ..models import JobRequest, install_template_renderer
from .template import Rendered, Template

__all__ = ["DEFAULT_DIR", "TEMPLATES_ENV", "TemplateRegistry", "default_registry", "manifest_files"]

TEMPLATES_ENV = "GPUBRIDGE_TEMPLATES"
DEFAULT_DIR = Path("workflows")


def manifest_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.toml"), *folder.glob("*.template.json")])


class TemplateRegistry(Mapping[str, Template]):
    """Templates by name. ``registry.request("flux_t2i", {"prompt": "..."})`` is a ready
    :class:`~gpubridge.models.JobRequest`; ``registry.render`` gives the parts."""

    def __init__(self, templates: Mapping[str, Template] | None = None, *, folder: Path | None = None):
        self._templates = dict(templates or {})
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path, *, models: Manifest | str | Path | None = None) -> TemplateRegistry:
        """Load every template in ``folder``; ``models``: the model manifest the declared models must be in
        (a path, or a loaded :class:`~gpubridge.manifest.Manifest`)."""
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"Template folder {root} does not exist (set {TEMPLATES_ENV} or 'templates')")
        known: set[str] | None = None
        if models is not None:
            manifest = models if isinstance(models, Manifest) else Manifest.load(models)
            known = {entry.name for entry in manifest}
        templates: dict[str, Template] = {}
        problems: list[str] = []
        for path in manifest_files(root):
            try:
                tpl = Template.load(path)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            if tpl.name in templates:
                problems.append(f"{path}: a second template named {tpl.name!r}")
                continue
            extra = tpl.problems(known_models=known) if known is not None else []
            if extra:
                problems.append(f"{path}: " + "; ".join(extra))
                continue
            templates[tpl.name] = tpl
        if problems:
            raise ConfigError("Invalid templates: " + " | ".join(problems))
        return cls(templates, folder=root)

    def __getitem__(self, name: str) -> Template:
        try:
            return self._templates[name]
        except KeyError:
            import difflib

            hint = difflib.get_close_matches(name, list(self._templates), n=1)
            known = ", ".join(sorted(self._templates)) or "none"
            more = f"did you mean {hint[0]!r}?" if hint else f"known: {known}"
            raise TemplateNotFound(f"No template {name!r} ({more})", template=name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._templates)

    def __len__(self) -> int:
        return len(self._templates)

    def __repr__(self) -> str:
        return f"TemplateRegistry({sorted(self._templates)}, folder={str(self.folder)!r})"

    def render(
        self, name: str, params: Mapping[str, Any] | None = None, *, remote: bool = False,
        rng: random.Random | None = None,
    ) -> Rendered:
        return self[name].render(params, remote=remote, rng=rng)

    def request(self, name: str, params: Mapping[str, Any] | None = None, **fields: Any) -> JobRequest:
        """A :class:`JobRequest` for template ``name`` with ``params`` (other fields: timeout, tags, ...)."""
        return JobRequest(**request_fields(self, name, params or {}, fields))

    def request_fields(self, name: str, params: Mapping[str, Any], fields: Mapping[str, Any], *,
                       remote: bool = False) -> dict[str, Any]:
        """See :func:`request_fields`."""
        return request_fields(self, name, params, fields, remote=remote)


def request_fields(
    registry: TemplateRegistry, name: str, params: Mapping[str, Any], fields: Mapping[str, Any],
    *, remote: bool = False,
) -> dict[str, Any]:
    """The fields of a :class:`JobRequest` for template ``name``: ``fields`` (timeout, tags, inputs, ...)
    with the rendered workflow, the template's input files, its name, version and the values used."""
    tpl = registry[name]
    rendered = tpl.render(params, remote=remote)
    inputs = dict(fields.get("inputs") or {})
    clash = set(inputs) & set(rendered.inputs)
    if clash:
        from ..errors import ParamInvalid

        raise ParamInvalid(name, {n.split(".")[0]: f"its file name {n!r} is also in inputs" for n in clash})
    rest = {k: v for k, v in fields.items() if k not in ("inputs", "workflow", "template", "params",
                                                          "template_version")}
    return {
        **rest, "workflow": rendered.workflow, "inputs": {**inputs, **rendered.inputs}, "template": tpl.name,
        "template_version": tpl.version, "params": rendered.params,
    }


_default: tuple[tuple[str, float], TemplateRegistry] | None = None
_lock = threading.Lock()


def default_registry() -> TemplateRegistry:
    """The registry of ``$GPUBRIDGE_TEMPLATES`` (else the config file's ``templates``, else ./workflows),
    loaded once and again when the folder changes. Empty when the default folder does not exist."""
    global _default
    folder = os.environ.get(TEMPLATES_ENV)
    if not folder:
        from ..config import Settings

        try:
            folder = str(Settings.load().templates)
        except ConfigError:  # a broken config file is reported where it is used, not here
            folder = str(DEFAULT_DIR)
    root = Path(folder)
    if not root.is_dir():
        if os.environ.get(TEMPLATES_ENV):
            raise ConfigError(f"{TEMPLATES_ENV}={folder} is not a folder")
        return TemplateRegistry(folder=root)
    stamp = max((p.stat().st_mtime for p in [root, *root.iterdir()]), default=0.0)
    key = (str(root.resolve()), stamp)
    with _lock:
        if _default is None or _default[0] != key:
            _default = (key, TemplateRegistry.load(root))
        return _default[1]


install_template_renderer(lambda name, params, fields: request_fields(default_registry(), name, params, fields))
