"""One chunk of one job, start to finish: claim, generate in batches, record, finish."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aigc.schemas.db import get_engine
from aigc.schemas.enums import ItemStatus, JobStatus
from aigc.schemas.settings import Settings

from . import store
from .contract import ClaimedItem, JobInfo, ResultRow, as_result_rows, result_row
from .errors import PermanentError, TransientError
from .registry import backend_for, get_generator, kinds_of
from .retry import RetryPolicy
from .shutdown import SHUTDOWN

log = logging.getLogger("aigc.worker")


@dataclass
class _Part:
    """One job's items in a run: the chunk's own (the first part), or another job's that
    joined its batches. ``items`` shrinks to the unfinished as rows come back."""

    job: JobInfo
    items: list[ClaimedItem]
    run_id: int
    claimed: int = 0  # items it joined with


Requeue = Callable[[JobInfo, int, list[int]], None]  # (job, priority, item ids): send them again


def run_chunk(job_id: str, item_ids: list[int], *, worker: str, settings: Settings,
              policy: RetryPolicy, last_attempt: bool = True,
              requeue: Requeue | None = None) -> dict[str, Any]:
    """Run the chunk's claimable items; a failed item or batch is recorded, never raised.

    A :class:`TransientError` (out of memory, say) hands the unfinished items back (pending)
    and is raised for the task to retry, unless this is the ``last_attempt``: then they are
    recorded as errors so the job can finish. Every SQL call rides out a database outage as
    ``policy`` says; its attempt cap and careful re-runs decide which items run and how.

    With ``AIGC_JOIN_JOBS`` and a backend that can (``run_jobs``), waiting items of other jobs
    on the same model join the chunk's batches while its own items run (each job keeps its own
    rows, counts and ``chunk_runs`` row); what of them is left unfinished is handed back and
    sent again with ``requeue``.

    When the worker is stopping (:mod:`aigc.workers.shutdown`), every item the run leaves
    unfinished is handed back the same way, the chunk's own included.
    """
    started = time.monotonic()
    engine = get_engine(settings.database_url)
    owner = f"{worker}/{os.getpid()}"
    job = policy.ride_out(store.load_job, engine=engine, job_id=job_id)
    if job is None:
        # A worker pointed at another database than the producer's: say so loudly.
        log.error("job %s not found in %s; dropping chunk of %d items", job_id,
                  engine.url.render_as_string(hide_password=True), len(item_ids))
        return {"job_id": job_id, "claimed": 0}
    items = claimed = policy.ride_out(store.claim, engine=engine, job_id=job_id, item_ids=item_ids,
                                      owner=owner, lease_seconds=settings.lease_seconds)
    if not items:
        return {"job_id": job_id, "claimed": 0}
    policy.ride_out(store.mark_running, engine=engine, job_id=job_id)
    run_id = policy.ride_out(store.start_chunk_run, engine=engine, run={
        "job_id": job_id, "worker": worker, "items": len(item_ids), "claimed": len(claimed)})
    writer = _Writer(engine, policy, worker, owner, {job_id: run_id}, started)
    heartbeat = _Heartbeat(engine, [item.id for item in claimed], owner, settings.lease_seconds)
    parts = [_Part(job, items, run_id)]
    try:
        poison = [item for item in items if policy.over_cap(item)]
        if poison:
            log.error("job %s: %d item(s) over %d attempts recorded as errors", job_id,
                      len(poison), policy.max_attempts)
            writer.submit(_error_rows(job, poison, "too_many_attempts",
                                      f"claimed more than {policy.max_attempts} times without "
                                      "a result: its worker died or timed out each time"))
            parts[0].items = [item for item in items if not policy.over_cap(item)]
        if policy.runs_singly(parts[0].items):
            _generate_carefully(parts[0], writer, engine, settings, policy, last_attempt)
        elif parts[0].items:
            joiner = _Joiner(parts, writer, heartbeat, engine, settings, policy, worker, owner) \
                if settings.join_jobs else None
            _generate(parts, writer, engine, settings, policy, last_attempt, joiner, requeue)
    finally:
        try:
            writer.close()
        finally:
            heartbeat.stop()
        duration_ms = (time.monotonic() - started) * 1000
        for run_id, job_of in {part.run_id: part.job.id for part in parts}.items():
            _end_run(engine, policy, run_id, job_of, duration_ms)
        items = parts[0].items
        if SHUTDOWN.requested and any(part.items for part in parts):
            log.info("job %s: worker stopping; %d unfinished item(s) of the run handed back",
                     job_id, sum(len(part.items) for part in parts))
        if items and SHUTDOWN.requested:
            _hand_back(parts[0], engine, policy, owner, requeue)
        elif items and policy.ride_out(store.job_status, engine=engine, job_id=job_id) == JobStatus.cancelling:
            policy.ride_out(store.release, engine=engine, item_ids=[item.id for item in items],
                            owner=owner, to=ItemStatus.cancelled)
        # The chunk's job first, then the others in the order they joined (priority, then age):
        # jobs that share a run finish in the order they were admitted. Even when the chunk
        # itself failed: other jobs' items go back, and a job this run finished is marked so
        # (its own message will claim nothing and finish nothing).
        finals = {job_id: _finish(engine, policy, job_id)}
        finals |= _settle_joined(parts, engine, policy, owner, requeue)
    joined = {part.job.id: part.claimed for part in parts[1:]}  # one part per joined job
    for other in [job_id, *(j for j in joined if j != job_id)]:
        final = finals.get(other)
        done, failed = writer.counts.get(other, (0, 0))
        what = (f"chunk of {len(item_ids)} items" + (f" and {joined[job_id]} joined" if job_id in joined else "")
                if other == job_id else f"{joined[other]} items joined to job {job_id}'s batches")
        log.info("job %s: %s: %d done, %d failed in %.0f ms%s%s", other, what, done, failed,
                 duration_ms, f" on {writer.device}" if writer.device else "", f"; job {final}" if final else "",
                 extra={"job_id": other, "items": len(item_ids) if other == job_id else joined[other],
                        "done": done, "failed": failed, "worker": worker, "device": writer.device,
                        "duration_ms": round(duration_ms, 1), "job_status": final})
    done, failed = writer.counts.get(job_id, (0, 0))
    return {"job_id": job_id, "claimed": len(item_ids), "done": done, "failed": failed} | (
        {"joined": joined} if joined else {})


class _Joiner:
    """Claims waiting items of other jobs on the chunk's model for its batches (``more``).

    Only items never claimed before (other chunks of the same job included), of active jobs of
    the kinds the same backend serves, higher priority and older jobs first; only while the
    chunk's own items are running, so a run ends soon after its chunk does. Each other job
    gets its own ``chunk_runs`` row, and the joined items a heartbeat.
    """

    def __init__(self, parts: list[_Part], writer: "_Writer", heartbeat: "_Heartbeat", engine: Any,
                 settings: Settings, policy: RetryPolicy, worker: str, owner: str):
        self.parts, self.writer, self.heartbeat = parts, writer, heartbeat
        self.engine, self.settings, self.policy = engine, settings, policy
        self.worker, self.owner = worker, owner
        self.kinds = kinds_of(backend_for(parts[0].job.kind))

    def __call__(self, room: int) -> list[tuple[JobInfo, list[ClaimedItem]]]:
        primary = self.parts[0]
        if room <= 0 or not primary.items:
            return []
        waiting = self.policy.ride_out(store.waiting_items, engine=self.engine, model=primary.job.model,
                                       kinds=self.kinds, limit=room)
        joined = []
        for job_id, _priority, item_ids in waiting:
            # a job already in the run is not loaded again (the claim checks that it still runs)
            job = next((p.job for p in self.parts if p.job.id == job_id), None) or self.policy.ride_out(
                store.load_job, engine=self.engine, job_id=job_id)
            items = job and self.policy.ride_out(
                store.claim, engine=self.engine, job_id=job_id, item_ids=item_ids, owner=self.owner,
                lease_seconds=self.settings.lease_seconds, fresh_only=True)
            if not items:
                continue  # another worker was quicker, or the job was cancelled meanwhile
            self.policy.ride_out(store.mark_running, engine=self.engine, job_id=job_id)
            part = next((p for p in self.parts[1:] if p.job.id == job_id), None)
            if part is None:  # the chunk's own job's later items count in the chunk's run
                run_id = primary.run_id if job_id == primary.job.id else self.policy.ride_out(
                    store.start_chunk_run, engine=self.engine,
                    run={"job_id": job_id, "worker": self.worker, "items": 0, "claimed": 0})
                part = _Part(job, [], run_id)
                self.parts.append(part)
                self.writer.runs[job_id] = run_id
            part.items += items
            part.claimed += len(items)
            self.policy.ride_out(store.count_joined, engine=self.engine, run_id=part.run_id, items=len(items))
            self.heartbeat.add([item.id for item in items])
            joined.append((job, items))
        return joined


def _generate(parts: list[_Part], writer: "_Writer", engine: Any, settings: Settings,
              policy: RetryPolicy, last_attempt: bool, joiner: _Joiner | None = None,
              requeue: Requeue | None = None) -> None:
    """Generate batch by batch, handing rows to the writer; each part keeps its unfinished items."""
    primary = parts[0]
    job = primary.job
    try:
        backend = get_generator(job.kind, job.model, settings)
        if joiner is not None and hasattr(backend, "run_jobs"):
            batches = backend.run_jobs([(job, primary.items)], more=joiner)
        else:
            batches = backend.run(job, primary.items)
        # Stopping: a backend that says it winds down by itself (text: rows in flight finish
        # within the grace) is cut off only when the grace is over; any other after its batch.
        graceful = getattr(backend, "winds_down_on_shutdown", False)
        for yielded in batches:
            rows = as_result_rows(yielded)
            writer.submit(rows)  # written while the next batch generates
            finished = {row.item_id for row in rows}
            for part in parts:
                part.items = [item for item in part.items if item.id not in finished]
            stopping = SHUTDOWN.overdue if graceful else SHUTDOWN.requested
            if stopping or primary.items and policy.ride_out(
                    store.job_status, engine=engine, job_id=job.id) != JobStatus.running:
                getattr(batches, "close", lambda: None)()  # what has not started never will
                break
        return
    except TransientError as exc:
        writer.flush()  # joined items left unfinished go back to their own jobs after the run
        if not last_attempt:
            policy.ride_out(store.release, engine=engine, item_ids=[item.id for item in primary.items],
                            owner=writer.owner)
            primary.items = []  # pending again: no longer this run's to hand back
            raise
        log.error("job %s: %s (no attempts left)", job.id, exc)
        writer.submit(_error_rows(job, primary.items, exc.code, f"{exc} (after retries)"))
        primary.items = []
    except PermanentError as exc:
        log.error("job %s: %s", job.id, exc)
        for part in parts:
            writer.submit(_error_rows(part.job, part.items, exc.code, str(exc)))
            part.items = []


def _finish(engine: Any, policy: RetryPolicy, job_id: str) -> str | None:
    """The job's final status if it just reached one (every item done or failed, or cancelled)."""
    final = policy.ride_out(store.finish_if_complete, engine=engine, job_id=job_id)
    if policy.ride_out(store.finish_cancel, engine=engine, job_id=job_id):
        final = JobStatus.cancelled
    return final


