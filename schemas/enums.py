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

    @property
    def is_active(self) -> bool:
        return self in ACTIVE_JOB_STATUSES


# The job status sets, each defined here once; tuples so that SQL `IN (...)` lists are stable.
# Active: work goes on; items may be claimed, the job cancelled, its lost messages re-sent.
ACTIVE_JOB_STATUSES = (JobStatus.queued, JobStatus.running)
# Terminal: nothing will change any more.
TERMINAL_JOB_STATUSES = (JobStatus.completed, JobStatus.completed_with_errors, JobStatus.failed,
                         JobStatus.cancelled)
# Unfinished: not terminal yet (active, or cancelling while its running items finish).
UNFINISHED_JOB_STATUSES = tuple(status for status in JobStatus if status not in TERMINAL_JOB_STATUSES)


class ItemStatus(StrEnum):
    pending = "pending"
    leased = "leased"
    done = "done"
    error = "error"
    cancelled = "cancelled"
