"""Completion windows: a batch still running past its ``expires_at`` becomes ``expired``.

Expiring is cancelling with a reason: pending items never start, items running finish, and
every result already written stays (the batch's output file has them). ``jobs.expired_at``
is the reason; the job itself goes ``cancelling`` → ``cancelled`` as any cancelled job does,
so workers need to know nothing new. The server checks every few seconds, a batch read past
its window is expired on the spot, and ``aigc sweep`` expires on every pass (no server needed).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from sqlalchemy import Engine
from sqlmodel import Session

from aigc.schemas import lifecycle
from aigc.schemas.enums import ACTIVE_JOB_STATUSES
from aigc.schemas.tables import Job, utcnow

log = logging.getLogger("aigc.api")
CHECK_SECONDS = 5.0


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite: naive UTC


def expire(engine: Engine, job_id: str) -> bool:
    """Expire one active job now; whether it was expired by this call."""
    if expired := lifecycle.expire(engine=engine, job_id=job_id):
        log.info("batch of job %s expired: its completion window ended", job_id)
    return expired


def expire_overdue(engine: Engine) -> list[str]:
    """Expire every active batch past its window; their job ids."""
    expired = lifecycle.expire_overdue(engine=engine)
    for job_id in expired:
        log.info("batch of job %s expired: its completion window ended", job_id)
    return expired


def expire_if_overdue(engine: Engine, job: Job) -> Job:
    """``job``, expired first if it is past its window (and read again if it was)."""
    if (job.expires_at is None or job.expired_at is not None or job.status not in ACTIVE_JOB_STATUSES
            or _aware(job.expires_at) > utcnow()):
        return job
    expire(engine, job.id)
    with Session(engine, expire_on_commit=False) as session:
        return session.get(Job, job.id) or job


async def keep_expiring(engine: Engine, every: float = CHECK_SECONDS) -> None:
    """Run :func:`expire_overdue` every ``every`` seconds until cancelled; errors are logged."""
    while True:
        try:
            await asyncio.to_thread(expire_overdue, engine)
        except Exception:  # the database may be away for a while: try again next round
            log.exception("checking completion windows failed")
        await asyncio.sleep(every)
