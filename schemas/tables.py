"""The SQL tables: a public contract that downstream systems read (docs/results-table.md).

Change them only together with a new Alembic migration in ``schemas/migrations/versions``;
``tests/test_schema.py`` fails when the models and the migrations disagree.
Times are UTC. Statuses are stored as plain strings (see ``aigc.schemas.enums``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite autoincrements only an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ts() -> Any:
    """A nullable timestamp column, set when the row reaches that state."""
    return Field(default=None, sa_type=DateTime(timezone=True), nullable=True)


class Job(SQLModel, table=True):
    """One submitted batch: what to run, with which model and parameters, and its progress."""

    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=36)
    idempotency_key: str | None = Field(default=None, max_length=255, unique=True)
    kind: str = Field(max_length=32)
    model: str = Field(max_length=512)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONType, nullable=False))
    status: str = Field(max_length=32, index=True)
    total: int = 0
    done: int = 0
    failed: int = 0
    priority: int = 0
    # sha256 of the items as stored (custom_id and input, in order): an idempotency key reused
    # with other items is refused. Null for jobs stored before migration 0004.
    input_sha256: str | None = Field(default=None, max_length=64)
    meta: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("metadata", JSONType, nullable=False)
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    cancel_requested_at: datetime | None = _ts()
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    # Batches made through the OpenAI-compatible API (``aigc serve``, migration 0005); null for
    # jobs submitted otherwise. The batch id is ``batch_`` + this id without dashes.
    owner: str | None = Field(default=None, max_length=255, index=True)  # the API key's name
    input_file_id: str | None = Field(default=None, max_length=64)
    endpoint: str | None = Field(default=None, max_length=64)
    completion_window: str | None = Field(default=None, max_length=16)
    expires_at: datetime | None = _ts()
    expired_at: datetime | None = _ts()
    # Why a batch failed before any item was stored: [{line, param, code, message}].
    errors: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSONType, nullable=True))


class Item(SQLModel, table=True):
    """One unit of work of a job; its lease says which worker owns it until when."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("job_id", "custom_id", name="uq_items_job_custom_id"),
        Index("ix_items_job_status", "job_id", "status"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    job_id: str = Field(foreign_key="jobs.id", max_length=36)
    custom_id: str = Field(max_length=255)
    index: int
    input: dict[str, Any] = Field(sa_column=Column(JSONType, nullable=False))
    status: str = Field(max_length=32)
    attempts: int = 0
    lease_owner: str | None = Field(default=None, max_length=255)
    lease_expires_at: datetime | None = _ts()
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class Result(SQLModel, table=True):
    """What came back for one item: output or error, and how it was made."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "custom_id", name="uq_results_job_custom_id"),)

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    # Taken in the writing transaction from counters('results'), whose row lock is held until
    # commit: rows become visible in seq order, so `WHERE seq > :last` never skips one.
    seq: int = Field(sa_column=Column(BigInteger, nullable=False, index=True, unique=True))
    job_id: str = Field(foreign_key="jobs.id", max_length=36)
    custom_id: str = Field(max_length=255)
    item_id: int = Field(sa_type=BigInteger, foreign_key="items.id")
    kind: str = Field(max_length=32)
    output_text: str | None = Field(default=None, sa_type=Text)
    output: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType, nullable=True))
    artifact_uris: list[str] | None = Field(default=None, sa_column=Column(JSONType, nullable=True))
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_type=Text)
    # Text kinds: "stop" (end of text or a stop string) or "length" (max_new_tokens reached;
    # with several variants, "length" if any hit it). Null for errors and image sets.
    finish_reason: str | None = Field(default=None, max_length=16)
    model: str = Field(max_length=512)
    seed: int | None = Field(default=None, sa_type=BigInteger)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONType, nullable=False))
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: float | None = None
    worker: str | None = Field(default=None, max_length=255)
    device: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True), index=True)


class ChunkRun(SQLModel, table=True):
    """One run of one chunk by one worker: what it did and how long it took.

    The views ``job_throughput`` and ``worker_throughput`` (migration 0002) aggregate these
    rows into items/s and tokens/s; ``docs/results-table.md`` has the queries.
    """

    __tablename__ = "chunk_runs"

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    job_id: str = Field(foreign_key="jobs.id", max_length=36, index=True)
    worker: str = Field(max_length=255, index=True)
    device: str | None = Field(default=None, max_length=64)
    items: int  # item ids in the message
    claimed: int  # of those, items this run claimed (the rest were finished or leased elsewhere)
    done: int
    failed: int
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    output_tokens: int = Field(default=0, sa_type=BigInteger)
    artifacts: int = 0  # files written (the images of image_set items)
    started_at: datetime = Field(sa_type=DateTime(timezone=True))
    finished_at: datetime = Field(sa_type=DateTime(timezone=True), index=True)
    duration_ms: float


class File(SQLModel, table=True):
    """A file of the OpenAI-compatible API: an uploaded batch input, or a batch's output or
    error file (made from ``results`` when read; ``job_id`` and ``content`` say which)."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("job_id", "content", name="uq_files_job_content"),)

    id: str = Field(primary_key=True, max_length=64)  # file-<24 hex>
    owner: str = Field(max_length=255, index=True)  # the API key's name
    purpose: str = Field(max_length=32)  # batch (uploads), batch_output (made by aigc)
    filename: str = Field(max_length=255)
    bytes: int | None = Field(default=None, sa_type=BigInteger)  # outputs: counted on first read
    uri: str | None = Field(default=None, sa_type=Text)  # uploads: where the artifact store keeps it
    job_id: str | None = Field(default=None, foreign_key="jobs.id", max_length=36)
    content: str | None = Field(default=None, max_length=16)  # output | error (of job_id)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    deleted_at: datetime | None = _ts()
class Counter(SQLModel, table=True):
    """Named counters taken under a row lock; 'results' numbers ``results.seq``."""

    __tablename__ = "counters"

    name: str = Field(primary_key=True, max_length=64)
    value: int = Field(sa_type=BigInteger)
