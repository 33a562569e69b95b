"""Celery tasks: thin wrappers that hand a chunk to the runner (the logic lives there)."""

from __future__ import annotations

from typing import Any

from schemas.dispatch import TASK_GENERATE
from schemas.settings import get_settings

from .app import app
from .errors import TransientError
from .runner import run_chunk


MAX_RETRIES = 4  # transient failures (out of memory): retried after 5, 10, 20, 40 s


@app.task(name=TASK_GENERATE, bind=True, max_retries=MAX_RETRIES)
def generate_chunk(self, job_id: str, item_ids: list[int]) -> dict[str, Any]:
    """Generate results for a chunk of one job's items (ids only; the rows are in SQL)."""
    try:
        return run_chunk(job_id, item_ids, worker=self.request.hostname, settings=get_settings(),
                         last_attempt=self.request.retries >= MAX_RETRIES)
    except TransientError as exc:
        raise self.retry(exc=exc, countdown=5 * 2 ** self.request.retries) from None
