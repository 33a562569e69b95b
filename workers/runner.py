"""One chunk of one job, start to finish: claim, generate in batches, record, finish."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from aigc.schemas.db import get_engine
from aigc.schemas.enums import ItemStatus, JobStatus
from aigc.schemas.settings import Settings

from . import store
from .contract import ClaimedItem, JobInfo, ResultRow, as_result_rows, result_row
from .errors import PermanentError, TransientError
from .registry import get_generator
from .retry import RetryPolicy

log = logging.getLogger("aigc.worker")


def run_chunk(job_id: str, item_ids: list[int], *, worker: str, settings: Settings,
              policy: RetryPolicy, last_attempt: bool = True) -> dict[str, Any]:
    """Run the chunk's claimable items; a failed item or batch is recorded, never raised.

    A :class:`TransientError` (out of memory, say) hands the unfinished items back (pending)
    and is raised for the task to retry, unless this is the ``last_attempt``: then they are
    recorded as errors so the job can finish. Every SQL call rides out a database outage as
    ``policy`` says; its attempt cap and careful re-runs decide which items run and how.
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
    writer = _Writer(engine, policy, job_id, worker, owner, run_id, started)
    heartbeat = _Heartbeat(engine, [item.id for item in claimed], owner, settings.lease_seconds)
    try:
        poison = [item for item in items if policy.over_cap(item)]
        if poison:
            log.error("job %s: %d item(s) over %d attempts recorded as errors", job_id,
                      len(poison), policy.max_attempts)
            writer.submit(_error_rows(job, poison, "too_many_attempts",
                                      f"claimed more than {policy.max_attempts} times without "
                                      "a result: its worker died or timed out each time"))
            items = [item for item in items if not policy.over_cap(item)]
        if policy.runs_singly(items):
            items = _generate_carefully(job, items, writer, engine, settings, policy, last_attempt)
        elif items:
            items = _generate(job, items, writer, engine, settings, policy, last_attempt)
    finally:
        try:
            done, failed = writer.close()
        finally:
            heartbeat.stop()
        duration_ms = (time.monotonic() - started) * 1000
        _end_run(engine, policy, run_id, job_id, duration_ms)
    if items and policy.ride_out(store.job_status, engine=engine, job_id=job_id) == JobStatus.cancelling:
        policy.ride_out(store.release, engine=engine, item_ids=[item.id for item in items],
                        owner=owner, to=ItemStatus.cancelled)
    final = policy.ride_out(store.finish_if_complete, engine=engine, job_id=job_id)
    if policy.ride_out(store.finish_cancel, engine=engine, job_id=job_id):
        final = JobStatus.cancelled
    log.info("job %s: chunk of %d items: %d done, %d failed in %.0f ms on %s%s", job_id,
             len(item_ids), done, failed, duration_ms, writer.device, f"; job {final}" if final else "",
             extra={"job_id": job_id, "items": len(item_ids), "done": done, "failed": failed,
                    "worker": worker, "device": writer.device, "duration_ms": round(duration_ms, 1),
                    "job_status": final})
    return {"job_id": job_id, "claimed": len(item_ids), "done": done, "failed": failed}


def _generate(job: JobInfo, items: list[ClaimedItem], writer: "_Writer", engine: Any,
              settings: Settings, policy: RetryPolicy, last_attempt: bool) -> list[ClaimedItem]:
    """Generate batch by batch, handing rows to the writer; the items left unfinished."""
    try:
        batches = get_generator(job.kind, job.model, settings).run(job, items)
        for yielded in batches:
            rows = as_result_rows(yielded)
            writer.submit(rows)  # written while the next batch generates
            finished = {row.item_id for row in rows}
            items = [item for item in items if item.id not in finished]
            if items and policy.ride_out(store.job_status, engine=engine, job_id=job.id) != JobStatus.running:
                getattr(batches, "close", lambda: None)()  # cancelled: what has not started never will
                break
        return items
    except TransientError as exc:
        writer.flush()
        if not last_attempt:
            policy.ride_out(store.release, engine=engine, item_ids=[item.id for item in items],
                            owner=writer.owner)
            raise
        log.error("job %s: %s (no attempts left)", job.id, exc)
        writer.submit(_error_rows(job, items, exc.code, f"{exc} (after retries)"))
    except PermanentError as exc:
        log.error("job %s: %s", job.id, exc)
        writer.submit(_error_rows(job, items, exc.code, str(exc)))
    return []


