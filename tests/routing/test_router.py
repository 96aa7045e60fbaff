"""Routes end to end: named RunPod instances (two endpoint doubles running the real worker over the ComfyUI
double, plus a stuck one), jobs routed by template, tag and node class, failover inside a route, health."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpubridge import connect
from gpubridge.config import Settings
from gpubridge.errors import ConfigError, ProviderNotFound
from gpubridge.models import JobRequest, Workflow
from gpubridge.routing import RouterRunner
from gpubridge.templates import TemplateRegistry
from gpubridge.testing import ComfyDouble
from gpubridge.testing.runpod import RunPodEndpointDouble

from ..runpod.conftest import API_KEY, load_worker_module

ROOT = Path(__file__).resolve().parents[2]
INVERT = Workflow.load(ROOT / "workflows" / "model_free_invert.json")
PLAIN = Workflow.load({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                     "color": 0}},
                       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}})
FAST = 'api_key = "{key}"\npoll_initial = 0.005\npoll_max = 0.05\nretry_initial = 0.0\nhealth_resample = 0\n'


def runpod_table(name: str, endpoint: RunPodEndpointDouble) -> str:
    return (f'[providers.{name}]\ntype = "runpod"\nendpoint_id = "{endpoint.endpoint_id}"\n'
            f'base_url = "{endpoint.base_url}"\n' + FAST.format(key=API_KEY))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    async with ComfyDouble(root=tmp_path / "comfy") as comfy:
        worker = load_worker_module()
        worker.configure(comfy_url=comfy.url, reconnect_timeout=0.5, progress_interval=0.0)
        try:
            async with (RunPodEndpointDouble(worker.handler, endpoint_id="ep-image", api_key=API_KEY) as image,
                        RunPodEndpointDouble(worker.handler, endpoint_id="ep-faceswap", api_key=API_KEY) as face,
                        RunPodEndpointDouble(worker.handler, endpoint_id="ep-stuck", api_key=API_KEY,
                                             workers=0) as stuck):
                yield {"comfy": comfy, "image": image, "faceswap": face, "stuck": stuck}
        finally:
            await worker.aclose()


def write_config(tmp_path: Path, stack: dict[str, Any], routes: str) -> Settings:
    path = tmp_path / "gpubridge.toml"
    path.write_text(
        f'provider = "local"\n\n[providers.local]\nurl = "{stack["comfy"].url}"\n\n'
        + runpod_table("runpod-image", stack["image"]) + "\n"
        + runpod_table("runpod-faceswap", stack["faceswap"]) + "\n"
        + runpod_table("runpod-stuck", stack["stuck"]) + "\n" + routes
    )
    return Settings.load(path)


ROUTES = '''
[[routes]]
name = "faceswap"
match = { template = "faceswap*" }
providers = ["runpod-faceswap"]

[[routes]]
name = "batch"
match = { tags = { tier = "batch" } }
providers = ["runpod-stuck", "runpod-image"]
queue_timeout = 1

[[routes]]
name = "inverts"
match = { node_class = "ImageInvert" }
providers = ["runpod-image"]
'''


async def test_jobs_go_by_template_tag_and_node_class(stack, tmp_path: Path):
    settings = write_config(tmp_path, stack, ROUTES)
    folder = tmp_path / "tpl"
    folder.mkdir()
    for suffix in (".json", ".toml"):
        shutil.copy(ROOT / "workflows" / f"model_free_invert{suffix}", folder / f"faceswap_v1{suffix}")
    templates = TemplateRegistry.load(folder)
    async with connect(settings=settings) as runner:
        assert isinstance(runner, RouterRunner)
        face = await runner.run(templates.request("faceswap_v1", {"width": 8}))
        assert face.provider == "runpod-faceswap" and stack["faceswap"].job_ids
        inv = await runner.run(JobRequest(workflow=INVERT))
        assert inv.provider == "runpod-image"
        plain = await runner.run(JobRequest(workflow=PLAIN))
        assert plain.provider == "local"  # no route matches: the default provider
        assert len(stack["image"].job_ids) == 1 and len(stack["faceswap"].job_ids) == 1


async def test_a_stuck_instance_fails_over_within_its_route_only(stack, tmp_path: Path):
    settings = write_config(tmp_path, stack, ROUTES)
    async with connect(settings=settings) as runner:
        result = await runner.run(JobRequest(workflow=PLAIN, tags={"tier": "batch"}, timeout=60))
        assert result.provider == "runpod-image"
        assert [a.provider for a in result.attempts] == ["runpod-stuck", "runpod-image"]
        (stuck_id,) = stack["stuck"].job_ids
        assert stack["stuck"].status_of(stuck_id) == "CANCELLED"  # the original is cancelled
        assert not stack["faceswap"].job_ids  # another route's instance never saw it
        assert stack["comfy"].stats.prompts_accepted == 1  # it ran once


async def test_health_lists_every_instance_with_its_type_and_routes(stack, tmp_path: Path):
    settings = write_config(tmp_path, stack, ROUTES)
    async with connect(settings=settings) as runner:
        report = await runner.health()
    rows = {c["provider"]: c for c in report.details["components"]}
    assert set(rows) == {"local", "runpod-image", "runpod-faceswap", "runpod-stuck"}
    assert rows["runpod-faceswap"]["type"] == "runpod" and rows["local"]["type"] == "local"
    assert sorted(rows["runpod-image"]["routes"]) == ["batch", "inverts"]
    assert [r["route"] for r in report.details["routes"]] == ["faceswap", "batch", "inverts", "default"]


async def test_a_job_submitted_elsewhere_is_found_through_its_route(stack, tmp_path: Path):
    settings = write_config(tmp_path, stack, ROUTES)
    async with connect(settings=settings) as first:
        handle = await first.submit(JobRequest(workflow=INVERT))
        assert handle.extra["route"] == "inverts"
        async with connect(settings=settings) as second:  # another process: knows only the job id
            result = await second.wait(handle.job_id)
    assert result.provider == "runpod-image" and len(result.artifacts) == 2


def test_each_instance_reads_its_own_table_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "gpubridge.toml"
    path.write_text('provider = "runpod-a"\n[providers.runpod-a]\ntype = "runpod"\nendpoint_id = "ep-a"\n'
                    'api_key = "k"\n[providers.runpod-b]\ntype = "runpod"\nendpoint_id = "ep-b"\napi_key = "k"\n')
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_ENDPOINT_ID", "from-the-type-env")  # the plain `runpod` provider's
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_B_ENDPOINT_ID", "ep-b-from-env")
    from gpubridge.plugins import get_registry

    settings = Settings.load(path)
    a = get_registry().create_runner("runpod-a", settings)
    b = get_registry().create_runner("runpod-b", settings)
    assert (a.name, a.endpoint_id) == ("runpod-a", "ep-a")
    assert (b.name, b.endpoint_id) == ("runpod-b", "ep-b-from-env")


@pytest.mark.parametrize(("text", "error", "words"), [
    ('[providers.x]\ntype = "runpud"\n', ProviderNotFound, r":3: \[providers.x\] has type 'runpud'"),
    ('[[routes]]\nproviders = ["nowhere"]\n', ConfigError, r":3: route 'route-1': no provider 'nowhere'"),
    ('[[routes]]\nmatch = { tags = { a = "1" } }\nproviders = ["local"]\n\n[[routes]]\nname = "late"\n'
     'match = { tags = { a = "1", b = "2" } }\nproviders = ["local"]\n', ConfigError,
     r":7: route 'late': can never match: route 'route-1' \(line 3\)"),
    ('[[routes]]\nproviders = ["local"]\nshadow_rate = 2\n', ConfigError, r":3: route 'route-1': shadow_rate"),
])
def test_a_bad_config_fails_at_start_naming_the_line(tmp_path: Path, text: str, error: type, words: str):
    path = tmp_path / "gpubridge.toml"
    path.write_text('provider = "local"\n\n' + text)
    with pytest.raises(error, match=words):
        connect(settings=Settings.load(path))


async def test_a_named_local_instance_names_its_own_url_setting(tmp_path: Path):
    path = tmp_path / "gpubridge.toml"
    path.write_text('[providers.comfy-b]\ntype = "local"\nurl = "http://127.0.0.1:1"\n')
    from gpubridge.errors import ProviderUnavailable
    from gpubridge.plugins import get_registry

    async with get_registry().create_runner("comfy-b", Settings.load(path)) as runner:
        with pytest.raises(ProviderUnavailable, match="GPUBRIDGE_COMFY_B_URL"):
            await runner.run(JobRequest(workflow=PLAIN))
