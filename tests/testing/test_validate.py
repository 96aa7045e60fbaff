"""gpubridge.comfy.validate against the recorded ComfyUI validation answers, plus ComfyUI's other rules."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from gpubridge.comfy.validate import (
    MalformedPrompt,
    PromptValidator,
    ValidationResult,
    apply_coercions,
    output_node_ids,
    split_annotated_name,
    validate_prompt,
)
from gpubridge.errors import WorkflowFormatError

from .conftest import recording

OBJECT_INFO = recording("object_info.json")
VALIDATION = recording("prompt_validation_errors.json")["cases"]
ACCEPTED = {c["case"]: c for c in recording("prompt_accepted_variants.json")["cases"]}


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """Error lists in a canonical order (ComfyUI walks inputs in set order) and tracebacks as types."""
    body = copy.deepcopy(body)
    for entry in body.get("node_errors", {}).values():
        for error in entry["errors"]:
            extra = error.get("extra_info", {})
            if "traceback" in extra:
                assert isinstance(extra["traceback"], list)
                assert all(isinstance(line, str) for line in extra["traceback"])
                extra["traceback"] = "<traceback>"
        entry["errors"].sort(key=lambda e: json.dumps(e, sort_keys=True))
    return body


def _prompt_cases() -> list[dict[str, Any]]:
    return [
        c
        for c in VALIDATION
        if isinstance(c["request"].get("json"), dict) and "prompt" in c["request"]["json"]
    ]


@pytest.mark.parametrize("case", _prompt_cases(), ids=lambda c: c["case"])
def test_recorded_validation_answers(case: dict[str, Any]) -> None:
    prompt = copy.deepcopy(case["request"]["json"]["prompt"])
    response = case["response"]
    if response["status"] == 500:
        with pytest.raises(MalformedPrompt):
            validate_prompt(prompt, OBJECT_INFO, file_exists=lambda name: False)
        return
    result = validate_prompt(prompt, OBJECT_INFO, file_exists=lambda name: False)
    assert result.status == response["status"]
    if response["status"] == 200:
        assert result.ok and result.error is None
        assert _comparable({"node_errors": result.node_errors}) == _comparable(
            {"node_errors": response["body"]["node_errors"]}
        )
    else:
        assert not result.ok
        assert _comparable(result.error_body()) == _comparable(response["body"])
        assert result.outputs == []


def test_partial_prompt_runs_only_the_valid_outputs() -> None:
    case = next(c for c in VALIDATION if c["case"] == "c11_partial_valid")
    result = validate_prompt(case["request"]["json"]["prompt"], OBJECT_INFO)
    recorded = case["response"]["body"]["node_errors"]
    broken_outputs = {o for entry in recorded.values() for o in entry["dependent_outputs"]}
    assert result.ok
    assert (
        set(result.outputs)
        == set(output_node_ids(case["request"]["json"]["prompt"], OBJECT_INFO)) - broken_outputs
    )


def test_numeric_strings_and_floats_are_coerced_without_touching_the_prompt() -> None:
    case = ACCEPTED["c1b_numeric_string_for_int"]
    prompt = case["request"]["json"]["prompt"]
    before = copy.deepcopy(prompt)
    result = validate_prompt(prompt, OBJECT_INFO)
    assert result.ok and result.node_errors == case["response"]["body"]["node_errors"]
    assert prompt == before  # pure
    assert result.coerced == {
        "1": {"width": int(before["1"]["inputs"]["width"]), "height": int(before["1"]["inputs"]["height"])}
    }
    apply_coercions(prompt, result)
    assert type(prompt["1"]["inputs"]["width"]) is int and type(prompt["1"]["inputs"]["height"]) is int


def test_int_widget_in_a_float_input_becomes_a_float() -> None:
    recorded = recording("video_outputs.json")["cases"]["save_video_mp4"]
    sent = recorded["request"]["prompt"]
    stored = recorded["history"][recorded["prompt_response"]["prompt_id"]]["prompt"][2]
    result = validate_prompt(copy.deepcopy(sent), OBJECT_INFO)
    coerced = apply_coercions(copy.deepcopy(sent), result)
    assert json.dumps(coerced, sort_keys=True) == json.dumps(stored, sort_keys=True)  # "fps": 8 -> 8.0


@pytest.mark.parametrize("case", sorted(ACCEPTED), ids=str)
def test_recorded_accepted_variants_validate(case: str) -> None:
    body = ACCEPTED[case]["request"]["json"]
    result = validate_prompt(copy.deepcopy(body["prompt"]), OBJECT_INFO)
    assert result.ok
    assert result.node_errors == ACCEPTED[case]["response"]["body"]["node_errors"]


def test_malformed_prompt_is_a_workflow_format_error() -> None:
    with pytest.raises(WorkflowFormatError):
        validate_prompt("not a workflow", OBJECT_INFO)
    with pytest.raises(MalformedPrompt):
        validate_prompt({"1": 5}, OBJECT_INFO)  # 'class_type' in 5: TypeError in ComfyUI too
    with pytest.raises(MalformedPrompt):
        validate_prompt([{"class_type": "SaveImage"}], OBJECT_INFO)


def _save(source: str, slot: int = 0, prefix: str = "x") -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, slot], "filename_prefix": prefix}}


def _empty(width: Any = 16) -> dict[str, Any]:
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": 16, "batch_size": 1, "color": 0}}


def test_inner_exception_is_reported_on_the_inner_node() -> None:
    prompt = {"1": {"class_type": "ImageInvert", "inputs": {"image": ["99", 0]}}, "2": _save("1")}
    result = validate_prompt(prompt, OBJECT_INFO)
    assert not result.ok
    assert result.error["details"] == ""  # the output itself has no reasons of its own
    (error,) = result.node_errors["1"]["errors"]
    assert error["type"] == "exception_during_inner_validation"
    assert error["details"] == "'99'"
    assert error["extra_info"]["exception_type"] == "KeyError"
    assert error["extra_info"]["linked_node"] == ["1", 0]  # the link into the failing node
    assert result.node_errors["1"]["dependent_outputs"] == ["2"]


def test_bad_linked_input() -> None:
    result = validate_prompt(
        {
            "1": _empty(),
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "x"}},
        },
        OBJECT_INFO,
    )
    (error,) = result.node_errors["2"]["errors"]
    assert error["type"] == "bad_linked_input"
    assert error["message"] == "Bad linked input, must be a length-2 list of [node_id, slot_index]"
    assert (
        result.error["details"]
        == "Bad linked input, must be a length-2 list of [node_id, slot_index]: images"
    )


def test_every_failing_output_is_added_to_every_failed_node() -> None:
    # ComfyUI appends each failing output to all nodes that failed so far, related or not
    prompt = {"1": _empty(0), "2": _save("1", prefix="a"), "3": _empty(0), "4": _save("3", prefix="b")}
    result = validate_prompt(prompt, OBJECT_INFO)
    assert not result.ok
    assert result.node_errors["1"]["dependent_outputs"] == ["2", "4"]
    assert result.node_errors["3"]["dependent_outputs"] == ["4"]


def test_long_combo_lists_are_not_echoed() -> None:
    sampler = OBJECT_INFO["KSamplerSelect"]["input"]["required"]["sampler_name"][0]
    assert len(sampler) > 20
    prompt = {
        "1": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "nope"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    (error,) = validate_prompt(prompt, OBJECT_INFO).node_errors["1"]["errors"]
    assert error["details"] == f"sampler_name: 'nope' not in (list of length {len(sampler)})"
    assert error["extra_info"]["input_config"] is None


def test_an_exception_discards_the_node_s_other_errors() -> None:
    # KSampler's first link points nowhere: the KeyError aborts its validation, as in ComfyUI
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["9", 0],
                "seed": 1,
                "steps": 1,
                "cfg": 1.0,
                "sampler_name": "nope",
                "scheduler": "normal",
                "positive": ["9", 0],
                "negative": ["9", 0],
                "latent_image": ["1", 0],
                "denoise": 1.0,
            },
        },
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "x"}},
    }
    (error,) = validate_prompt(prompt, OBJECT_INFO).node_errors["2"]["errors"]
    assert error["type"] == "exception_during_inner_validation" and error["details"] == "'9'"


def test_any_type_input_accepts_any_link_and_v3_combo_is_not_checked() -> None:
    prompt = {
        "1": _empty(),
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    assert validate_prompt(prompt, OBJECT_INFO).ok
    composite = {
        "1": _empty(),
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 16}},
        "3": {
            "class_type": "PorterDuffImageComposite",
            "inputs": {
                "source": ["1", 0],
                "source_alpha": ["2", 0],
                "destination": ["1", 0],
                "destination_alpha": ["2", 0],
                "mode": "NOT_A_MODE",
            },
        },
        "4": _save("3"),
    }
    assert OBJECT_INFO["PorterDuffImageComposite"]["input"]["required"]["mode"][0] == "COMBO"
    assert validate_prompt(composite, OBJECT_INFO).ok


def test_file_check_gets_the_raw_name_and_none_skips_it() -> None:
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "sub/x.png [temp]"}}, "2": _save("1")}
    seen: list[str] = []
    result = validate_prompt(prompt, OBJECT_INFO, file_exists=lambda name: seen.append(name) or True)
    assert result.ok and seen == ["sub/x.png [temp]"]
    assert validate_prompt(prompt, OBJECT_INFO).ok  # no callback: not checked
    # the file input is exempt from the combo check (LoadImage's list only shows top-level files)
    assert "sub/x.png [temp]" not in OBJECT_INFO["LoadImage"]["input"]["required"]["image"][0]


def test_loader_without_its_file_input_fails_like_comfyui() -> None:
    result = validate_prompt({"1": {"class_type": "LoadImage", "inputs": {}}, "2": _save("1")}, OBJECT_INFO)
    (error,) = result.node_errors["1"]["errors"]
    assert error["type"] == "exception_during_inner_validation"
    assert error["extra_info"]["exception_type"] == "TypeError"


def test_partial_execution_targets_limit_the_outputs() -> None:
    prompt = {"1": _empty(), "2": _save("1", prefix="a"), "3": _save("1", prefix="b")}
    result = validate_prompt(prompt, OBJECT_INFO, partial_execution_targets=["3"])
    assert result.outputs == ["3"]
    assert (
        validate_prompt(prompt, OBJECT_INFO, partial_execution_targets=["1"]).error["type"]
        == "prompt_no_outputs"
    )


def test_validator_instance_is_reusable_and_results_are_frozen() -> None:
    validator = PromptValidator(OBJECT_INFO)
    prompt = {"1": _empty(), "2": _save("1")}
    first = validator.validate(prompt)
    second = validator.validate(prompt)
    assert first == second and isinstance(first, ValidationResult)
    with pytest.raises(AttributeError):
        first.ok = False  # type: ignore[misc]


def test_split_annotated_name() -> None:
    assert split_annotated_name("a/b.png [output]") == ("a/b.png", "output")
    assert split_annotated_name("b.png [temp]") == ("b.png", "temp")
    assert split_annotated_name("b.png [input]") == ("b.png", "input")
    assert split_annotated_name("b.png") == ("b.png", None)
