"""One template: an API-format workflow, its manifest, its version, and rendering parameters into a job.

The manifest is TOML (``NAME.toml``) or JSON (``NAME.template.json``) beside the workflow::

    description = "FLUX.1 [schnell] text to image"
    workflow = "flux_schnell_t2i.json"        # default: NAME.json beside the manifest
    models = ["flux1-schnell.safetensors"]    # names from the model manifest (models.toml)

    [params.prompt]
    type = "string"
    bind = "Prompt.text"                      # NODE.input, NODE a node id or _meta.title
    default = "a red fox"
    description = "What to draw"

    [params.seed]
    type = "int"
    bind = "KSampler.seed"
    default = "random"
    min = 0

    [[outputs]]
    node = "Save"
    kind = "image"

The version is a content hash of the workflow and the manifest: change either, and jobs (and shadow
records) carry a new version.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ParamInvalid, WorkflowError
from ..models import InputFile, Workflow
from .params import LORA_INPUTS, PARAM_TYPES, RANDOM, Bad, ImageValue, LoraValue, Param

__all__ = ["NAME_PATTERN", "Output", "Rendered", "Template"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
OUTPUT_KINDS = ("image", "video", "audio", "text", "mask", "latent", "3d", "any")
_PARAM_KEYS = {"type", "bind", "default", "min", "max", "choices", "max_length", "description", "strength"}
_TOP_KEYS = {"description", "workflow", "models", "params", "outputs", "tags"}


@dataclass(frozen=True)
class Output:
    node: str
    kind: str = "image"
    description: str = ""


@dataclass(frozen=True)
class Rendered:
    """A template filled in: the workflow to run, the input files it uses, and the values used."""

    workflow: Workflow
    inputs: dict[str, InputFile]
    params: dict[str, Any]


@dataclass
class Template:
    """A named, versioned workflow with typed parameters. Build with :meth:`load` or :meth:`from_parts`."""

    name: str
    workflow: Workflow
    params: dict[str, Param]
    description: str = ""
    models: tuple[str, ...] = ()
    outputs: tuple[Output, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    version: str = ""
    path: Path | None = None

    # -- loading

    @classmethod
    def load(cls, manifest_path: str | Path) -> Template:
        path = Path(manifest_path)
        name = path.name.removesuffix(".template.json").removesuffix(".toml")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read template manifest {path}: {exc}") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"Template manifest {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"Template manifest {path} must be a table/object")
        wf_name = data.get("workflow", f"{name}.json")
        if not isinstance(wf_name, str) or not wf_name:
            raise ConfigError(f"{path}: 'workflow' must be a file name beside the manifest")
        wf_path = path.parent / wf_name
        try:
            workflow = Workflow.load(wf_path)
        except WorkflowError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_parts(name, workflow, data, path=path)

    @classmethod
    def from_parts(
        cls, name: str, workflow: Workflow | Mapping[str, Any], manifest: Mapping[str, Any], *,
        path: Path | None = None,
    ) -> Template:
        """A template from a workflow and a manifest mapping; :class:`ConfigError` listing every problem."""
        where = str(path) if path else f"template {name!r}"
        if not NAME_PATTERN.match(name):
            raise ConfigError(f"{where}: template name {name!r} must be letters, digits, '_', '-', '.'")
        wf = workflow if isinstance(workflow, Workflow) else Workflow.load(workflow)
        problems: list[str] = []
        unknown = set(manifest) - _TOP_KEYS
        if unknown:
            problems.append(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_TOP_KEYS))})")
        params: dict[str, Param] = {}
        raw_params = manifest.get("params") or {}
        if not isinstance(raw_params, Mapping):
            problems.append("'params' must be a table of [params.NAME] tables")
            raw_params = {}
        for pname, spec in raw_params.items():
            try:
                params[pname] = _param(pname, spec)
            except Bad as exc:
                problems.append(f"parameter {pname!r}: {exc}")
        models = manifest.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            problems.append("'models' must be a list of model file names")
            models = []
        outputs: list[Output] = []
        for i, out in enumerate(manifest.get("outputs") or []):
            if not isinstance(out, Mapping) or not isinstance(out.get("node"), (str, int)):
                problems.append(f"outputs[{i}] needs a 'node' (an id or a title)")
                continue
            kind = out.get("kind", "image")
            if kind not in OUTPUT_KINDS:
                problems.append(f"outputs[{i}]: kind {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
            outputs.append(Output(node=str(out["node"]), kind=str(kind), description=str(out.get("description", ""))))
        tags = manifest.get("tags") or {}
        if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
            problems.append("'tags' must be a table of strings")
            tags = {}
        description = manifest.get("description", "")
        if not isinstance(description, str):
            problems.append("'description' must be a string")
            description = ""
        canonical = json.dumps({"workflow": wf.root, "manifest": manifest}, sort_keys=True, separators=(",", ":"),
                               default=str)
        tpl = cls(
            name=name, workflow=wf, params=params, description=description, models=tuple(models),
            outputs=tuple(outputs), tags={str(k): v for k, v in tags.items()},
            version=hashlib.sha256(canonical.encode()).hexdigest()[:12], path=path,
        )
        problems += tpl.problems()
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        return tpl

    def problems(self, *, known_models: set[str] | None = None) -> list[str]:
        """What is wrong with this template: bindings that do not resolve, defaults out of bounds, outputs
        naming no node, and (given ``known_models``) models the model manifest does not declare."""
        out: list[str] = []
        for p in self.params.values():
            for target in p.bind:
                problem = self._binding_problem(p, target)
                if problem:
                    out.append(f"parameter {p.name!r}: {problem}")
            if not p.required and p.type != "image" and p.default != RANDOM:
                try:
                    p.check(p.default)
                except Bad as exc:
                    out.append(f"parameter {p.name!r}: default {p.default!r}: {exc}")
        for o in self.outputs:
            try:
                self.workflow.find_node(o.node)
            except WorkflowError as exc:
                out.append(f"output {o.node!r}: {exc}")
        if known_models is not None:
            missing = [m for m in self.models if m not in known_models]
            if missing:
                out.append(f"model(s) {', '.join(map(repr, missing))} not in the model manifest")
        return out

    def _binding_problem(self, p: Param, target: str) -> str | None:
        node_ref, _, input_name = target.rpartition(".") if p.type != "lora" else (target, "", "")
        if p.type != "lora" and not node_ref:
            return f"bind {target!r} must be NODE.input"
        try:
            node_id = self.workflow.find_node(node_ref)
        except WorkflowError as exc:
            return f"bind {target!r}: {exc}"
        inputs = self.workflow[node_id].get("inputs") or {}
        names = ("lora_name", "strength_model") if p.type == "lora" else (input_name,)
        for n in names:
            if n not in inputs:
                return f"bind {target!r}: node {node_id} ({self.workflow.class_type(node_id)}) has no input {n!r}"
            if isinstance(inputs[n], list):
                return f"bind {target!r}: input {n!r} of node {node_id} is a link, not a value"
        return None

    # -- describing

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of this template's ``params`` object."""
        return {
            "title": f"{self.name} parameters",
            "type": "object",
            "properties": {name: p.json_schema() for name, p in self.params.items()},
            "required": [name for name, p in self.params.items() if p.required],
            "additionalProperties": False,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "params": [p.describe() for p in self.params.values()],
            "models": list(self.models),
            "outputs": [{"node": o.node, "kind": o.kind, **({"description": o.description} if o.description else {})}
                        for o in self.outputs],
            "tags": dict(self.tags),
            "schema": self.json_schema(),
        }

    # -- rendering

    def render(
        self, params: Mapping[str, Any] | None = None, *, remote: bool = False, rng: random.Random | None = None
    ) -> Rendered:
        """The workflow with ``params`` bound, or :class:`~gpubridge.errors.ParamInvalid` naming every bad
        parameter (nothing is sent anywhere before this passes)."""
        given = dict(params or {})
        bad: dict[str, str] = {}
        for name in given:
            if name not in self.params:
                import difflib

                hint = difflib.get_close_matches(str(name), list(self.params), n=1)
                known = ", ".join(self.params) or "none"
                bad[str(name)] = (f"unknown parameter (did you mean {hint[0]!r}?)" if hint
                                  else f"unknown parameter (this template has: {known})")
        values: dict[str, Any] = {}
        for name, p in self.params.items():
            if name in given:
                value = given[name]
            elif p.required:
                bad[name] = "required"
                continue
            elif p.type == "image" or p.default is None:
                continue  # an image left out keeps the workflow's own file name
            else:
                value = p.default
            try:
                values[name] = p.check(value, remote=remote, rng=rng)
            except Bad as exc:
                bad[name] = str(exc)
        if bad:
            raise ParamInvalid(self.name, bad)
        wf = self.workflow.copy()
        inputs: dict[str, InputFile] = {}
        used: dict[str, Any] = {}
        for name, value in values.items():
            p = self.params[name]
            if isinstance(value, ImageValue):
                inputs[value.name] = value.file
                for target in p.bind:
                    wf.set(target, value.name)
                used[name] = value.name
            elif isinstance(value, LoraValue):
                for target in p.bind:
                    node = wf[wf.find_node(target)]["inputs"]
                    node["lora_name"] = value.name
                    node["strength_model"] = value.strength
                    if "strength_clip" in node and not isinstance(node["strength_clip"], list):
                        node["strength_clip"] = value.strength
                used[name] = {"name": value.name, "strength": value.strength}
            else:
                for target in p.bind:
                    wf.set(target, value)
                used[name] = value
        return Rendered(workflow=wf, inputs=inputs, params=used)


