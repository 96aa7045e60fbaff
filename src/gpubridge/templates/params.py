"""A template's parameters: what each accepts, its JSON Schema, and how a value becomes workflow inputs.

A parameter is declared in the manifest as ``[params.NAME]`` with a ``type``:

=========  ===========================================================================================
string     text; ``max_length`` (default 20,000)
int        an integer within ``min``/``max``; ``default = "random"`` draws one per job (a seed)
float      a finite number within ``min``/``max``
bool       true or false
enum       one of ``choices`` (strings or numbers)
image      an input file (bytes, a path on the caller's side, base64, a data URI or an http(s) URL);
           its bound inputs (a LoadImage's ``image``) get the uploaded file's name
lora       a LoRA file name (one of ``choices`` when given) and a ``strength`` within ``min``/``max``;
           bound to a LoRA loader node (``bind = "NODE"``), which gets ``lora_name`` and strength(s)
=========  ===========================================================================================

``bind`` is ``"NODE.input"`` (NODE: a node id or title) or a list of them; a lora binds to ``"NODE"``.
Values are checked strictly (an int is not a bool, a float is not an int): a value from a command line is
parsed with :meth:`Param.parse_text` first.
"""

from __future__ import annotations

import math
import mimetypes
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..models import InputFile, WireInput

__all__ = ["LORA_INPUTS", "PARAM_TYPES", "RANDOM", "Bad", "Param", "ImageValue", "LoraValue"]

PARAM_TYPES = ("string", "int", "float", "bool", "enum", "image", "lora")
RANDOM = "random"
"""``default = "random"`` on an int parameter: a fresh value per job, drawn within its bounds."""
LORA_INPUTS = ("lora_name", "strength_model", "strength_clip")
SEED_MAX = 2**64 - 1  # ComfyUI's seeds are 64-bit unsigned
_MAX_STRING = 20_000


class Bad(ValueError):
    """A value a parameter refuses; the message says what it expected."""


@dataclass(frozen=True)
class ImageValue:
    """An ``image`` parameter's value once checked: the file and the name it is uploaded under."""

    file: InputFile
    name: str


@dataclass(frozen=True)
class LoraValue:
    name: str
    strength: float


