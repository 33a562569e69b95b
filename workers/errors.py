"""The worker's errors, with retryability explicit.

A :class:`PermanentError` is the item's fault (or the job's): it becomes an error row and is
never retried. A :class:`TransientError` is the world's fault (database away, out of memory):
the work is retried later.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the worker's own errors; ``code`` is what lands in ``results.error_code``."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class PermanentError(WorkerError):
    """Recorded as an error row for the items concerned; retrying would fail the same way."""


class ModelNotFoundError(PermanentError):
    code = "model_not_found"


class UnknownKindError(PermanentError):
    code = "unknown_kind"


class UnknownArchitectureError(PermanentError):
    code = "unknown_architecture"


class ArtifactPathError(PermanentError):
    """An artifact path that would leave the artifact root (never expected: names are slugs)."""

    code = "artifact_path"


class TransientError(WorkerError):
    """Retried with backoff; the items stay claimable."""

    retryable = True


class DatabaseUnavailable(TransientError):
    """The database stayed unreachable longer than ``AIGC_DB_OUTAGE_SECONDS``."""

    code = "database_unavailable"

