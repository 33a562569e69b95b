"""Celery tasks: thin wrappers that hand a chunk to the runner (the logic lives there)."""

from __future__ import annotations

from typing import Any

from celery import Task

from aigc.schemas.dispatch import LEGACY_TASK, chunk_message, task_name
from aigc.schemas.enums import Kind
from aigc.schemas.settings import get_settings

from .app import app
from .contract import JobInfo
from .retry import RetryPolicy
from .runner import run_chunk

# The one policy of this worker process: Celery retries chunks by it (autoretry_for a
# TransientError, 5, 10, 20, 40 s apart) and the runner claims, re-runs and rides out
# database outages by it.
POLICY = RetryPolicy.from_settings(get_settings())


def generate_chunk(self: Task, job_id: str, item_ids: list[int], items: int | None = None) -> dict[str, Any]:
    """Generate results for a chunk of one job's items (ids only; the rows are in SQL).

    ``items`` is the chunk's size, sent so that Flower shows it; the ids are what count. A
    :class:`TransientError` from the runner is retried by Celery (``POLICY.task_options()``).
    """
    return run_chunk(job_id, item_ids, worker=self.request.hostname, settings=get_settings(),
                     policy=POLICY, last_attempt=POLICY.is_last_try(self.request.retries),
                     requeue=requeue)


def requeue(job: JobInfo, priority: int, item_ids: list[int]) -> None:
    """Send items of ``job`` as a chunk of their own, as the producer does (items that joined
    another chunk's batches and were handed back unfinished)."""
    app.send_task(**chunk_message(job.kind, job.id, item_ids, priority), retry=True)


# One task per kind (aigc.article, ...), all the same function; and the old name for messages
# queued before an upgrade.
TASKS = {name: app.task(name=name, bind=True, **POLICY.task_options())(generate_chunk)
         for name in [*(task_name(kind) for kind in Kind), LEGACY_TASK]}
