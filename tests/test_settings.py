"""Settings come from AIGC_* variables and fail loudly, naming the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.settings import Settings, redact_url


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("AIGC_BROKER_URL", "redis://cache:6379/2")
    monkeypatch.setenv("AIGC_DATABASE_URL", "postgresql+psycopg2://u:pw@db/aigc")
    monkeypatch.setenv("AIGC_MAX_BATCH_ROWS", "4")
    settings = Settings()
    assert settings.broker_url == "redis://cache:6379/2"
    assert settings.database_url == "postgresql+psycopg://u:pw@db/aigc"
    assert settings.max_batch_rows == 4


@pytest.mark.parametrize("variable,value,message", [
    ("AIGC_BROKER_URL", "kafka://x", "AIGC_BROKER_URL scheme 'kafka'"),
    ("AIGC_DATABASE_URL", "not a url", "AIGC_DATABASE_URL is not a database URL"),
    ("AIGC_DATABASE_URL", "mysql://x/y", "must be sqlite:// or postgresql://"),
    ("AIGC_MAX_BATCH_ROWS", "0", "max_batch_rows"),
    ("AIGC_CHUNK_SIZE", "many", "chunk_size"),
])
def test_bad_values_fail_naming_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_passwords_are_redacted():
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("postgresql+psycopg://u:pw@db/x") == "postgresql+psycopg://u:***@db/x"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_to_env_rebuilds_the_same_settings(monkeypatch):
    original = Settings(broker_url="redis://h:1/2", flower_password="pw", allow_downloads=True,
                        max_batch_rows=7)
    for name, value in original.to_env().items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt == original
    assert rebuilt.flower_password.get_secret_value() == "pw"
    assert "AIGC_FLOWER_PASSWORD" not in Settings().model_copy(update={"flower_password": None}).to_env()
    assert "pw" not in repr(rebuilt)


def test_image_settings_and_default_models(monkeypatch, tmp_path):
    monkeypatch.delenv("AIGC_ARTIFACT_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = Settings(data_dir=tmp_path / "state")
    assert settings.artifacts() == str(tmp_path / "state" / "artifacts")
    assert settings.models_dir == tmp_path / "cache" / "aigc" / "models"
    assert [settings.default_model(k) for k in ("article", "ad_copy", "image_set")] == \
        ["text-small", "text-small", "dcgan-faces"]
    monkeypatch.setenv("AIGC_ARTIFACT_ROOT", "s3://bucket/aigc")
    monkeypatch.setenv("AIGC_MAX_BATCH_IMAGES", "128")
    assert (Settings().artifacts(), Settings().max_batch_images) == ("s3://bucket/aigc", 128)
    monkeypatch.setenv("AIGC_MAX_BATCH_IMAGES", "0")
    with pytest.raises(ValidationError, match="max_batch_images"):
        Settings()
