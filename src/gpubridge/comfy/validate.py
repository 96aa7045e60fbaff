"""Validate an API-format ComfyUI prompt against ``/object_info``, the way ComfyUI's server does.

This reproduces what ComfyUI 0.3.x does in ``POST /prompt`` before it queues anything, so that a broken
workflow fails on the client in microseconds (no upload, no GPU time) with exactly the error body the
server would have sent::

    result = validate_prompt(prompt, object_info, file_exists=lambda name: name in uploaded)
    if not result.ok:
        raise WorkflowInvalid(error=result.error, node_errors=result.node_errors)
    result.outputs        # the output node ids ComfyUI would execute
    result.node_errors    # may be non-empty even when ok: a partly valid prompt runs its valid outputs

What is reproduced (bodies, messages and ``details`` strings are ComfyUI's):

- ``invalid_prompt`` (unknown ``class_type``, a node without ``class_type`` or not an object),
  ``prompt_no_outputs``, ``prompt_outputs_failed_validation`` with per-input errors:
  ``required_input_missing``, ``bad_linked_input``, ``return_type_mismatch``, ``invalid_input_type``,
  ``value_smaller_than_min``, ``value_bigger_than_max``, ``value_not_in_list``,
  ``exception_during_validation`` / ``exception_during_inner_validation`` (a link to a missing node, a bad
  output slot, ...) and ``custom_validation_failed`` (the ``VALIDATE_INPUTS`` of the file loaders:
  LoadImage, LoadImageMask, LoadImageOutput, LoadLatent, LoadVideo; the file check is the injectable
  ``file_exists`` callback, skipped when it is ``None``).
- Partial validity: the prompt is accepted when at least one output validates; ``node_errors`` then lists
  the broken branches, each with ``dependent_outputs`` as ComfyUI computes them.
- Coercion of widget values: ``"16"``/``16.0`` to INT, numbers to FLOAT, anything to STRING/BOOLEAN, and
  ``{"__value__": ...}`` unwrapping. ComfyUI writes the converted values back into the queued prompt (they
  show up in ``/queue`` and ``/history``); this module is pure, so it reports them in
  :attr:`ValidationResult.coerced` instead (see :func:`apply_coercions`).
- Requests that make ComfyUI's handler raise (ComfyUI answers a plain-text HTTP 500: a prompt given as a
  string, a UI-format workflow, a node given as a number...) raise :class:`MalformedPrompt`.

Differences that cannot be reproduced: ComfyUI walks a node's inputs and the output nodes in Python
``set`` order, which changes from one server process to the next; here inputs are checked in their
declared order (required, then optional) and outputs in prompt order. Tracebacks in
``exception_during_*`` errors are this module's, not ComfyUI's.

The module is pure and I/O-free (``file_exists`` is the only way out) and caches nothing globally.
:class:`PromptValidator` keeps the per-class lookups it builds, for callers that validate many prompts
against the same ``object_info``; :func:`validate_prompt` is the one-shot form.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import WorkflowFormatError

__all__ = [
    "FileExists",
    "MalformedPrompt",
    "PromptValidator",
    "ValidationResult",
    "apply_coercions",
    "output_node_ids",
    "split_annotated_name",
    "validate_prompt",
]

FileExists = Callable[[str], bool]
"""``file_exists(name) -> bool``: does the (possibly annotated, ``"x.png [temp]"``) input file exist?"""

MAX_COMBO_LIST = 20  # ComfyUI does not echo combo lists longer than this in value_not_in_list errors


class MalformedPrompt(WorkflowFormatError):
    """The request is not an API-format prompt in a way that makes ComfyUI's ``/prompt`` handler raise.

    ComfyUI answers these with aiohttp's plain-text ``500 Internal Server Error``; there is no JSON error
    body to reproduce.
    """


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """The outcome of :func:`validate_prompt`.

    ``ok``: at least one output can run (ComfyUI answers 200 and queues the prompt).
    ``error``: ComfyUI's ``error`` object (``type``, ``message``, ``details``, ``extra_info``) when not ok.
    ``node_errors``: ComfyUI's ``node_errors``, possibly non-empty even when ok (partly valid prompt).
    ``outputs``: the output node ids that will execute (``outputs_to_execute``), in prompt order.
    ``coerced``: ``{node_id: {input_name: converted value}}`` for the widget values ComfyUI converts in
    place (``"16"`` to ``16`` for an INT input, ...). Apply them with :func:`apply_coercions`.
    """

    ok: bool
    error: dict[str, Any] | None
    node_errors: dict[str, Any]
    outputs: list[str]
    coerced: dict[Any, dict[str, Any]] = field(default_factory=dict)

    @property
    def status(self) -> int:
        """The HTTP status ComfyUI answers with: 200 or 400."""
        return 200 if self.ok else 400

    def error_body(self) -> dict[str, Any]:
        """ComfyUI's 400 body: ``{"error": {...}, "node_errors": {...}}``."""
        return {"error": self.error, "node_errors": self.node_errors}


