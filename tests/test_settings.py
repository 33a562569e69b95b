"""Settings come from AIGC_* variables and fail loudly, naming the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aigc.schemas.settings import Settings, SettingsError, get_settings, redact_url

# What base64-generated secrets look like, plus the characters URLs care about.
NASTY = 'a/b+c=d@e:f%g"h\'i j\\k#l?m'


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("AIGC_BROKER_URL", "redis://cache:6379/2")
    monkeypatch.setenv("AIGC_DATABASE_URL", "postgresql+psycopg2://u:pw@db/aigc")
    monkeypatch.setenv("AIGC_MAX_BATCH_ROWS", "4")
    settings = Settings()
    assert settings.broker_url == "redis://cache:6379/2"
    assert settings.database_url == "postgresql+psycopg://u:pw@db/aigc"
    assert settings.max_batch_rows == 4


@pytest.mark.parametrize("variable,value,message", [
    ("AIGC_BROKER_URL", "nope://x", "AIGC_BROKER_URL: kombu has no 'nope' transport"),
    ("AIGC_BROKER_URL", "sqs://", "kombu cannot use a 'sqs' broker here, is its client library installed"),
    ("AIGC_BROKER_URL", "redis://:a/b+c=@redis:6379/0", "AIGC_BROKER_URL: the password must be percent-encoded"),
    ("AIGC_DATABASE_URL", "not a url", "AIGC_DATABASE_URL is not a database URL"),
    ("AIGC_DATABASE_URL", "mysql://x/y", "must be sqlite:// or postgresql://"),
    ("AIGC_MAX_BATCH_ROWS", "0", "max_batch_rows"),
    ("AIGC_CHUNK_SIZE", "many", "chunk_size"),
])
def test_bad_values_fail_naming_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize("url", ["amqps://u:p@rabbit:5671//", "rediss://:p@cache:6380/0",
                                 "sentinel://:p@s1:26379;sentinel://:p@s2:26379",
                                 "redis+socket:///run/redis.sock", "amqp://guest:guest@127.0.0.1:5672//",
                                 "filesystem:///tmp/broker", "sqla+sqlite:///broker.db"])
def test_any_broker_kombu_accepts_is_accepted(url):
    assert Settings(broker_url=url).broker_url == url


def test_a_bad_setting_never_echoes_its_password(monkeypatch):
    monkeypatch.setenv("AIGC_DATABASE_URL", "mysql://app:LeakMe-4242@db/app")
    monkeypatch.setenv("AIGC_BROKER_URL", "redis://:Leak/Me+4242=@redis:6379/0")
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert "LeakMe" not in str(raised.value) and "Leak/Me" not in str(raised.value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as clean:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(clean.value)
    assert "AIGC_DATABASE_URL must be sqlite:// or postgresql://" in message
    assert "AIGC_BROKER_URL: the password must be percent-encoded" in message
    assert "\n" not in message and "Leak" not in message


def test_any_printable_password_works_given_apart_or_percent_encoded():
    from urllib.parse import quote

    from kombu import Connection
    from sqlalchemy.engine import make_url

    apart = Settings(broker_url="redis://redis:6379/0", broker_password=NASTY,
                     database_url="postgresql://aigc@postgres/aigc", database_password=NASTY)
    encoded = Settings(broker_url=f"redis://:{quote(NASTY, safe='')}@redis:6379/0",
                       database_url=f"postgresql://aigc:{quote(NASTY, safe='')}@postgres/aigc")
    for settings in (apart, encoded):
        connection = Connection(settings.broker_url)
        assert (connection.password, connection.hostname, connection.port) == (NASTY, "redis", 6379)
        url = make_url(settings.database_url)
        assert (url.password, url.host, url.database) == (NASTY, "postgres", "aigc")
        assert NASTY not in repr(settings) and quote(NASTY, safe="") not in repr(settings)
    rebuilt = Settings(**{k.removeprefix("AIGC_").lower(): v for k, v in apart.to_env().items()})
    assert rebuilt == apart  # merging the password again changes nothing


def test_passwords_are_redacted_by_kombu_and_sqlalchemy():
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("postgresql+psycopg://u:pw@db/x") == "postgresql+psycopg://u:***@db/x"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("sentinel://:pw1@a:26379;sentinel://:pw2@b:26379") == \
        "sentinel://:***@a:26379/;sentinel://:***@b:26379/"
    assert "Me" not in redact_url("redis://:Leak/Me@host:6379/0")  # unparseable: not shown


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


def _settings_table_script():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("settings_table", REPO / "scripts" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_is_the_one_the_model_writes():
    """A setting is described once, in its Field; README.md's table is generated from it."""
    script = _settings_table_script()
    readme = script.README.read_text(encoding="utf-8")
    assert script.with_table(readme) == readme, "README.md is stale: run python scripts/settings_table.py"


def test_every_setting_is_described_and_in_the_table():
    from aigc.schemas.settings import settings_table

    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 20, f"AIGC_{name.upper()} is undescribed"
        assert f"| `AIGC_{name.upper()}` |" in table
    assert "| `AIGC_ALLOW_DOWNLOADS` | `false` |" in table and "| `AIGC_BROKER_PASSWORD` | none |" in table
    assert "| `AIGC_MODELS_DIR` | `~/.cache/aigc/models` |" in table  # not this host's path


def test_a_stale_table_is_replaced_between_the_markers():
    script = _settings_table_script()
    stale = f"intro\n{script.BEGIN}\n| old |\n{script.END}\nafter\n"
    fresh = script.with_table(stale)
    assert fresh.startswith(f"intro\n{script.BEGIN}\n| variable |") and fresh.endswith(f"{script.END}\nafter\n")
    assert "| old |" not in fresh and script.with_table(fresh) == fresh
