"""gpubridge.manifest (parse, plan, download, link), the Modal Volume sync, and the `gpubridge models` CLI."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from gpubridge.cli import main
from gpubridge.manifest import (
    Manifest,
    ManifestError,
    download,
    link,
    plan,
    present,
    resolve,
    store_files,
)
from gpubridge.providers import modal as modal_provider

from .conftest import ROOT

COMMIT = "a" * 40
BLOB = b"safetensors-bytes"

HF_AND_URL = """
[[models]]
name = "flux.safetensors"
folder = "diffusion_models"
repo = "black-forest-labs/FLUX.1-schnell"
file = "flux1-schnell.safetensors"

[[models]]
name = "vae.safetensors"
folder = "vae"
repo = "org/pinned"
file = "split/vae.safetensors"
revision = "{commit}"

[[models]]
name = "upscale.pth"
folder = "upscale_models"
url = "{url}"
sha256 = "{sha}"
"""


def manifest_text(url: str = "https://example.com/upscale.pth", sha: str | None = None) -> str:
    return HF_AND_URL.format(commit=COMMIT, url=url, sha=sha or hashlib.sha256(b"upscaler").hexdigest())


def fake_hf(calls: list | None = None, *, gated: set[str] = frozenset(), missing: set[str] = frozenset()):
    """An hf_hub_download stand-in that writes the real cache layout (blobs, snapshot links, refs)."""

    def hf_download(*, repo_id, filename, revision, cache_dir, token, force_download):
        if calls is not None:
            calls.append((repo_id, filename, revision, token))
        if repo_id in gated:
            raise _hf_error("GatedRepoError")
        if repo_id in missing:
            raise _hf_error("RepositoryNotFoundError")
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        commit = revision if revision and len(revision) == 40 else COMMIT
        blob = repo / "blobs" / hashlib.sha256(BLOB + filename.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(BLOB + filename.encode())
        snap = repo / "snapshots" / commit / filename
        snap.parent.mkdir(parents=True, exist_ok=True)
        if not snap.exists():
            os.symlink(os.path.relpath(blob, snap.parent), snap)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(commit)
        return str(snap)

    return hf_download


def _hf_error(name: str) -> Exception:
    import huggingface_hub.errors as hf_errors

    try:
        import httpx2 as h
    except ImportError:  # older huggingface_hub uses httpx
        import httpx as h
    resp = h.Response(401, request=h.Request("GET", "https://huggingface.co/api/models/x"))
    return getattr(hf_errors, name)("401 Client Error", response=resp)


@contextlib.contextmanager
def file_server(files: dict[str, bytes]):
    """A real HTTP server on 127.0.0.1 serving ``files`` by path."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------ parse


def test_parse_sources_targets_and_warnings():
    m = Manifest.parse(manifest_text())
    flux, vae, up = m.entries
    assert str(flux.target) == "diffusion_models/flux.safetensors"
    assert flux.source == "hf://black-forest-labs/FLUX.1-schnell/flux1-schnell.safetensors"
    assert vae.source.endswith(f"@{COMMIT}") and up.source == "https://example.com/upscale.pth"
    assert str(vae.store_path()) == f"hf/models--org--pinned/snapshots/{COMMIT}/split/vae.safetensors"
    assert str(up.store_path()) == "files/upscale_models/upscale.pth"
    assert any("flux.safetensors: no sha256" in w for w in m.warnings)
    assert m.select(["vae.safetensors", "upscale_models/upscale.pth"]) == [vae, up]
    with pytest.raises(ManifestError, match="No model 'nope'"):
        m.select(["nope"])