def _param(name: str, spec: Any) -> Param:
    if not NAME_PATTERN.match(name) or "." in name:
        raise Bad("a parameter name is letters, digits, '_' and '-'")
    if not isinstance(spec, Mapping):
        raise Bad("must be a table with type and bind")
    unknown = set(spec) - _PARAM_KEYS
    if unknown:
        raise Bad(f"unknown key(s) {', '.join(sorted(unknown))}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise Bad(f"type {kind!r} is not one of {', '.join(PARAM_TYPES)}")
    bind = spec.get("bind")
    binds = (bind,) if isinstance(bind, str) else tuple(bind) if isinstance(bind, list) else ()
    if not binds or not all(isinstance(b, str) and b for b in binds):
        raise Bad("needs 'bind': \"NODE.input\" or a list of them (a lora binds to \"NODE\")")
    for key in ("min", "max", "strength"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise Bad(f"{key!r} must be a number")
    if spec.get("min") is not None and spec.get("max") is not None and spec["min"] > spec["max"]:
        raise Bad("min is above max")
    choices = spec.get("choices")
    if kind == "enum" and (not isinstance(choices, list) or not choices):
        raise Bad("an enum needs a non-empty list of 'choices'")
    if choices is not None and not isinstance(choices, list):
        raise Bad("'choices' must be a list")
    if kind not in ("enum", "lora") and choices is not None:
        raise Bad("'choices' is for enum and lora parameters")
    if "default" in spec and spec["default"] == RANDOM and kind != "int":
        raise Bad('default = "random" is for int parameters')
    max_length = spec.get("max_length")
    if max_length is not None and (kind != "string" or not isinstance(max_length, int) or max_length < 1):
        raise Bad("'max_length' is a positive integer, for string parameters")
    if not isinstance(spec.get("description", ""), str):
        raise Bad("'description' must be a string")
    return Param(
        name=name, type=kind, bind=binds, default=spec.get("default"), required="default" not in spec, min=spec.get("min"), max=spec.get("max"),
        choices=tuple(choices) if choices is not None else None, max_length=max_length,
        description=spec.get("description", ""),
        extra={"strength": spec["strength"]} if "strength" in spec else {},
    )
