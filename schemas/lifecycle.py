"""Job state transitions that both the producer and the workers perform, in SQL.

queued → running → completed | completed_with_errors | failed, and at any point before the end
queued/running → cancelling → cancelled. Each transition is one conditional UPDATE, so two
processes racing to make it cannot make it twice. Expiring (an API batch past its completion
window) is cancelling with ``jobs.expired_at`` set as the reason.
"""

from __future__ import annotations

from sqlalchemy import Engine, exists, select, update

from .enums import ACTIVE_JOB_STATUSES, ItemStatus, JobStatus
from .tables import Item, Job, utcnow


def request_cancel(*, engine: Engine, job_id: str) -> str | None:
    """Mark an active job ``cancelling`` and its pending items ``cancelled``; its old status.

    ``None`` when there is no such job.
    """
    now = utcnow()
    with engine.begin() as connection:
        status = connection.execute(select(Job.status).where(Job.id == job_id)).scalar()
        if status in ACTIVE_JOB_STATUSES:
            connection.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES)).values(
                status=JobStatus.cancelling, cancel_requested_at=now, updated_at=now))
            connection.execute(update(Item)
                               .where(Item.job_id == job_id, Item.status == ItemStatus.pending)
                               .values(status=ItemStatus.cancelled, updated_at=now))
    return status


def finish_cancel(*, engine: Engine, job_id: str) -> bool:
    """``cancelling`` → ``cancelled`` once no item of the job is leased; whether it moved."""
    now = utcnow()
    busy = exists().where(Item.job_id == job_id, Item.status == ItemStatus.leased)
    with engine.begin() as connection:
        return bool(connection.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.cancelling, ~busy)
            .values(status=JobStatus.cancelled, finished_at=now, updated_at=now)).rowcount)


def job_status(*, engine: Engine, job_id: str) -> str | None:
    with engine.connect() as connection:
        return connection.execute(select(Job.status).where(Job.id == job_id)).scalar()


def expire(*, engine: Engine, job_id: str) -> bool:
    """Expire one active job now (cancel it, ``expired_at`` the reason); whether this call did."""
    now = utcnow()
    with engine.begin() as connection:
        changed = connection.execute(
            update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES),
                              Job.expired_at.is_(None))
            .values(expired_at=now, updated_at=now)).rowcount
    if changed:
        request_cancel(engine=engine, job_id=job_id)
        finish_cancel(engine=engine, job_id=job_id)
    return bool(changed)


def expire_overdue(*, engine: Engine) -> list[str]:
    """Expire every active job past its ``expires_at`` (API batches); their ids."""
    with engine.connect() as connection:
        overdue = connection.execute(select(Job.id).where(
            Job.expires_at < utcnow(), Job.status.in_(ACTIVE_JOB_STATUSES), Job.expired_at.is_(None))
        ).scalars().all()
    return [job_id for job_id in overdue if expire(engine=engine, job_id=job_id)]