def test_the_shipped_manifest_is_valid():
    m = Manifest.load(ROOT / "modal_app" / "models.toml")
    assert len(m) >= 4 and all(e.is_hf for e in m)
    targets = {str(e.target) for e in m}
    assert {
        "diffusion_models/flux1-schnell.safetensors",
        "vae/ae.safetensors",
        "checkpoints/sd_xl_base_1.0.safetensors",
    } <= targets


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[models]]\nname = "a"\nfolder = "vae"\n', "exactly one source"),
        (
            '[[models]]\nname = "a"\nfolder = "vae"\nrepo = "o/r"\nfile = "f"\nurl = "https://x"\n',
            "exactly one",
        ),
        ('[[models]]\nname = "a"\nfolder = "vae"\nrepo = "o/r"\n', "needs 'file'"),
        ('[[models]]\nname = "a"\nfolder = "vae"\nrepo = "not a repo"\nfile = "f"\n', "org/name"),
        ('[[models]]\nname = "../a"\nfolder = "vae"\nurl = "https://x"\n', "without '..'"),
        ('[[models]]\nname = "a"\nfolder = "/abs"\nurl = "https://x"\n', "relative path"),
        ('[[models]]\nname = "a"\nfolder = "vae"\nurl = "ftp://x"\n', "http"),
        ('[[models]]\nname = "a"\nfolder = "vae"\nurl = "https://x"\nsha256 = "abc"\n', "64 hex"),
        ('[[models]]\nname = "a"\nfolder = "vae"\nurl = "https://x"\nfile = "f"\n', "only applies"),
        ('[[models]]\nname = "a"\nfolder = "vae"\nurl = "https://x"\ncolour = "red"\n', "unknown keys"),
        (
            (
                '[[models]]\nname = "a"\nfolder = "vae"\nurl = "https://x"\n'
                '[[models]]\nname = "a"\nfolder = "vae"\nurl = "https://y"\n'
            ),
            "both go to vae/a",
        ),
        ("models = 3\n", "array of tables"),
        ("[[models]\n", "Cannot parse"),
    ],
)
def test_invalid_manifests(text, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.parse(text)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        Manifest.load(tmp_path / "nope.toml")


# ------------------------------------------------------------------------------------------------ plan


def test_plan_offline_against_a_directory_and_against_a_listing(tmp_path):
    m = Manifest.parse(manifest_text())
    offline = plan(m)
    assert {i.action for i in offline.items} == {"unknown"} and len(offline.to_download) == 3

    store = tmp_path / "store"
    download(m.select(["flux.safetensors"]), store, hf_download=fake_hf())
    by_dir = plan(m, root=store)
    assert [i.action for i in by_dir.items] == ["present", "download", "download"]

    listing = [
        f"hf/models--org--pinned/snapshots/{COMMIT}/split/vae.safetensors",
        f"hf/models--black-forest-labs--FLUX.1-schnell/snapshots/{'b' * 40}/flux1-schnell.safetensors",
        "files/upscale_models/upscale.pth",
    ]
    # A branch revision counts only with its ref present (the listing cannot say which commit it names).
    assert [i.action for i in plan(m, listing=listing).items] == ["download", "present", "present"]
    listing.append("hf/models--black-forest-labs--FLUX.1-schnell/refs/main")
    assert [i.action for i in plan(m, listing=listing).items] == ["present", "present", "present"]


# -------------------------------------------------------------------------------------------- download


def test_download_gated_model_warns_and_the_rest_still_downloads(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    m = Manifest.parse(manifest_text().split('[[models]]\nname = "upscale.pth"')[0])
    calls: list = []
    report = download(m, tmp_path, hf_download=fake_hf(calls, gated={"black-forest-labs/FLUX.1-schnell"}))
    assert report.ok and report.gated == ["flux.safetensors"] and report.downloaded == ["vae.safetensors"]
    [warning] = report.warnings
    assert (
        "gated" in warning
        and "HF_TOKEN" in warning
        and "huggingface.co/black-forest-labs/FLUX.1-schnell" in warning
    )
    assert calls[0][3] is None  # no token sent

    report = download(
        m, tmp_path, token="hf_x", hf_download=fake_hf(calls, gated={"black-forest-labs/FLUX.1-schnell"})
    )
    assert report.gated == ["flux.safetensors"] and "no access" in report.warnings[0]
    assert report.present == ["vae.safetensors"] and calls[-1][3] == "hf_x"

    monkeypatch.setenv("HF_TOKEN", "hf_env")
    download(m.select(["flux.safetensors"]), tmp_path, hf_download=fake_hf(calls))
    assert calls[-1][3] == "hf_env"


def test_private_repo_without_token_is_reported_as_gated(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    m = Manifest.parse(
        '[[models]]\nname = "p.safetensors"\nfolder = "loras"\nrepo = "me/private"\nfile = "p"\n'
    )
    report = download(m, tmp_path, hf_download=fake_hf(missing={"me/private"}))
    assert report.ok and report.gated == ["p.safetensors"]
    report = download(m, tmp_path, token="hf_x", hf_download=fake_hf(missing={"me/private"}))
    assert not report.ok and "RepositoryNotFoundError" in report.failed["p.safetensors"]


def test_url_download_is_verified_against_sha256(tmp_path):
    with file_server({"/ok.pth": b"upscaler", "/bad.pth": b"tampered"}) as base:
        good = Manifest.parse(manifest_text(url=f"{base}/ok.pth")).select(["upscale.pth"])
        report = download(good, tmp_path / "a")
        assert report.ok and report.downloaded == ["upscale.pth"]
        assert resolve(good[0], tmp_path / "a").read_bytes() == b"upscaler"

        bad = Manifest.parse(manifest_text(url=f"{base}/bad.pth")).select(["upscale.pth"])
        report = download(bad, tmp_path / "b")
        assert not report.ok and "sha256 mismatch" in report.failed["upscale.pth"]
        assert resolve(bad[0], tmp_path / "b") is None  # the bad file is not left behind

        gone = Manifest.parse(manifest_text(url=f"{base}/missing.pth")).select(["upscale.pth"])
        report = download(gone, tmp_path / "c")
        assert "404" in report.failed["upscale.pth"]


def test_hf_download_sha256_mismatch_discards_the_file(tmp_path):
    text = (
        '[[models]]\nname = "x.safetensors"\nfolder = "loras"\nrepo = "o/r"\nfile = "x.safetensors"\n'
        f'sha256 = "{"0" * 64}"\n'
    )
    m = Manifest.parse(text)
    report = download(m, tmp_path, hf_download=fake_hf())
    assert "sha256 mismatch" in report.failed["x.safetensors"] and resolve(m.entries[0], tmp_path) is None


# ------------------------------------------------------------------------------------------------ link


def test_link_into_comfyui_models_is_idempotent(tmp_path):
    m = Manifest.parse(manifest_text())
    store, models = tmp_path / "store", tmp_path / "ComfyUI" / "models"
    download(m.select(["flux.safetensors", "vae.safetensors"]), store, hf_download=fake_hf())
    (models / "upscale_models").mkdir(parents=True)
    report = link(m, store, models)
    assert report.linked == ["diffusion_models/flux.safetensors", "vae/vae.safetensors"]
    assert report.missing == ["upscale_models/upscale.pth"]
    flux = models / "diffusion_models" / "flux.safetensors"
    assert flux.is_symlink() and flux.read_bytes() == BLOB + b"flux1-schnell.safetensors"
    assert link(m, store, models).linked == report.linked  # again: nothing changes
    (models / "vae" / "vae.safetensors").unlink()
    (models / "vae" / "vae.safetensors").write_bytes(b"baked into the image")
    assert link(m, store, models).kept == ["vae/vae.safetensors"]
    assert present(m, models) == (
        ["diffusion_models/flux.safetensors", "vae/vae.safetensors"],
        ["upscale_models/upscale.pth"],
    )


# ------------------------------------------------------------------------------------------ Modal Volume


class FakeVolume:
    """``iterdir`` and ``batch_upload`` of a modal.Volume, over a local directory."""

    def __init__(self, root: Path):
        self.root = root
        self.name = "gpubridge-models"
        self.uploads: list[tuple[str, bool]] = []

    def iterdir(self, path: str, recursive: bool = True):
        from modal.volume import FileEntry, FileEntryType

        for p in sorted(self.root.rglob("*")):
            kind = (
                FileEntryType.SYMLINK
                if p.is_symlink()
                else FileEntryType.FILE
                if p.is_file()
                else (FileEntryType.DIRECTORY)
            )
            yield FileEntry(path=str(p.relative_to(self.root)), type=kind, mtime=0, size=0)

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False):
        volume = self

        class Batch:
            def put_file(self, source, remote_path):
                dest = volume.root / str(remote_path).lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                data = source.read() if hasattr(source, "read") else Path(source).read_bytes()
                dest.write_bytes(data)
                volume.uploads.append((str(remote_path), force))

        yield Batch()


def test_sync_volume_uploads_what_it_lacks_in_one_batch(tmp_path):
    with file_server({"/ok.pth": b"upscaler"}) as base:
        m = Manifest.parse(manifest_text(url=f"{base}/ok.pth"))
        volume = FakeVolume(tmp_path / "volume")
        (volume.root / "files" / "upscale_models").mkdir(parents=True)
        (volume.root / "files" / "upscale_models" / "upscale.pth").write_bytes(b"upscaler")
        before = modal_provider.plan_volume(m, volume)
        assert [i.action for i in before.items] == ["download", "download", "present"]

        report = modal_provider.sync_volume(m, volume, cache_dir=tmp_path / "cache", hf_download=fake_hf())
    assert report.ok and report.downloaded == ["flux.safetensors", "vae.safetensors"]
    assert report.present == ["upscale.pth"]
    uploaded = {path for path, _ in volume.uploads}
    assert uploaded == {
        f"/hf/models--black-forest-labs--FLUX.1-schnell/snapshots/{COMMIT}/flux1-schnell.safetensors",
        "/hf/models--black-forest-labs--FLUX.1-schnell/refs/main",
        f"/hf/models--org--pinned/snapshots/{COMMIT}/split/vae.safetensors",
    }
    assert [i.action for i in modal_provider.plan_volume(m, volume).items] == ["present"] * 3
    # What the containers do at start: link from the Volume.
    models = tmp_path / "models"
    assert link(m, volume.root, models).missing == []
    assert (models / "vae" / "vae.safetensors").read_bytes() == BLOB + b"split/vae.safetensors"
    assert [rel for _, rel in store_files(m.entries[2], volume.root)] == ["files/upscale_models/upscale.pth"]


# ------------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_validate_list_and_offline_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # finds modal_app/models.toml
    code, out, err = run_cli(capsys, "models", "validate")
    assert code == 0 and "valid" in out and "no sha256" in err
    code, out, _ = run_cli(capsys, "models", "list", "--json")
    assert (
        code == 0 and json.loads(out)["models"][0]["target"] == "diffusion_models/flux1-schnell.safetensors"
    )
    code, out, _ = run_cli(capsys, "models", "plan", "--json")
    assert code == 0 and {i["action"] for i in json.loads(out)["items"]} == {"unknown"}

    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nname = "a"\nfolder = "vae"\n')
    code, out, _ = run_cli(capsys, "models", "validate", "--manifest", str(bad), "--json")
    assert code == 2 and json.loads(out)["error"]["type"] == "ManifestError"


def test_cli_sync_and_plan_a_directory(tmp_path, capsys):
    with file_server({"/ok.pth": b"upscaler"}) as base:
        manifest = tmp_path / "models.toml"
        manifest.write_text(manifest_text(url=f"{base}/ok.pth"))
        store = tmp_path / "store"
        code, out, _ = run_cli(
            capsys,
            "models",
            "sync",
            "-m",
            str(manifest),
            "--dir",
            str(store),
            "--only",
            "upscale.pth",
            "--json",
        )
    assert code == 0 and json.loads(out)["downloaded"] == ["upscale.pth"]
    code, out, _ = run_cli(capsys, "models", "plan", "-m", str(manifest), "--dir", str(store), "--json")
    assert [i["action"] for i in json.loads(out)["items"]] == ["download", "download", "present"]
    code, _, err = run_cli(capsys, "models", "sync", "-m", str(manifest))
    assert code == 2 and "exactly one store" in err


def test_cli_plan_volume(tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "models.toml"
    manifest.write_text(manifest_text())
    volume = FakeVolume(tmp_path / "volume")
    (volume.root / "files" / "upscale_models").mkdir(parents=True)
    (volume.root / "files" / "upscale_models" / "upscale.pth").write_bytes(b"upscaler")
    seen = []
    monkeypatch.setattr(modal_provider, "_volume", lambda name, env: seen.append((name, env)) or volume)
    code, out, _ = run_cli(
        capsys, "models", "plan", "-m", str(manifest), "--volume", "gpubridge-models", "-e", "prod", "--json"
    )
    assert code == 0 and seen == [("gpubridge-models", "prod")]
    assert [i["action"] for i in json.loads(out)["items"]] == ["download", "download", "present"]


def test_cli_volume_without_modal_credentials_is_a_clear_error(tmp_path, capsys):
    manifest = tmp_path / "models.toml"
    manifest.write_text(manifest_text())
    # MODAL_CONFIG_PATH is an empty file (tests/conftest.py): Modal refuses before any network I/O.
    code, out, _ = run_cli(capsys, "models", "plan", "-m", str(manifest), "--volume", "v", "--json")
    assert code == 3 and json.loads(out)["error"]["type"] == "AuthError"
