"""The worker's SQL: claim items by lease, write results by upsert, keep job counts current.

Every function takes the engine keyword-only and runs in its own short transaction, so a
crash between two calls leaves the rows consistent: an item is either still leased (and its
lease expires) or done with exactly one result row. Each function is also safe to run twice,
which is what lets the runner call it through ``RetryPolicy.ride_out`` (workers/retry.py)
and repeat it through a database outage.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from aigc.schemas import lifecycle
from aigc.schemas.enums import ACTIVE_JOB_STATUSES, ItemStatus, JobStatus
from aigc.schemas.tables import ChunkRun, Counter, Item, Job, Result, utcnow

from .contract import ClaimedItem, JobInfo, ResultRow


def load_job(*, engine: Engine, job_id: str) -> JobInfo | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(Job.id, Job.kind, Job.model, Job.params, Job.status, Job.priority).where(Job.id == job_id)
        ).first()
    return JobInfo(*row) if row else None


def claim(*, engine: Engine, job_id: str, item_ids: list[int], owner: str,
          lease_seconds: int, fresh_only: bool = False) -> list[ClaimedItem]:
    """Lease those of ``item_ids`` that are pending, whose lease expired, or that ``owner``
    itself holds from an earlier run that did not finish (a worker runs one chunk at a time,
    so that run is over); return them. ``fresh_only``: only pending items never claimed
    before (what a run may join to its batches)."""
    now = utcnow()
    claimable = or_(Item.status == ItemStatus.pending,
                    and_(Item.status == ItemStatus.leased,
                         or_(Item.lease_expires_at < now, Item.lease_owner == owner)))
    if fresh_only:
        claimable = and_(Item.status == ItemStatus.pending, Item.attempts == 0)
    job_active = exists().where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
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


def waiting_items(*, engine: Engine, model: str, kinds: list[str], limit: int
                  ) -> list[tuple[str, int, list[int]]]:
    """Up to ``limit`` items no worker has claimed yet of active jobs of ``kinds`` on ``model``:
    ``(job id, job priority, item ids)`` per job, higher priority and older jobs first, each
    job's items in submission order."""
    statement = (
        select(Item.job_id, Job.priority, Item.id)
        .join(Job, Job.id == Item.job_id)
        .where(Job.status.in_(ACTIVE_JOB_STATUSES), Job.model == model, Job.kind.in_(kinds),
               Item.status == ItemStatus.pending, Item.attempts == 0)
        .order_by(Job.priority.desc(), Job.created_at, Job.id, Item.index)
        .limit(limit)
    )
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
    by_job: dict[str, tuple[str, int, list[int]]] = {}
    for job_id, priority, item_id in rows:
        by_job.setdefault(job_id, (job_id, priority, []))[2].append(item_id)
    return list(by_job.values())


def mark_running(*, engine: Engine, job_id: str) -> None:
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
                           .values(status=JobStatus.running, started_at=now, updated_at=now))


def _insert_ignoring_duplicates(engine: Engine) -> Any:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(Result).on_conflict_do_nothing(index_elements=["job_id", "custom_id"])


