"""Celery tasks: thin wrappers that hand a chunk to the runner (the logic lives there)."""

from __future__ import annotations

from typing import Any

from schemas.dispatch import TASK_GENERATE
from schemas.settings import get_settings

from .app import app
from .runner import run_chunk


@app.task(name=TASK_GENERATE, bind=True)
def generate_chunk(self, job_id: str, item_ids: list[int]) -> dict[str, Any]:
    """Generate results for a chunk of one job's items (ids only; the rows are in SQL)."""
    return run_chunk(job_id, item_ids, worker=self.request.hostname, settings=get_settings())
