"""Celery tasks: thin wrappers that hand a chunk to the runner (the logic lives there)."""

from __future__ import annotations

from typing import Any

from schemas.dispatch import LEGACY_TASK, task_name
from schemas.enums import Kind
from schemas.settings import get_settings

from .app import app
from .errors import TransientError
from .runner import run_chunk


MAX_RETRIES = 4  # transient failures (out of memory): retried after 5, 10, 20, 40 s


def generate_chunk(self, job_id: str, item_ids: list[int], items: int | None = None) -> dict[str, Any]:
    """Generate results for a chunk of one job's items (ids only; the rows are in SQL).

    ``items`` is the chunk's size, sent so that Flower shows it; the ids are what count.
    """
    try:
        return run_chunk(job_id, item_ids, worker=self.request.hostname, settings=get_settings(),
                         last_attempt=self.request.retries >= MAX_RETRIES)
    except TransientError as exc:
        raise self.retry(exc=exc, countdown=5 * 2 ** self.request.retries) from None


# One task per kind (aigc.article, ...), all the same function; and the old name for messages
# queued before an upgrade.
TASKS = {name: app.task(name=name, bind=True, max_retries=MAX_RETRIES)(generate_chunk)
         for name in [*(task_name(kind) for kind in Kind), LEGACY_TASK]}