def _settle_joined(parts: list[_Part], engine: Any, policy: RetryPolicy, owner: str,
                   requeue: Requeue | None) -> dict[str, str | None]:
    """After a run: joined items it left unfinished go back; the other jobs it ran finish."""
    finals: dict[str, str | None] = {}
    for part in parts[1:]:
        try:
            if part.items:  # the chunk's own job was cancelled under it, or the chunk failed
                _hand_back(part, engine, policy, owner, requeue)
            if part.job.id != parts[0].job.id:
                finals[part.job.id] = _finish(engine, policy, part.job.id)
        except Exception:  # not this chunk's items: never mask how the chunk itself ended
            log.exception("job %s: joined items not settled; the sweeper re-sends them", part.job.id)
    return finals


def _hand_back(part: _Part, engine: Any, policy: RetryPolicy, owner: str, requeue: Requeue | None) -> None:
    """A part's unfinished items (joined ones, or any when the worker stops): back to
    ``pending``, their claim not counted as an attempt, and sent again (the message that
    brought them is acknowledged, or gone); ``cancelled`` if their job is."""
    ids = [item.id for item in part.items]
    part.items = []
    if policy.ride_out(store.job_status, engine=engine, job_id=part.job.id) == JobStatus.cancelling:
        policy.ride_out(store.release, engine=engine, item_ids=ids, owner=owner, to=ItemStatus.cancelled)
        return
    policy.ride_out(store.add_attempts, engine=engine, item_ids=ids, delta=-1)
    released = policy.ride_out(store.release, engine=engine, item_ids=ids, owner=owner)
    if not released:
        return
    if requeue is None:
        log.warning("job %s: %d joined item(s) handed back; `aigc sweep` sends them again",
                    part.job.id, released)
        return
    try:
        requeue(part.job, part.job.priority, ids)
    except Exception as exc:  # the broker is away: they are pending in SQL, the sweeper resends
        log.warning("job %s: %d joined item(s) handed back but not sent again (%s); `aigc sweep` "
                    "sends them", part.job.id, released, exc)


