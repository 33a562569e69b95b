"""Changing a job's course after submission: cancel it, or resume it after messages were lost.

Both are durable: they change rows in SQL first, and the workers read those rows.
"""

from __future__ import annotations

from sqlalchemy import and_, or_, select

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
    resumable = or_(Item.status == ItemStatus.pending,
                    and_(Item.status == ItemStatus.leased, Item.lease_expires_at < utcnow()))
    return enqueue(settings, engine, job_id, job.kind, job.priority, where=resumable)
