from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from gpubridge.config import ProviderSettings, Settings
from gpubridge.errors import ConfigError


class DemoSettings(ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_DEMO_")
    section = "demo"
    url: str = "http://default"
    token: SecretStr | None = None
    retries: int = 1


def test_defaults(in_tmp: Path):
    s = Settings.load()
    assert s.provider == "local" and s.fallbacks == [] and s.config_file is None


def test_env_overrides_toml_and_toml_overrides_defaults(in_tmp: Path, monkeypatch: pytest.MonkeyPatch):
    (in_tmp / "gpubridge.toml").write_text(
        'provider = "modal"\nfallbacks = ["runpod"]\ntimeout = 120\n'
        '[providers.demo]\nurl = "http://from-toml"\nretries = 3\n'
    )
    monkeypatch.setenv("GPUBRIDGE_TIMEOUT", "30")
    monkeypatch.setenv("GPUBRIDGE_DEMO_URL", "http://from-env")
    s = Settings.load()
    assert s.provider == "modal" and s.fallbacks == ["runpod"] and s.timeout == 30
    assert s.config_file == in_tmp / "gpubridge.toml"
    demo = DemoSettings.from_settings(s)
    assert demo.url == "http://from-env" and demo.retries == 3
    assert DemoSettings.from_settings(s, url="http://explicit").url == "http://explicit"


def test_fallbacks_from_env_are_comma_separated(in_tmp: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_PROVIDER", "modal")
    monkeypatch.setenv("GPUBRIDGE_FALLBACKS", "runpod, local")
    s = Settings.load()
    assert s.provider == "modal" and s.fallbacks == ["runpod", "local"]


def test_config_env_var_points_at_file(in_tmp: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "x.toml"
    path.write_text('provider = "runpod"\n')
    monkeypatch.setenv("GPUBRIDGE_CONFIG", str(path))
    assert Settings.load().provider == "runpod"
    monkeypatch.setenv("GPUBRIDGE_CONFIG", str(path.parent / "missing.toml"))
    with pytest.raises(ConfigError, match="not a file"):
        Settings.load()


@pytest.mark.parametrize(
    "text, match",
    [
        ("timeout = -1\n", "timeout"),
        ("bogus_key = 1\n", "bogus_key"),
        ("provider = [\n", "Cannot parse"),
    ],
)
def test_invalid_files_raise_config_error(in_tmp: Path, text: str, match: str):
    (in_tmp / "gpubridge.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        Settings.load()


def test_secrets_never_print(in_tmp: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_DEMO_TOKEN", "s3cr3t-value")
    demo = DemoSettings.from_settings(Settings.load())
    assert demo.token is not None and demo.token.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(demo) and "s3cr3t" not in str(demo) and "s3cr3t" not in demo.model_dump_json()


def test_provider_section_validation_error_names_provider(in_tmp: Path):
    (in_tmp / "gpubridge.toml").write_text('[providers.demo]\nretries = "many"\n')
    with pytest.raises(ConfigError, match="provider 'demo'.*retries"):
        DemoSettings.from_settings(Settings.load())