def _generate_carefully(part: _Part, writer: "_Writer", engine: Any, settings: Settings,
                        policy: RetryPolicy, last_attempt: bool) -> None:
    """A chunk whose earlier run died: one item at a time, each written before the next.

    One of these items may be what kills the worker. Run singly, only the item actually
    running when the worker dies is charged an attempt (the others' charge from the claim is
    taken back until their turn), so the redelivery cap catches the poison item and no other.
    """
    job, items = part.job, part.items
    log.warning("job %s: %d item(s) of an interrupted chunk rerun one at a time", job.id, len(items))
    policy.ride_out(store.add_attempts, engine=engine, item_ids=[item.id for item in items[1:]], delta=-1)
    for position, item in enumerate(items):
        if position:
            writer.flush()  # the previous item is committed before this one may crash us
            policy.ride_out(store.add_attempts, engine=engine, item_ids=[item.id], delta=1)
        alone = _Part(job, [item], part.run_id)
        if not SHUTDOWN.requested:  # stopping: nothing new starts
            _generate([alone], writer, engine, settings, policy, last_attempt)
        if alone.items:  # cancelled, handed back for a retry, or the worker is stopping
            part.items = items[position:]
            if SHUTDOWN.requested:  # charged as claimed, as the hand-back expects
                policy.ride_out(store.add_attempts, engine=engine,
                                item_ids=[i.id for i in items[position + 1:]], delta=1)
            return
    part.items = []