def write_results(*, engine: Engine, job_id: str, rows: list[ResultRow], owner: str,
                  run: dict[str, Any] | None = None) -> tuple[int, int]:
    """Upsert result rows, finish their items, bump the job's counts; one transaction.

    Only items this ``owner`` still holds are counted, so a redelivered or duplicated chunk
    cannot count an item twice. With ``run`` (``{"id", "duration_ms"}``), the chunk run's
    ``chunk_runs`` row takes what was counted in the same transaction, so a run killed later
    still accounts for every row it committed. Returns ``(done, failed)`` as counted.
    """
    now = utcnow()
    counted: dict[str, list[int]] = {}
    with engine.begin() as connection:
        # The counter's row lock is held until this transaction commits: rows become visible in
        # seq order, which is what lets readers page with `seq > :last` (docs/results-table.md).
        last = connection.execute(update(Counter).where(Counter.name == "results")
                                  .values(value=Counter.value + len(rows))
                                  .returning(Counter.value)).scalar_one()
        # Every row names every column (one bulk insert); ids and seq are assigned here.
        values = [{**dict(row), "created_at": row.created_at or now, "seq": last - len(rows) + i + 1}
                  for i, row in enumerate(rows)]
        connection.execute(_insert_ignoring_duplicates(engine), values)
        for status in (ItemStatus.done, ItemStatus.error):
            ids = [r.item_id for r in rows if r.failed == (status == ItemStatus.error)]
            counted[status] = []
            if ids:
                counted[status] = list(connection.execute(
                    update(Item)
                    .where(Item.id.in_(ids), Item.status == ItemStatus.leased, Item.lease_owner == owner)
                    .values(status=status, lease_expires_at=None, updated_at=now)
                    .returning(Item.id)
                ).scalars())
        done, failed = len(counted[ItemStatus.done]), len(counted[ItemStatus.error])
        if done or failed:
            connection.execute(
                update(Job).where(Job.id == job_id)
                .values(done=Job.done + done, failed=Job.failed + failed, updated_at=now)
            )
        if run is not None:
            mine = set(counted[ItemStatus.done]) | set(counted[ItemStatus.error])
            mine_rows = [r for r in rows if r.item_id in mine]
            connection.execute(
                update(ChunkRun).where(ChunkRun.id == run["id"]).values(
                    done=ChunkRun.done + done, failed=ChunkRun.failed + failed,
                    prompt_tokens=ChunkRun.prompt_tokens + sum(r.prompt_tokens or 0 for r in mine_rows),
                    output_tokens=ChunkRun.output_tokens + sum(r.output_tokens or 0 for r in mine_rows),
                    artifacts=ChunkRun.artifacts + sum(len(r.artifact_uris or ()) for r in mine_rows),
                    device=func.coalesce(ChunkRun.device, next((r.device for r in mine_rows
                                                                 if r.device), None)),
                    finished_at=now, duration_ms=run["duration_ms"]))
    return done, failed


def renew_leases(*, engine: Engine, item_ids: list[int], owner: str, lease_seconds: float) -> int:
    """The heartbeat: push back the lease of those items this owner still holds; how many.

    Not retried through an outage: a missed beat is tried again at the next one."""
    if not item_ids:
        return 0
    with engine.begin() as connection:
        return connection.execute(
            update(Item).where(Item.id.in_(item_ids), Item.status == ItemStatus.leased,
                               Item.lease_owner == owner)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        ).rowcount


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
            .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES),
                   Job.done + Job.failed >= Job.total)
            .values(status=final, finished_at=now, updated_at=now)
        ).rowcount
        if not changed:
            return None
        return connection.execute(select(Job.status).where(Job.id == job_id)).scalar_one()


def add_attempts(*, engine: Engine, item_ids: list[int], delta: int) -> None:
    """Shift the attempt count of items this process holds (see the runner's careful mode)."""
    if item_ids:
        with engine.begin() as connection:
            connection.execute(update(Item).where(Item.id.in_(item_ids))
                               .values(attempts=Item.attempts + delta))


def job_status(*, engine: Engine, job_id: str) -> str | None:
    return lifecycle.job_status(engine=engine, job_id=job_id)


def finish_cancel(*, engine: Engine, job_id: str) -> bool:
    return lifecycle.finish_cancel(engine=engine, job_id=job_id)


def start_chunk_run(*, engine: Engine, run: dict[str, Any]) -> int:
    """Insert the ``chunk_runs`` row of a run that claimed items (counts at 0); its id.

    :func:`write_results` adds to it as batches commit; :func:`end_chunk_run` closes it.
    """
    now = utcnow()
    row = {"done": 0, "failed": 0, "prompt_tokens": 0, "output_tokens": 0, "artifacts": 0,
           "started_at": now, "finished_at": now, "duration_ms": 0.0, **run}
    with engine.begin() as connection:
        return connection.execute(insert(ChunkRun).values(**row).returning(ChunkRun.id)).scalar_one()


def count_joined(*, engine: Engine, run_id: int, items: int) -> None:
    """Items that joined a run: its ``chunk_runs`` row counts them as sent and claimed."""
    with engine.begin() as connection:
        connection.execute(update(ChunkRun).where(ChunkRun.id == run_id)
                           .values(items=ChunkRun.items + items, claimed=ChunkRun.claimed + items))


def end_chunk_run(*, engine: Engine, run_id: int, duration_ms: float) -> None:
    """The run is over: its busy time runs to now."""
    with engine.begin() as connection:
        connection.execute(update(ChunkRun).where(ChunkRun.id == run_id)
                           .values(finished_at=utcnow(), duration_ms=duration_ms))
