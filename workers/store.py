"""The worker's SQL: claim items by lease, write results by upsert, keep job counts current.

Every function takes the engine keyword-only and runs in its own short transaction, so a
crash between two calls leaves the rows consistent: an item is either still leased (and its
lease expires) or done with exactly one result row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, exists, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from schemas import lifecycle
from schemas.enums import ItemStatus, JobStatus
from schemas.tables import ChunkRun, Item, Job, Result, utcnow


@dataclass(frozen=True)
class JobInfo:
    id: str
    kind: str
    model: str
    params: dict[str, Any]
    status: str


@dataclass(frozen=True)
class ClaimedItem:
    id: int
    custom_id: str
    index: int
    input: dict[str, Any]
    attempts: int = 1


def load_job(*, engine: Engine, job_id: str) -> JobInfo | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(Job.id, Job.kind, Job.model, Job.params, Job.status).where(Job.id == job_id)
        ).first()
    return JobInfo(*row) if row else None


def claim(*, engine: Engine, job_id: str, item_ids: list[int], owner: str,
          lease_seconds: int) -> list[ClaimedItem]:
    """Lease those of ``item_ids`` that are pending or whose lease expired; return them."""
    now = utcnow()
    claimable = or_(Item.status == ItemStatus.pending,
                    and_(Item.status == ItemStatus.leased, Item.lease_expires_at < now))
    job_active = exists().where(Job.id == job_id, Job.status.in_(lifecycle.ACTIVE))
    statement = (
        update(Item)
        .where(Item.job_id == job_id, Item.id.in_(item_ids), claimable, job_active)
        .values(status=ItemStatus.leased, lease_owner=owner, attempts=Item.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        .returning(Item.id, Item.custom_id, Item.index, Item.input, Item.attempts)
    )
    with engine.begin() as connection:
        rows = connection.execute(statement).all()
    return sorted((ClaimedItem(*row) for row in rows), key=lambda item: item.index)


def mark_running(*, engine: Engine, job_id: str) -> None:
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
                           .values(status=JobStatus.running, started_at=now, updated_at=now))


# Every row of one bulk insert must name the same columns.
_NULLABLE_RESULT_COLUMNS = {c.name: None for c in Result.__table__.columns
                            if c.nullable and not c.primary_key}


def _insert_ignoring_duplicates(engine: Engine):
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(Result).on_conflict_do_nothing(index_elements=["job_id", "custom_id"])


def write_results(*, engine: Engine, job_id: str, rows: list[dict[str, Any]], owner: str) -> tuple[int, int]:
    """Upsert result rows, finish their items, bump the job's counts; one transaction.

    Only items this ``owner`` still holds are counted, so a redelivered or duplicated chunk
    cannot count an item twice. Returns ``(done, failed)`` as counted.
    """
    now = utcnow()
    rows = [{**_NULLABLE_RESULT_COLUMNS, "created_at": now, **row} for row in rows]
    counted = {}
    with engine.begin() as connection:
        connection.execute(_insert_ignoring_duplicates(engine), rows)
        for status in (ItemStatus.done, ItemStatus.error):
            ids = [r["item_id"] for r in rows if (r["error_code"] is None) == (status == ItemStatus.done)]
            counted[status] = 0
            if ids:
                counted[status] = connection.execute(
                    update(Item)
                    .where(Item.id.in_(ids), Item.status == ItemStatus.leased, Item.lease_owner == owner)
                    .values(status=status, lease_expires_at=None, updated_at=now)
                ).rowcount
        if counted[ItemStatus.done] or counted[ItemStatus.error]:
            connection.execute(
                update(Job).where(Job.id == job_id)
                .values(done=Job.done + counted[ItemStatus.done],
                        failed=Job.failed + counted[ItemStatus.error], updated_at=now)
            )
    return counted[ItemStatus.done], counted[ItemStatus.error]


def release(*, engine: Engine, item_ids: list[int], owner: str,
            to: ItemStatus = ItemStatus.pending) -> int:
    """Give up items this owner holds: back to ``pending`` (a transient failure: they will be
    retried) or ``cancelled`` (their job was cancelled). Returns how many moved."""
    if not item_ids:
        return 0
    with engine.begin() as connection:
        return connection.execute(
            update(Item).where(Item.id.in_(item_ids), Item.status == ItemStatus.leased,
                               Item.lease_owner == owner)
            .values(status=to, lease_owner=None, lease_expires_at=None, updated_at=utcnow())
        ).rowcount


def finish_if_complete(*, engine: Engine, job_id: str) -> str | None:
    """Move the job to its final state once every item is done or failed; the new status."""
    now = utcnow()
    final = case(
        (Job.done == 0, JobStatus.failed),
        (Job.failed > 0, JobStatus.completed_with_errors),
        else_=JobStatus.completed,
    )
    with engine.begin() as connection:
        changed = connection.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.running]),
                   Job.done + Job.failed >= Job.total)
            .values(status=final, finished_at=now, updated_at=now)
        ).rowcount
        if not changed:
            return None
        return connection.execute(select(Job.status).where(Job.id == job_id)).scalar_one()


def record_chunk_run(*, engine: Engine, run: dict[str, Any]) -> None:
    """Insert one ``chunk_runs`` row: what a chunk run did and how long it took."""
    with engine.begin() as connection:
        connection.execute(insert(ChunkRun), [run])