def split_annotated_name(name: str) -> tuple[str, str | None]:
    """``"x.png [temp]"`` -> ``("x.png", "temp")``; a plain name gives ``(name, None)`` (the input folder).

    Like ComfyUI, the suffix is cut together with the one character before it (normally a space).
    """
    for folder in ("output", "input", "temp"):
        suffix = f"[{folder}]"
        if name.endswith(suffix):
            return name[: -(len(suffix) + 1)], folder
    return name, None


def apply_coercions(prompt: dict[Any, Any], result: ValidationResult) -> dict[Any, Any]:
    """Write ``result.coerced`` into ``prompt`` in place, as ComfyUI does before queueing; returns it."""
    for node_id, values in result.coerced.items():
        prompt[node_id]["inputs"].update(values)
    return prompt


def output_node_ids(prompt: Mapping[Any, Any], object_info: Mapping[str, Any]) -> list[str]:
    """The ids of the prompt's output nodes (``output_node`` classes), in prompt order; no validation."""
    found = []
    for node_id, node in prompt.items():
        if isinstance(node, Mapping):
            class_type = node.get("class_type")
            info = object_info.get(class_type) if isinstance(class_type, str) else None
            if isinstance(info, Mapping) and info.get("output_node") is True:
                found.append(node_id)
    return found


def validate_prompt(
    prompt: Any,
    object_info: Mapping[str, Any],
    *,
    file_exists: FileExists | None = None,
    partial_execution_targets: Iterable[str] | None = None,
) -> ValidationResult:
    """Validate ``prompt`` against ``object_info`` the way ComfyUI's ``POST /prompt`` does.

    ``file_exists(name)`` answers whether an input file named by a loader node (LoadImage's ``image``, ...)
    exists; ``None`` skips that check. ``partial_execution_targets`` restricts the outputs to run, like the
    request field of that name. Raises :class:`MalformedPrompt` where ComfyUI would answer HTTP 500.
    """
    return PromptValidator(object_info, file_exists=file_exists).validate(
        prompt, partial_execution_targets=partial_execution_targets
    )


# ------------------------------------------------------------------------------------------ internals

# Nodes whose Python class defines VALIDATE_INPUTS (or a V3 validate_inputs): the inputs it takes are
# exempt from the min/max/combo checks, and its verdict becomes custom_validation_failed.


def _check_image(file_exists: FileExists | None, image: Any) -> bool | str:
    split_annotated_name(image)  # ComfyUI parses the name first: a non-string raises here, as there
    if file_exists is not None and not file_exists(image):
        return f"Invalid image file: {image}"
    return True


def _check_latent(file_exists: FileExists | None, latent: Any) -> bool | str:
    split_annotated_name(latent)
    if file_exists is not None and not file_exists(latent):
        return f"Invalid latent file: {latent}"
    return True


def _check_video(file_exists: FileExists | None, file: Any) -> bool | str:
    split_annotated_name(file)
    if file_exists is not None and not file_exists(file):
        return f"Invalid video file: {file}"
    return True


_CUSTOM_VALIDATORS: dict[str, tuple[frozenset[str], Callable[..., bool | str]]] = {
    "LoadImage": (frozenset({"image"}), _check_image),
    "LoadImageMask": (frozenset({"image"}), _check_image),
    "LoadImageOutput": (frozenset({"image"}), _check_image),
    "LoadLatent": (frozenset({"latent"}), _check_latent),
    "LoadVideo": (frozenset({"file"}), _check_video),
}

# V3 nodes (comfy_api) describe themselves with all of these keys; their RETURN_TYPES is a list, not a
# tuple, which shows in the message of a bad output slot ("list index out of range").
_V3_KEYS = frozenset({"api_node", "deprecated", "experimental", "output_tooltips"})
_NO_CUSTOM: tuple[frozenset[str], None] = (frozenset(), None)


class _ClassSpec:
    __slots__ = ("inputs", "returns", "custom_params", "custom_fn")

    def __init__(self, info: Mapping[str, Any], class_type: str):
        declared = info.get("input") or {}
        inputs: list[tuple[str, str, Any, Any]] = []
        seen: set[str] = set()
        for category in ("required", "optional"):
            section = declared.get(category) or {}
            for name, decl in section.items():
                if name in seen:
                    continue
                seen.add(name)
                input_type = decl[0]
                extra = decl[1] if len(decl) > 1 else {}
                inputs.append((name, category, input_type, extra))
        self.inputs = inputs
        returns = info.get("output") or ()
        self.returns = list(returns) if _V3_KEYS <= info.keys() else tuple(returns)
        self.custom_params, self.custom_fn = _CUSTOM_VALIDATORS.get(class_type, _NO_CUSTOM)


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