def _generate_carefully(job: JobInfo, items: list[ClaimedItem], writer: "_Writer", engine: Any,
                        settings: Settings, policy: RetryPolicy, last_attempt: bool) -> list[ClaimedItem]:
    """A chunk whose earlier run died: one item at a time, each written before the next.

    One of these items may be what kills the worker. Run singly, only the item actually
    running when the worker dies is charged an attempt (the others' charge from the claim is
    taken back until their turn), so the redelivery cap catches the poison item and no other.
    """
    log.warning("job %s: %d item(s) of an interrupted chunk rerun one at a time", job.id, len(items))
    policy.ride_out(store.add_attempts, engine=engine, item_ids=[item.id for item in items[1:]], delta=-1)
    for position, item in enumerate(items):
        if position:
            writer.flush()  # the previous item is committed before this one may crash us
            policy.ride_out(store.add_attempts, engine=engine, item_ids=[item.id], delta=1)
        if _generate(job, [item], writer, engine, settings, policy, last_attempt):
            return items[position:]  # cancelled, or handed back for a retry
    return []


def _error_rows(job: JobInfo, items: list[ClaimedItem], code: str, message: str) -> list[ResultRow]:
    return [result_row(job, item, params=job.params, error_code=code, error_message=message)
            for item in items]


class _Writer:
    """Writes result batches on one background thread, in order, one batch in flight.

    The forward pass releases the GIL, so a batch's rows are committed while the next batch
    is generated. An error in writing surfaces at the next ``submit``/``flush``/``close``.
    """

    def __init__(self, engine: Any, policy: RetryPolicy, job_id: str, worker: str, owner: str,
                 run_id: int, started: float):
        self.engine, self.policy, self.job_id = engine, policy, job_id
        self.worker, self.owner = worker, owner
        self.run_id, self.started = run_id, started
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aigc-writer")
        self.pending: Future | None = None
        self.done = self.failed = 0
        self.device: str | None = None

    def flush(self) -> None:
        if self.pending is not None:
            d, f = self.pending.result()
            self.done, self.failed, self.pending = self.done + d, self.failed + f, None

    def submit(self, rows: list[ResultRow]) -> None:
        self.device = self.device or next((row.device for row in rows if row.device), None)
        self.flush()
        self.pending = self.pool.submit(self._record, [
            row if row.worker else row.model_copy(update={"worker": self.worker}) for row in rows])

    def _record(self, rows: list[ResultRow]) -> tuple[int, int]:
        run = {"id": self.run_id, "duration_ms": (time.monotonic() - self.started) * 1000}
        return self.policy.ride_out(store.write_results, engine=self.engine, job_id=self.job_id,
                                    rows=rows, owner=self.owner, run=run)

    def close(self) -> tuple[int, int]:
        try:
            self.flush()
        finally:
            self.pool.shutdown(wait=True)
        return self.done, self.failed



class _Heartbeat:
    """Renews the leases of a chunk's items while it runs, every quarter of the lease.

    So a lease can be short (a dead worker's items are free again soon) while a live worker
    keeps its items however long the chunk takes. A failed renewal is logged and tried again
    at the next beat; the results' upsert keeps an item single even if a lease lapses.
    """

    def __init__(self, engine: Any, item_ids: list[int], owner: str, lease_seconds: float):
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="aigc-heartbeat", daemon=True,
                                       args=(engine, item_ids, owner, lease_seconds))
        self.thread.start()

    def _beat(self, engine: Any, item_ids: list[int], owner: str, lease_seconds: float) -> None:
        every = max(lease_seconds / 4, 0.1)
        while not self.stopped.wait(every):
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
