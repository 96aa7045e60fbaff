"""The Modal app, inspected offline: importing it makes no network call; the GPU class (GPU fallback list,
volume, secret, memory snapshot, concurrency), the web endpoint and its auth; its config, image pins and
container-side steps."""

from __future__ import annotations

import http.server
import inspect
import json
import runpy
import shutil
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest
from modal_app.config import AppConfig, gpu_from_device, load_config

import modal
from gpubridge.comfy import ComfyStartError
from gpubridge.errors import ConfigError

from .conftest import ROOT

PROBE = textwrap.dedent(
    """
    import json, socket, sys
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled by the test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    sys.path.insert(0, sys.argv[1])
    import modal_app.app as m
    gpu = m.ComfyUI._get_class_service_function().info()
    web = m.JobAPI._get_class_service_function().info()
    print(json.dumps({
        "app": m.app.name,
        "attempts": attempts,
        "gpus": gpu.gpus,
        "max_inputs": gpu.concurrency_info.max_inputs,
        "volumes": {k: v.name for k, v in gpu.volumes.items()},
        "secrets": gpu.secrets,
        "web_unauthenticated": web.method_details["web"].unauthenticated,
        "web_secrets": web.secrets,
    }))
    """
)


def probe(tmp_path, **env: str) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GPUBRIDGE_APP_")}
    proc = subprocess.run(
        [sys.executable, str(script), str(ROOT)],
        env={**base, **env},
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_app_makes_no_network_call(tmp_path):
    info = probe(tmp_path)
    assert info["attempts"] == []
    assert info["gpus"] == [["L40S", 1], ["A100-40GB", 1]]
    assert info["volumes"] == {"/models": "gpubridge-models"}
    assert info["secrets"] == ["modal.Secret.from_name('huggingface')"]
    assert info["web_secrets"] == ["modal.Secret.from_name('gpubridge-api')"]  # the bearer token
    assert info["web_unauthenticated"] is True  # bearer auth happens in the app, not at Modal's proxy


def test_settings_from_the_environment_reach_the_decorators(tmp_path):
    info = probe(
        tmp_path,
        GPUBRIDGE_APP_GPUS="H100,L40S",
        GPUBRIDGE_APP_MAX_INPUTS="4",
        GPUBRIDGE_APP_PROXY_AUTH="true",
        GPUBRIDGE_APP_MODELS_VOLUME="ryla-models",
        GPUBRIDGE_APP_HF_SECRET="none",
    )
    assert info["attempts"] == [] and info["gpus"] == [["H100", 1], ["L40S", 1]] and info["max_inputs"] == 4
    assert info["volumes"] == {"/models": "ryla-models"} and info["secrets"] == []
    assert info["web_unauthenticated"] is False  # Modal proxy auth required


@pytest.fixture
def app_module():
    import modal_app.app as m

    return m


def test_gpu_class(app_module):
    m = app_module
    cfg = m.config
    assert isinstance(m.ComfyUI, modal.Cls)
    info = m.ComfyUI._get_class_service_function().info()
    assert info.gpus == [("L40S", 1), ("A100-40GB", 1)] == [(g, 1) for g in cfg.gpu_cls_options()["gpu"]]
    assert info.timeout == cfg.timeout == 3600 and info.startup_timeout == cfg.startup_timeout
    assert info.concurrency_info.max_inputs == cfg.max_inputs
    assert info.volumes[cfg.models_mount].name == cfg.models_volume
    assert set(info.method_names) == {"run", "health"}
    assert cfg.gpu_cls_options()["enable_memory_snapshot"] is True


def test_snapshot_launch_and_cuda_after_restore(app_module):
    """Private Modal internals, as a canary: the decorator flags and the settings Modal keeps."""
    from modal._partial_function import _PartialFunctionFlags as F
    from modal._utils.async_utils import synchronizer

    m = app_module
    user_cls = m.ComfyUI._get_user_cls()
    flags = {name: synchronizer._translate_in(vars(user_cls)[name]).flags for name in ("launch", "restore")}
    assert F.ENTER_PRE_SNAPSHOT in flags["launch"] and F.ENTER_POST_SNAPSHOT in flags["restore"]
    assert "set_cuda_device" in inspect.getsource(synchronizer_raw(vars(user_cls)["restore"]))
    assert "launch_comfy" in inspect.getsource(synchronizer_raw(vars(user_cls)["launch"]))
    assert m._CUDA_AFTER_RESTORE
    impl = synchronizer._translate_in(m.ComfyUI._get_class_service_function())
    kept = inspect.getclosurevars(impl._load).nonlocals
    assert kept["enable_memory_snapshot"] is True
    assert (kept["scaledown_window"], kept["min_containers"], kept["max_containers"]) == (300, 0, 10)


def test_web_endpoint_and_download_function(app_module):
    m = app_module
    info = m.JobAPI._get_class_service_function().info()
    assert info.gpus == [] and info.method_names == ["web"]
    assert info.concurrency_info.max_inputs == m.config.api_max_inputs
    dl = m.download_models.info()
    assert dl.volumes["/models"].name == "gpubridge-models" and dl.secrets == [
        "modal.Secret.from_name('huggingface')"
    ]


async def test_the_web_app_needs_the_bearer_token(app_module, monkeypatch):
    m = app_module
    monkeypatch.setenv("GPUBRIDGE_API_TOKEN", "tok-1,tok-2")  # as the Modal Secret provides it
    raw = synchronizer_raw(vars(m.JobAPI._get_user_cls())["web"])
    asgi = raw(m.JobAPI._get_user_cls()())
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        assert (await http.get("/v1/jobs/fc-1")).status_code == 401
        wrong = await http.get("/v1/jobs/fc-1", headers={"Authorization": "Bearer tok-3"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "AuthError"
        ok = await http.get("/v1/jobs/not-a-call", headers={"Authorization": "Bearer tok-2"})
        assert ok.status_code == 404 and ok.json()["error"]["type"] == "JobNotFound"  # no Modal call made
        assert (await http.get("/openapi.json")).status_code == 401  # the schema follows the API's auth
        spec = (await http.get("/openapi.json", headers={"Authorization": "Bearer tok-1"})).json()
        assert spec["info"]["title"] == "gpubridge job API"


def synchronizer_raw(partial):
    from modal._utils.async_utils import synchronizer

    return synchronizer._translate_in(partial)._get_raw_f()


# ------------------------------------------------------------------------------------------------ config


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_APP_GPUS", '["H200", "H100"]')
    monkeypatch.setenv("GPUBRIDGE_APP_MIN_CONTAINERS", "1")
    monkeypatch.setenv("GPUBRIDGE_APP_GPU_SNAPSHOT", "1")
    monkeypatch.setenv("GPUBRIDGE_APP_PRICES", "H200=0.002,custom=0.1")
    monkeypatch.setenv("GPUBRIDGE_APP_API_SECRET", "none")
    monkeypatch.setenv("GPUBRIDGE_APP_PUBLIC_DOCS", "true")
    monkeypatch.setenv("GPUBRIDGE_APP_MAX_TIMEOUT", "3600")
    cfg = load_config()
    assert cfg.public_docs and cfg.max_timeout == 3600
    opts = cfg.gpu_cls_options()
    assert opts["gpu"] == ["H200", "H100"] and opts["min_containers"] == 1
    assert opts["experimental_options"] == {"enable_gpu_snapshot": True}
    assert cfg.price("H200") == 0.002 and cfg.price("H100:2") == pytest.approx(2 * 0.001097)
    assert cfg.price("custom") == 0.1 and cfg.price("mystery") is None and cfg.api_secret is None
    # What the image bakes in reproduces the config inside the container.
    baked = cfg.to_env()
    assert baked["GPUBRIDGE_APP_MIN_CONTAINERS"] == "1" and "GPUBRIDGE_APP_NAME" not in baked
    for key in list(__import__("os").environ):
        if key.startswith("GPUBRIDGE_APP_"):
            monkeypatch.delenv(key)
    for key, value in baked.items():
        monkeypatch.setenv(key, value)
    assert load_config() == cfg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("GPUBRIDGE_APP_GPUS", ""),
        ("GPUBRIDGE_APP_MAX_WAIT", "140"),
        ("GPUBRIDGE_APP_MAX_INPUTS", "0"),
        ("GPUBRIDGE_APP_PRICES", "L40S"),
    ],
)
def test_invalid_config(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    if value == "":
        monkeypatch.setenv(key, "[]")
    with pytest.raises(ConfigError, match="GPUBRIDGE_APP_"):
        load_config()


def test_defaults_stay_under_modal_web_limits():
    cfg = AppConfig()
    assert cfg.max_wait < 150 and cfg.sync_timeout < 150 and cfg.api_cls_options()["timeout"] < 300


@pytest.mark.parametrize(
    ("name", "vram", "gpu"),
    [
        ("cuda:0 NVIDIA L40S : cudaMallocAsync", None, "L40S"),
        ("cuda:0 NVIDIA A100-SXM4-80GB : cudaMallocAsync", 85_000_000_000, "A100-80GB"),
        ("cuda:0 NVIDIA A100-SXM4-40GB : cudaMallocAsync", 42_000_000_000, "A100-40GB"),
        ("cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync", None, "H100"),
        ("cuda:0 NVIDIA L4 : cudaMallocAsync", None, "L4"),
        ("cuda:0 NVIDIA A10G : cudaMallocAsync", None, "A10G"),
        ("cpu", None, None),
        (None, None, None),
    ],
)
def test_gpu_from_device(name, vram, gpu):
    assert gpu_from_device(name, vram) == gpu


# ------------------------------------------------------------------------------------------------- image


# The image's pins and its offline audit: tests/modal/test_image.py.


# -------------------------------------------------------------------------------------- container steps


def test_snapshot_helper_patches_comfyui_once(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    target = comfy / "comfy" / "model_management.py"
    target.write_text(
        textwrap.dedent(
            """
        import torch
        def get_torch_device():
            if cpu_state == CPUState.CPU:
                return torch.device("cpu")
            else:
                return torch.device(torch.cuda.current_device())
        """
        )
    )
    helper = comfy / "custom_nodes" / "memory_snapshot_helper"
    shutil.copytree(ROOT / "modal_app" / "memory_snapshot_helper", helper)
    runpy.run_path(str(helper / "prestartup_script.py"))
    patched = target.read_text()
    compile(patched, str(target), "exec")
    assert "if torch.cuda.is_available():" in patched and "return torch.device('cpu')" in patched
    assert (comfy / "comfy" / "model_management_original.py").exists()
    runpy.run_path(str(helper / "prestartup_script.py"))
    assert target.read_text() == patched  # applied once


def test_set_cuda_device_after_restore(monkeypatch):
    from modal_app.runtime import set_cuda_device

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(self.path)
            self.send_response(200 if len(hits) == 1 else 500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        cfg = AppConfig(comfy_port=server.server_address[1])
        set_cuda_device(cfg)
        assert hits == ["/cuda/set_device"]
        with pytest.raises(ComfyStartError, match="memory_snapshot_helper"):
            set_cuda_device(cfg)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ComfyStartError, match="did not answer"):
        set_cuda_device(cfg, timeout=2)


def test_link_models_from_the_volume(tmp_path):
    from modal_app.runtime import link_models

    from gpubridge.manifest import Manifest

    volume = tmp_path / "models"
    (volume / "files" / "loras").mkdir(parents=True)
    (volume / "files" / "loras" / "a.safetensors").write_bytes(b"x")
    manifest = Manifest.parse(
        '[[models]]\nname = "a.safetensors"\nfolder = "loras"\nurl = "https://x/a"\n'
        '[[models]]\nname = "b.safetensors"\nfolder = "loras"\nurl = "https://x/b"\n'
    )
    cfg = AppConfig(models_mount=str(volume), comfy_path=str(tmp_path / "ComfyUI"))
    report = link_models(cfg, manifest)
    assert report.linked == ["loras/a.safetensors"] and report.missing == ["loras/b.safetensors"]
    assert (tmp_path / "ComfyUI" / "models" / "loras" / "a.safetensors").read_bytes() == b"x"
