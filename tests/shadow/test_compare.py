"""Comparing a pair: outcomes, error classes, latency, cost, structure and image similarity."""

from __future__ import annotations

from gpubridge.errors import JobFailed, JobTimeout, ProviderUnavailable
from gpubridge.models import Artifact, ArtifactKind, JobRequest
from gpubridge.shadow.compare import Outcome, compare, is_mismatch, workflow_key

from .helpers import WORKFLOW, png, result


def test_metadata_is_stripped_pixels_compared():
    a = png("gradient", text="prompt: a fox, seed 1", level=9)
    b = png("gradient", text="totally different metadata", level=1)
    assert a != b  # the files differ ...
    rec = compare(result("c", images=[a]), result("k", "modal", images=[b]), workflow="w")
    assert rec.outcome is Outcome.BOTH_OK
    assert rec.phash_distance == 0 and rec.ssim is not None and rec.ssim > 0.999  # ... the pixels do not
    assert rec.structure_match and is_mismatch(rec, 0) is False


def test_different_images_are_far_apart():
    rec = compare(result(images=[png("gradient")]), result(images=[png("stripes")]), workflow="w")
    assert rec.phash_distance is not None and rec.phash_distance > 10
    assert rec.ssim is not None and rec.ssim < 0.5
    assert is_mismatch(rec, 10) is True
    assert is_mismatch(rec, 64) is False


def test_structure_count_kinds_dims():
    one, two = result(images=[png()]), result(images=[png(), png()])
    rec = compare(one, two, workflow="w")
    assert rec.count_match is False and rec.kinds_match is False and is_mismatch(rec, 64) is True
    big = result(images=[png(size=(96, 64))])
    rec = compare(one, big, workflow="w")
    assert rec.count_match and rec.kinds_match and rec.dims_match is False
    assert rec.control.dims == ["64x64"] and rec.candidate.dims == ["96x64"]
    assert is_mismatch(rec, 64) is True  # structure always counts, whatever the floor


def test_undecodable_image_is_noted_not_raised():
    bad = result(images=[b"not a png"])
    rec = compare(result(), bad, workflow="w")
    assert rec.dims_match is False and rec.image_pairs == 0
    assert any("cannot decode" in n for n in rec.notes)


def test_text_artifacts_count_but_are_not_images():
    r = result()
    r.artifacts.append(Artifact(node_id="12", kind=ArtifactKind.TEXT, text="hello"))
    rec = compare(r, result(), workflow="w")
    assert rec.control.kinds == ["image", "text"] and rec.kinds_match is False


def test_outcome_and_error_class_parity():
    ok, failed = result(), JobFailed("boom", node_id="3")
    assert compare(ok, failed, workflow="w").outcome is Outcome.CANDIDATE_FAILED
    assert compare(failed, ok, workflow="w").outcome is Outcome.CONTROL_FAILED
    same = compare(JobFailed("a"), JobFailed("b"), workflow="w")
    assert same.outcome is Outcome.BOTH_FAILED and same.error_match is True
    diff = compare(JobFailed("a"), ProviderUnavailable("down"), workflow="w")
    assert diff.error_match is False and diff.candidate.error_type == "ProviderUnavailable"
    assert is_mismatch(diff, 0) is None
    crash = compare(ok, RuntimeError("candidate crashed"), workflow="w")
    assert crash.candidate.error_type == "RuntimeError" and "crashed" in (crash.candidate.error or "")


def test_latency_and_cost_with_measured_fallback():
    a = result(total_s=2.0, cost=0.01)
    b = result(cost=0.02)
    rec = compare(a, b, workflow="w", control_measured_s=9.0, candidate_measured_s=3.5)
    assert rec.control.total_s == 2.0  # the result's own timing wins
    assert rec.candidate.total_s == 3.5  # no timing in the result: the measured one
    assert (rec.control.cost_usd, rec.candidate.cost_usd) == (0.01, 0.02)
    t = compare(a, JobTimeout("late"), workflow="w", candidate_measured_s=7.0)
    assert t.candidate.total_s == 7.0 and t.candidate.error_type == "JobTimeout"


def test_workflow_key_ignores_seeds_texts_and_prefixes():
    base = JobRequest(workflow=WORKFLOW)
    varied = JobRequest(workflow=WORKFLOW).workflow.with_values(
        {"3.seed": 99, "6.text": "a cat", "9.filename_prefix": "x/y"}
    )
    assert workflow_key(base) == workflow_key(JobRequest(workflow=varied))
    assert workflow_key(base).startswith("wf-") and len(workflow_key(base)) == 15
    other = JobRequest(workflow=base.workflow.with_values({"3.steps": 30}))
    assert workflow_key(other) != workflow_key(base)
    model = JobRequest(workflow=base.workflow.with_values({"4.ckpt_name": "sdxl.safetensors"}))
    assert workflow_key(model) != workflow_key(base)
    assert workflow_key(JobRequest(workflow=WORKFLOW, tags={"workflow": "portrait-v2"})) == "portrait-v2"