@dataclass(frozen=True)
class Param:
    """One declared parameter (see the module docstring)."""

    name: str
    type: str
    bind: tuple[str, ...]
    default: Any = None
    required: bool = False
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    max_length: int | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- checking one value

    def check(self, value: Any, *, remote: bool = False, rng: random.Random | None = None) -> Any:
        """The value this parameter uses for ``value``, or :class:`Bad`. ``remote``: the value came over a
        network API, so a string is base64, a data URI or a URL, never a path on the server."""
        kind = self.type
        if kind == "int" and value == RANDOM and self.default == RANDOM:
            value = self.draw(rng)
        if kind == "string":
            if not isinstance(value, str):
                raise Bad(f"expected a string, got {_kind(value)}")
            limit = self.max_length or _MAX_STRING
            if len(value) > limit:
                raise Bad(f"longer than {limit} characters ({len(value)})")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise Bad(f"expected an integer, got {_kind(value)}")
            self._within(value)
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Bad(f"expected a number, got {_kind(value)}")
            if not math.isfinite(value):
                raise Bad("expected a finite number")
            self._within(value)
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise Bad(f"expected true or false, got {_kind(value)}")
            return value
        if kind == "enum":
            if isinstance(value, bool) or value not in (self.choices or ()):
                raise Bad(f"expected one of {', '.join(map(repr, self.choices or ()))}, got {value!r}")
            return value
        if kind == "lora":
            return self._lora(value)
        if kind == "image":
            return self._image(value, remote=remote)
        raise Bad(f"unknown parameter type {kind!r}")  # the manifest loader refuses these first

    def draw(self, rng: random.Random | None = None) -> int:
        lo = int(self.min) if self.min is not None else 0
        hi = int(self.max) if self.max is not None else SEED_MAX
        return (rng or random).randint(lo, hi)

    def _within(self, value: float) -> None:
        if self.min is not None and value < self.min:
            raise Bad(f"{value!r} is below the minimum {_num(self.min)}")
        if self.max is not None and value > self.max:
            raise Bad(f"{value!r} is above the maximum {_num(self.max)}")

    def _lora(self, value: Any) -> LoraValue:
        strength = self.extra.get("strength", 1.0)
        if isinstance(value, Mapping):
            unknown = set(value) - {"name", "strength"}
            if unknown:
                raise Bad(f"a lora is {{name, strength}}; unknown key(s) {', '.join(sorted(map(str, unknown)))}")
            name, strength = value.get("name"), value.get("strength", strength)
        else:
            name = value
        if not isinstance(name, str) or not name:
            raise Bad(f"expected a LoRA file name (or {{name, strength}}), got {_kind(name)}")
        if self.choices is not None and name not in self.choices:
            raise Bad(f"expected one of {', '.join(map(repr, self.choices))}, got {name!r}")
        if "/" in name.replace("\\", "/") and ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise Bad(f"{name!r} is not a file name under ComfyUI's loras folder")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise Bad(f"strength must be a finite number, got {_kind(strength)}")
        self._within(strength)
        return LoraValue(name=name, strength=float(strength))

    def _image(self, value: Any, *, remote: bool) -> ImageValue:
        try:
            if remote:
                if isinstance(value, str):
                    s = value.strip()
                    wire = WireInput(url=s) if s.lower().startswith(("http://", "https://")) else WireInput(data=s)
                elif isinstance(value, Mapping):
                    wire = WireInput.model_validate(value)
                else:
                    raise Bad(f"expected base64, a data URI, an http(s) URL or {{data|url}}, got {_kind(value)}")
                file = wire.to_input()
            else:
                file = InputFile.coerce(value)
        except Bad:
            raise
        except Exception as exc:  # pydantic's ValidationError, WorkflowInputError: the value is unusable
            text = str(exc).splitlines()
            raise Bad(f"not a usable image: {text[-1].strip() if text else exc}") from None
        return ImageValue(file=file, name=f"{self.name}{self._suffix(file, value)}")

    def _suffix(self, file: InputFile, value: Any) -> str:
        if file.mime_type:
            ext = mimetypes.guess_extension(file.mime_type)
            if ext:
                return ".jpg" if ext in (".jpe", ".jpeg") else ext
        source = file.url or (str(value) if isinstance(value, Path) else "")
        suffix = PurePosixPath(source.split("?", 1)[0]).suffix.lower()
        return suffix if 1 < len(suffix) <= 6 and suffix[1:].isalnum() else ".png"

    # -- the command line

    def parse_text(self, text: str) -> Any:
        """A command-line value (``--param k=v``) as this parameter's type: ``7``, ``0.5``, ``true``,
        ``name.safetensors:0.8`` for a lora, a path or URL for an image."""
        kind = self.type
        try:
            if kind == "int":
                return RANDOM if text == RANDOM and self.default == RANDOM else int(text, 0)
            if kind == "float":
                return float(text)
        except ValueError:
            raise Bad(f"expected {'an integer' if kind == 'int' else 'a number'}, got {text!r}") from None
        if kind == "bool":
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise Bad(f"expected true or false, got {text!r}")
        if kind == "enum":
            for choice in self.choices or ():
                if str(choice) == text:
                    return choice
            return text
        if kind == "lora":
            name, sep, strength = text.rpartition(":")
            if sep and name:
                try:
                    return {"name": name, "strength": float(strength)}
                except ValueError:
                    pass
            return text
        if kind == "image" and not text.lower().startswith(("http://", "https://", "data:")):
            return Path(text)
        return text

    # -- describing

    def json_schema(self) -> dict[str, Any]:
        s: dict[str, Any]
        kind = self.type
        if kind == "string":
            s = {"type": "string", "maxLength": self.max_length or _MAX_STRING}
        elif kind in ("int", "float"):
            s = {"type": "integer" if kind == "int" else "number"}
            if self.min is not None:
                s["minimum"] = self.min
            if self.max is not None:
                s["maximum"] = self.max
            if kind == "int" and self.default == RANDOM:
                s = {"anyOf": [s, {"const": RANDOM}]}
        elif kind == "bool":
            s = {"type": "boolean"}
        elif kind == "enum":
            s = {"enum": list(self.choices or ())}
        elif kind == "image":
            s = {"anyOf": [
                {"type": "string", "description": "base64, a data URI, or an http(s) URL"},
                {"type": "object", "properties": {"data": {"type": "string"}, "url": {"type": "string"},
                                                  "mime_type": {"type": "string"}},
                 "additionalProperties": False},
            ]}
        else:  # lora
            name: dict[str, Any] = {"type": "string", "minLength": 1}
            if self.choices is not None:
                name = {"enum": list(self.choices)}
            strength: dict[str, Any] = {"type": "number"}
            if self.min is not None:
                strength["minimum"] = self.min
            if self.max is not None:
                strength["maximum"] = self.max
            s = {"anyOf": [name, {"type": "object", "properties": {"name": name, "strength": strength},
                                  "required": ["name"], "additionalProperties": False}]}
        if self.description:
            s["description"] = self.description
        if not self.required and self.type != "image" and self.default is not None:
            s["default"] = self.default
        s["x-gpubridge-type"] = kind
        return s

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type, "bind": list(self.bind)}
        if self.required:
            d["required"] = True
        elif self.default is not None:
            d["default"] = self.default
        for key in ("min", "max", "max_length"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.description:
            d["description"] = self.description
        return d


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value!r})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
