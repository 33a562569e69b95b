"""Changing a job's course after submission: cancel it, or resume it after messages were lost.

Both are durable: they change rows in SQL first, and the workers read those rows.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update

from schemas import lifecycle
from schemas.db import ensure_schema
from schemas.enums import ItemStatus, JobStatus
from schemas.settings import Settings, get_settings
from schemas.tables import Item, Job, utcnow

from .dispatch import enqueue


def cancel(job_id: str, *, settings: Settings | None = None) -> str:
    """Cancel a job: pending items never start; finished results are kept. The new status.

    Items a worker is running right now finish; the job is ``cancelling`` until they have,
    then ``cancelled``. Cancelling a finished job changes nothing.
    """
    engine = ensure_schema((settings or get_settings()).database_url)
    if lifecycle.request_cancel(engine=engine, job_id=job_id) is None:
        raise LookupError(f"no job {job_id}")
    lifecycle.finish_cancel(engine=engine, job_id=job_id)
    return lifecycle.job_status(engine=engine, job_id=job_id)


def resume(job_id: str, *, settings: Settings | None = None) -> int:
    """Re-send the job's items that are neither finished nor held by a live lease.

    For when messages were lost (Redis flushed or restarted without persistence, a submit
    whose broker was down). Sending an item twice is harmless: workers claim each item once.
    Returns the number of items sent.
    """
    settings = settings or get_settings()
    engine = ensure_schema(settings.database_url)
    with engine.connect() as connection:
        job = connection.execute(select(Job.kind, Job.status, Job.priority)
                                 .where(Job.id == job_id)).first()
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.status in (JobStatus.cancelling, JobStatus.cancelled):
        raise ValueError(f"job {job_id} is {job.status}; a cancelled job is not resumed")
    sent = enqueue(settings, engine, job_id, job.kind, job.priority, where=_resumable())
    with engine.begin() as connection:  # the sweeper leaves a freshly resumed job alone a while
        connection.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
    return sent


def _resumable() -> Any:
    """Items neither finished nor held by a live lease."""
    return or_(Item.status == ItemStatus.pending,
               and_(Item.status == ItemStatus.leased, Item.lease_expires_at < utcnow()))


def sweep(*, stale_seconds: float = 600, settings: Settings | None = None) -> dict[str, int]:
    """Resume every active job that made no progress for ``stale_seconds`` and has items to run.

    Catches what no single worker can: messages lost with a flushed or restarted Redis, and
    leases left behind by a worker that died. Returns {job id: items re-sent}.
    """
    settings = settings or get_settings()
    engine = ensure_schema(settings.database_url)
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    has_work = exists().where(Item.job_id == Job.id, _resumable())
    with engine.connect() as connection:
        stale = connection.execute(
            select(Job.id).where(Job.status.in_(lifecycle.ACTIVE), Job.updated_at < cutoff, has_work)
        ).scalars().all()
    return {job_id: resume(job_id, settings=settings) for job_id in stale}