def _error_rows(job: JobInfo, items: list[ClaimedItem], code: str, message: str) -> list[ResultRow]:
    return [result_row(job, item, params=job.params, error_code=code, error_message=message)
            for item in items]


class _Writer:
    """Writes result batches on one background thread, in order, one batch in flight.

    The forward pass releases the GIL, so a batch's rows are committed while the next batch
    is generated. Rows of several jobs (joined batches) are committed per job, each with its
    ``chunk_runs`` row (``runs``). An error in writing surfaces at the next ``submit``/``flush``/``close``.
    """

    def __init__(self, engine: Any, policy: RetryPolicy, worker: str, owner: str,
                 runs: dict[str, int], started: float):
        self.engine, self.policy = engine, policy
        self.worker, self.owner = worker, owner
        self.runs, self.started = runs, started  # job id -> its chunk_runs row
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aigc-writer")
        self.pending: Future | None = None
        self.counts: dict[str, tuple[int, int]] = {}  # job id -> (done, failed) as counted
        self.device: str | None = None

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            for job_id, (d, f) in pending.result().items():
                done, failed = self.counts.get(job_id, (0, 0))
                self.counts[job_id] = (done + d, failed + f)

    def submit(self, rows: list[ResultRow]) -> None:
        self.device = self.device or next((row.device for row in rows if row.device), None)
        self.flush()
        self.pending = self.pool.submit(self._record, [
            row if row.worker else row.model_copy(update={"worker": self.worker}) for row in rows])

    def _record(self, rows: list[ResultRow]) -> dict[str, tuple[int, int]]:
        by_job: dict[str, list[ResultRow]] = {}
        for row in rows:
            by_job.setdefault(row.job_id, []).append(row)
        counted = {}
        for job_id, mine in by_job.items():
            run = {"id": self.runs[job_id], "duration_ms": (time.monotonic() - self.started) * 1000}
            counted[job_id] = self.policy.ride_out(store.write_results, engine=self.engine, job_id=job_id,
                                                   rows=mine, owner=self.owner, run=run)
        return counted

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.pool.shutdown(wait=True)


class _Heartbeat:
    """Renews the leases of a chunk's items while it runs, every quarter of the lease.

    So a lease can be short (a dead worker's items are free again soon) while a live worker
    keeps its items however long the chunk takes. A failed renewal is logged and tried again
    at the next beat; the results' upsert keeps an item single even if a lease lapses.
    """

    def __init__(self, engine: Any, item_ids: list[int], owner: str, lease_seconds: float):
        self.stopped = threading.Event()
        self.item_ids, self.lock = list(item_ids), threading.Lock()
        self.thread = threading.Thread(target=self._beat, name="aigc-heartbeat", daemon=True,
                                       args=(engine, owner, lease_seconds))
        self.thread.start()

    def add(self, item_ids: list[int]) -> None:
        """Renew these too from now on (items that joined the run)."""
        with self.lock:
            self.item_ids += item_ids

    def _beat(self, engine: Any, owner: str, lease_seconds: float) -> None:
        every = max(lease_seconds / 4, 0.1)
        while not self.stopped.wait(every):
            with self.lock:
                item_ids = list(self.item_ids)
            try:
                store.renew_leases(engine=engine, item_ids=item_ids, owner=owner,
                                   lease_seconds=lease_seconds)
            except Exception as exc:
                log.warning("leases of %d item(s) not renewed (%s); trying again in %.1f s",
                            len(item_ids), type(exc).__name__, every)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def _end_run(engine: Any, policy: RetryPolicy, run_id: int, job_id: str, duration_ms: float) -> None:
    # Statistics only: the results and their counts are committed already, so failing the
    # chunk here (and retrying it) would change nothing but the log.
    try:
        policy.ride_out(store.end_chunk_run, engine=engine, run_id=run_id, duration_ms=duration_ms)
    except Exception:
        log.exception("job %s: chunk_runs row %s not closed", job_id, run_id)
