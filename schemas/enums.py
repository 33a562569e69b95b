"""Status and kind enums: the values stored in SQL and used as registry keys and queue names."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """A job kind: one snake_case word, used as enum value, registry key and queue name."""

    article = "article"
    ad_copy = "ad_copy"
    image_set = "image_set"

    @property
    def is_text(self) -> bool:
        return self in (Kind.article, Kind.ad_copy)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    completed_with_errors = "completed_with_errors"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATUSES


TERMINAL_JOB_STATUSES = frozenset(
    {JobStatus.completed, JobStatus.completed_with_errors, JobStatus.failed, JobStatus.cancelled}
)


class ItemStatus(StrEnum):
    pending = "pending"
    leased = "leased"
    done = "done"
    error = "error"
    cancelled = "cancelled"
