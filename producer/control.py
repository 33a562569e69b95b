"""Changing a job's course after submission: cancel it, or resume it after messages were lost.

Both are durable: they change rows in SQL first, and the workers read those rows.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update

from aigc.schemas import lifecycle
from aigc.schemas.db import ensure_schema
from aigc.schemas.enums import ACTIVE_JOB_STATUSES, ItemStatus, JobStatus
from aigc.schemas.settings import Settings, get_settings
from aigc.schemas.tables import Item, Job, utcnow

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
    return _resend(settings, engine, job_id, job.kind, job.priority, _resumable())


def _resend(settings: Settings, engine: Any, job_id: str, kind: str, priority: int, where: Any) -> int:
    sent = enqueue(settings, engine, job_id, kind, priority, where=where)
    with engine.begin() as connection:  # the sweeper leaves a freshly resumed job alone a while
        connection.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
    return sent


def _resumable() -> Any:
    """Items neither finished nor held by a live lease."""
    return or_(Item.status == ItemStatus.pending,
               and_(Item.status == ItemStatus.leased, Item.lease_expires_at < utcnow()))


def expire_overdue(*, settings: Settings | None = None) -> list[str]:
    """Expire every API batch past its completion window (cancel it, ``expired_at`` the
    reason: running items finish, results stay); their job ids. ``aigc serve`` does this too,
    while it runs; :func:`sweep` does it first on every pass, so no server is needed."""
    settings = settings or get_settings()
    return lifecycle.expire_overdue(engine=ensure_schema(settings.database_url))


def sweep(*, stale_seconds: float = 600, settings: Settings | None = None) -> dict[str, int]:
    """Re-send what no worker will run otherwise; returns {job id: items re-sent}.

    - API batches past their completion window are expired first (:func:`expire_overdue`):
      nothing of theirs is re-sent.
    - Items whose lease expired: live workers renew their leases (a heartbeat), so their
      worker died. They go back to ``pending`` and are re-sent at once; those of a cancelling
      job become ``cancelled`` instead, so the job can reach ``cancelled``.
    - Active jobs that made no progress for ``stale_seconds`` and have items to run: their
      messages were lost (Redis flushed or restarted without persistence): every item neither
      finished nor leased is re-sent.
    """
    settings = settings or get_settings()
    engine = ensure_schema(settings.database_url)
    lifecycle.expire_overdue(engine=engine)
    sent = _release_expired(settings, engine)
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    has_work = exists().where(Item.job_id == Job.id, _resumable())
    with engine.connect() as connection:
        stale = connection.execute(
            select(Job.id).where(Job.status.in_(ACTIVE_JOB_STATUSES), Job.updated_at < cutoff, has_work)
        ).scalars().all()
    for job_id in stale:
        sent[job_id] = sent.get(job_id, 0) + resume(job_id, settings=settings)
    return sent


def _release_expired(settings: Settings, engine: Any) -> dict[str, int]:
    """Expired leases back to ``pending`` (re-sent) or, in a cancelling job, ``cancelled``."""
    now = utcnow()
    expired = and_(Item.status == ItemStatus.leased, Item.lease_expires_at < now)

    def free(statuses: tuple[str, ...], to: ItemStatus) -> dict[str, list[int]]:
        of_job = exists().where(Job.id == Item.job_id, Job.status.in_(statuses))
        with engine.begin() as connection:
            rows = connection.execute(
                update(Item).where(expired, of_job)
                .values(status=to, lease_owner=None, lease_expires_at=None, updated_at=now)
                .returning(Item.id, Item.job_id)).all()
        by_job: dict[str, list[int]] = {}
        for item_id, job_id in rows:
            by_job.setdefault(job_id, []).append(item_id)
        return by_job

    for job_id in free((JobStatus.cancelling,), ItemStatus.cancelled):
        lifecycle.finish_cancel(engine=engine, job_id=job_id)
    sent = {}
    for job_id, ids in free(ACTIVE_JOB_STATUSES, ItemStatus.pending).items():
        with engine.connect() as connection:
            job = connection.execute(select(Job.kind, Job.priority).where(Job.id == job_id)).one()
        sent[job_id] = _resend(settings, engine, job_id, job.kind, job.priority, Item.id.in_(ids))
    return sent