def _types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's link type check: equal, ``*`` on either side, or overlapping ``"A,B"`` type lists."""
    if received == "*" or expected == "*" or received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    return any(t.strip() in got for t in expected.split(","))


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class _Run:
    __slots__ = ("prompt", "validated", "coerced")

    def __init__(self, prompt: Any):
        self.prompt = prompt
        self.validated: dict[Any, tuple[bool, list[dict[str, Any]], Any]] = {}
        self.coerced: dict[Any, dict[str, Any]] = {}


class PromptValidator:
    """Validates prompts against one ``object_info``; keeps what it derives per node class.

    Use one instance for many prompts against the same ``object_info`` (the lookups it builds per class
    are reused); it holds no other state. ``file_exists`` is the default for :meth:`validate`.
    """

    __slots__ = ("object_info", "file_exists", "_specs")

    def __init__(self, object_info: Mapping[str, Any], *, file_exists: FileExists | None = None):
        self.object_info = object_info
        self.file_exists = file_exists
        self._specs: dict[str, _ClassSpec] = {}

    def _spec(self, class_type: str) -> _ClassSpec:
        spec = self._specs.get(class_type)
        if spec is None:
            spec = self._specs[class_type] = _ClassSpec(self.object_info[class_type], class_type)
        return spec

    def validate(
        self,
        prompt: Any,
        *,
        partial_execution_targets: Iterable[str] | None = None,
        file_exists: FileExists | None = None,
    ) -> ValidationResult:
        """See :func:`validate_prompt`."""
        try:
            outputs = self._find_outputs(prompt, partial_execution_targets)
        except Exception as exc:  # where ComfyUI's handler raises and aiohttp answers 500
            raise MalformedPrompt(f"ComfyUI cannot read this prompt ({type(exc).__name__}: {exc})") from exc
        if isinstance(outputs, dict):  # an invalid_prompt / prompt_no_outputs error
            return ValidationResult(False, outputs, {}, [])

        run = _Run(prompt)
        check = file_exists if file_exists is not None else self.file_exists
        good: list[Any] = []
        failures: list[tuple[Any, list[dict[str, Any]]]] = []
        node_errors: dict[Any, dict[str, Any]] = {}
        for output_id in outputs:
            try:
                valid, reasons, _ = self._validate_node(output_id, run, check)
            except Exception as exc:
                valid = False
                reasons = [
                    {
                        "type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(exc),
                        "extra_info": {
                            "exception_type": _type_name(type(exc)),
                            "traceback": traceback.format_tb(exc.__traceback__),
                        },
                    }
                ]
                run.validated[output_id] = (False, reasons, output_id)
            if valid is True:
                good.append(output_id)
                continue
            failures.append((output_id, reasons))
            # ComfyUI lists every node that has failed so far against each failing output; nodes that are
            # invalid only because something upstream is (no reasons of their own) are left out.
            for node_id, (node_valid, node_reasons, _) in run.validated.items():
                if node_valid is not True and node_reasons:
                    entry = node_errors.get(node_id)
                    if entry is None:
                        entry = node_errors[node_id] = {
                            "errors": node_reasons,
                            "dependent_outputs": [],
                            "class_type": prompt[node_id]["class_type"],
                        }
                    entry["dependent_outputs"].append(output_id)

        if not good:
            details = "\n".join(
                f"{reason['message']}: {reason['details']}" for _, reasons in failures for reason in reasons
            )
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details,
                "extra_info": {},
            }
            return ValidationResult(False, error, node_errors, [], run.coerced)
        return ValidationResult(True, None, node_errors, good, run.coerced)

    # ---------------------------------------------------------------------------------------- passes

    def _find_outputs(self, prompt: Any, partial: Iterable[str] | None) -> list[Any] | dict[str, Any]:
        object_info = self.object_info
        outputs = []
        for node_id in prompt:
            node = prompt[node_id]
            if "class_type" not in node:
                return _prompt_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            class_type = node["class_type"]
            info = object_info.get(class_type)
            if info is None:
                return _prompt_error(
                    "invalid_prompt",
                    f"Cannot execute because node {class_type} does not exist.",
                    f"Node ID '#{node_id}'",
                )
            if info.get("output_node") is True and (partial is None or node_id in partial):
                outputs.append(node_id)
        if not outputs:
            return _prompt_error("prompt_no_outputs", "Prompt has no outputs", "")
        return outputs

    def _validate_node(
        self, node_id: Any, run: _Run, file_exists: FileExists | None
    ) -> tuple[bool, list[dict[str, Any]], Any]:
        done = run.validated.get(node_id)
        if done is not None:
            return done
        prompt = run.prompt
        inputs = prompt[node_id]["inputs"]
        spec = self._spec(prompt[node_id]["class_type"])
        custom_params = spec.custom_params
        errors: list[dict[str, Any]] = []
        valid = True
        changed: dict[str, Any] | None = None

        for name, category, input_type, extra in spec.inputs:
            if name not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": f"{name}",
                            "extra_info": {"input_name": name},
                        }
                    )
                continue

            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        {
                            "type": "bad_linked_input",
                            "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            "details": f"{name}",
                            "extra_info": {
                                "input_name": name,
                                "input_config": [input_type, extra],
                                "received_value": value,
                            },
                        }
                    )
                    continue
                source_id = value[0]
                source_class = prompt[source_id]["class_type"]
                received_type = self._spec(source_class).returns[value[1]]
                if not _types_match(received_type, input_type):
                    details = f"{name}, received_type({received_type}) mismatch input_type({input_type})"
                    errors.append(
                        {
                            "type": "return_type_mismatch",
                            "message": "Return type mismatch between linked nodes",
                            "details": details,
                            "extra_info": {
                                "input_name": name,
                                "input_config": [input_type, extra],
                                "received_type": received_type,
                                "linked_node": value,
                            },
                        }
                    )
                    continue
                try:
                    if self._validate_node(source_id, run, file_exists)[0] is False:
                        valid = False
                except Exception as exc:
                    valid = False
                    run.validated[source_id] = (
                        False,
                        [
                            {
                                "type": "exception_during_inner_validation",
                                "message": "Exception when validating inner node",
                                "details": str(exc),
                                "extra_info": {
                                    "input_name": name,
                                    "input_config": [input_type, extra],
                                    "exception_message": str(exc),
                                    "exception_type": _type_name(type(exc)),
                                    "traceback": traceback.format_tb(exc.__traceback__),
                                    "linked_node": value,
                                },
                            }
                        ],
                        source_id,
                    )
                continue

            original = value
            try:
                if isinstance(value, dict) and "__value__" in value:
                    value = value["__value__"]
                if input_type == "INT":
                    value = int(value)
                elif input_type == "FLOAT":
                    value = float(value)
                elif input_type == "STRING":
                    value = str(value)
                elif input_type == "BOOLEAN":
                    value = bool(value)
            except Exception as exc:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{name}, {value}, {exc}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": [input_type, extra],
                            "received_value": value,
                            "exception_message": str(exc),
                        },
                    }
                )
                if value is not original:  # the __value__ unwrap happened before the failure
                    changed = changed or {}
                    changed[name] = value
                continue
            if value is not original and not (type(value) is type(original) and value == original):
                changed = changed or {}
                changed[name] = value

            if name in custom_params:
                continue
            if "min" in extra and value < extra["min"]:
                errors.append(
                    {
                        "type": "value_smaller_than_min",
                        "message": "Value {} smaller than min of {}".format(value, extra["min"]),
                        "details": f"{name}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": [input_type, extra],
                            "received_value": value,
                        },
                    }
                )
                continue
            if "max" in extra and value > extra["max"]:
                errors.append(
                    {
                        "type": "value_bigger_than_max",
                        "message": "Value {} bigger than max of {}".format(value, extra["max"]),
                        "details": f"{name}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": [input_type, extra],
                            "received_value": value,
                        },
                    }
                )
                continue
            if isinstance(input_type, list) and value not in input_type:
                if len(input_type) > MAX_COMBO_LIST:
                    list_info = f"(list of length {len(input_type)})"
                    input_config = None
                else:
                    list_info = str(input_type)
                    input_config = [input_type, extra]
                errors.append(
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": f"{name}: '{value}' not in {list_info}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": input_config,
                            "received_value": value,
                        },
                    }
                )

        if changed:
            run.coerced[node_id] = changed

        if spec.custom_fn is not None:
            # The node's own check sees the (converted) values of the inputs it names; linked ones as None.
            declared = {entry[0] for entry in spec.inputs}
            arguments = {}
            for name in inputs:
                if name in custom_params and name in declared:
                    value = inputs[name]
                    if changed and name in changed:
                        value = changed[name]
                    arguments[name] = None if _is_link(value) else value
            verdict = spec.custom_fn(file_exists, **arguments)
            if verdict is not True:
                details_suffix = "" if verdict is False else f" - {verdict}"
                for name in arguments:
                    errors.append(
                        {
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": f"{name}{details_suffix}",
                            "extra_info": {"input_name": name},
                        }
                    )

        result = (False, errors, node_id) if errors or valid is not True else (True, [], node_id)
        run.validated[node_id] = result
        return result


def _prompt_error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}
