"""The runner on a real database with a scripted generator: transient and permanent failures."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from aigc.schemas.db import get_engine
from aigc.schemas.settings import Settings
from aigc.schemas.tables import Item, Job, Result
from aigc.workers import runner
from aigc.workers.errors import ModelNotFoundError, TransientError
from aigc.workers.retry import RetryPolicy

from test_store import make_job


class Scripted:
    """Yields one batch of results for the first ``succeed`` items, then fails as told."""

    def __init__(self, failure: Exception, succeed: int = 2):
        self.failure, self.succeed = failure, succeed

    def run(self, job, items):
        if self.succeed:
            yield [{"job_id": job.id, "item_id": i.id, "custom_id": i.custom_id, "kind": job.kind,
                    "model": job.model, "params": {}, "output_text": "ok"} for i in items[:self.succeed]]
        raise self.failure


def statuses(url: str, job_id: str) -> dict[str, int]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(select(Item.status).where(Item.job_id == job_id)).scalars().all()
    return {s: rows.count(s) for s in set(rows)}


def job_row(url: str, job_id: str):
    with get_engine(url).connect() as connection:
        return connection.execute(select(Job.status, Job.done, Job.failed).where(Job.id == job_id)).one()


def test_transient_failure_hands_items_back_then_errors_on_the_last_attempt(database_url, monkeypatch):
    settings = Settings(database_url=database_url)
    job_id, ids = make_job(database_url, 5)
    monkeypatch.setattr(runner, "get_generator",
                        lambda *a: Scripted(TransientError("out of memory", code="out_of_memory")))

    with pytest.raises(TransientError):
        runner.run_chunk(job_id, ids, worker="w", settings=settings,
                         policy=RetryPolicy.from_settings(settings), last_attempt=False)
    assert statuses(database_url, job_id) == {"done": 2, "pending": 3}
    assert tuple(job_row(database_url, job_id)) == ("running", 2, 0)

    monkeypatch.setattr(runner, "get_generator",
                        lambda *a: Scripted(TransientError("out of memory", code="out_of_memory"), 0))
    result = runner.run_chunk(job_id, ids, worker="w", settings=settings,
                              policy=RetryPolicy.from_settings(settings), last_attempt=True)
    assert result["done"] == 0 and result["failed"] == 3  # the retry claimed only the 3 left
    assert statuses(database_url, job_id) == {"done": 2, "error": 3}
    assert tuple(job_row(database_url, job_id)) == ("completed_with_errors", 2, 3)


def test_permanent_failure_records_the_rest_as_errors(database_url, monkeypatch):
    settings = Settings(database_url=database_url)
    job_id, ids = make_job(database_url, 4)
    monkeypatch.setattr(runner, "get_generator", lambda *a: Scripted(ModelNotFoundError("gone")))

    result = runner.run_chunk(job_id, ids, worker="w", settings=settings,
                              policy=RetryPolicy.from_settings(settings))

    assert (result["done"], result["failed"]) == (2, 2)
    assert tuple(job_row(database_url, job_id)) == ("completed_with_errors", 2, 2)


def test_an_item_that_keeps_killing_its_worker_becomes_an_error(database_url, monkeypatch):
    from sqlalchemy import update

    settings = Settings(database_url=database_url, max_attempts=3)
    job_id, ids = make_job(database_url, 3)
    with get_engine(database_url).begin() as connection:  # three earlier claims died mid-run
        connection.execute(update(Item).where(Item.id == ids[0]).values(attempts=3))
    seen = []

    class Recording:
        def run(self, job, items):
            seen.extend(i.id for i in items)
            yield [{"job_id": job.id, "item_id": i.id, "custom_id": i.custom_id, "kind": job.kind,
                    "model": job.model, "params": {}, "output_text": "ok"} for i in items]

    monkeypatch.setattr(runner, "get_generator", lambda *a: Recording())

    result = runner.run_chunk(job_id, ids, worker="w", settings=settings,
                              policy=RetryPolicy.from_settings(settings))

    assert seen == ids[1:]  # the poison item never reached the generator
    assert (result["done"], result["failed"]) == (2, 1)
    with get_engine(database_url).connect() as connection:
        code = connection.execute(select(Result.error_code).where(Result.item_id == ids[0])).scalar_one()
    assert code == "too_many_attempts"


class Died(BaseException):
    """Stands in for the process dying: nothing in the runner catches it."""


def rerun_job(url: str, n: int) -> tuple[str, list[int]]:
    """A job of ``n`` items that an earlier claim (whose worker died) charged one attempt each:
    the next run of its chunk goes one item at a time."""
    from sqlalchemy import update

    job_id, ids = make_job(url, n)
    with get_engine(url).begin() as connection:
        connection.execute(update(Item).where(Item.id.in_(ids)).values(attempts=1))
    return job_id, ids


def test_a_rerun_chunk_runs_singly_and_charges_only_the_item_that_dies(database_url, monkeypatch):
    settings = Settings(database_url=database_url, max_attempts=5)
    job_id, ids = rerun_job(database_url, 4)
    batches = []

    class DiesOnThird:
        def run(self, job, items):
            batches.append([i.id for i in items])
            if items[0].id == ids[2]:
                raise Died()
            yield [{"job_id": job.id, "item_id": i.id, "custom_id": i.custom_id, "kind": job.kind,
                    "model": job.model, "params": {}, "output_text": "ok"} for i in items]

    monkeypatch.setattr(runner, "get_generator", lambda *a: DiesOnThird())

    with pytest.raises(Died):
        runner.run_chunk(job_id, ids, worker="w", settings=settings,
                         policy=RetryPolicy.from_settings(settings))

    assert batches == [[ids[0]], [ids[1]], [ids[2]]]  # one at a time, in order
    with get_engine(database_url).connect() as connection:
        rows = dict(connection.execute(select(Item.id, Item.attempts).where(Item.job_id == job_id)).all())
    assert [rows[i] for i in ids] == [2, 2, 2, 1]  # the last never ran: not charged
    assert statuses(database_url, job_id)["done"] == 2  # written before the next one started


def test_database_outages_are_waited_out_and_mistakes_are_not():
    import sqlite3

    from sqlalchemy.exc import OperationalError, ProgrammingError

    from aigc.workers.errors import DatabaseUnavailable

    policy = RetryPolicy(outage_seconds=1.0)
    calls = []

    def flaky(failures: int, error: Exception):
        def call():
            calls.append(1)
            if len(calls) <= failures:
                raise error
            return "ok"
        return lambda: policy.ride_out(call)

    locked = OperationalError("UPDATE items", {}, sqlite3.OperationalError("database is locked"))
    assert flaky(2, locked)() == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(DatabaseUnavailable, match="database unreachable for 1 s in call"):
        flaky(100, locked)()
    assert len(calls) > 2
    calls.clear()
    missing = OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: items"))
    with pytest.raises(OperationalError):
        flaky(100, missing)()
    wrong = ProgrammingError("SELECT", {}, Exception("syntax error"))
    with pytest.raises(ProgrammingError):
        flaky(100, wrong)()
    assert len(calls) == 2  # each tried once


def ok_row(job, item) -> dict:
    return {"job_id": job.id, "item_id": item.id, "custom_id": item.custom_id, "kind": job.kind,
            "model": job.model, "params": {}, "output_text": f"ok {item.custom_id}"}


class Joining:
    """A backend that shares batches: asks ``more`` for ``room`` items once, writes the first
    ``succeed`` of everything it holds (its own items first), then fails as told, if told."""

    def __init__(self, room: int = 10, succeed: int = 100, failure: Exception | None = None):
        self.room, self.succeed, self.failure = room, succeed, failure
        self.joined: list[tuple[str, list[int]]] = []

    def run(self, job, items):  # what the runner calls when it may not join (AIGC_JOIN_JOBS=false)
        return self.run_jobs([(job, items)])

    def run_jobs(self, parts, more=None):
        held = list(parts)
        if more is not None:
            got = more(self.room)
            self.joined += [(job.id, [i.id for i in items]) for job, items in got]
            held += got
        rows = [ok_row(job, item) for job, items in held for item in items]
        yield rows[:self.succeed]
        if self.failure:
            raise self.failure


def model_job(url: str, n: int, model: str) -> tuple[str, list[int]]:
    """A job of ``n`` items on ``model``: each test names its own, so that the jobs other tests
    left in the database are never joined."""
    job_id, ids = make_job(url, n)
    set_job(url, job_id, model=model)
    return job_id, ids


def set_job(url: str, job_id: str, **values) -> None:
    from sqlalchemy import update

    with get_engine(url).begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(**values))


def attempts(url: str, ids: list[int]) -> list[int]:
    with get_engine(url).connect() as connection:
        found = dict(connection.execute(select(Item.id, Item.attempts).where(Item.id.in_(ids))).all())
    return [found[i] for i in ids]


def chunk_runs(url: str, job_id: str) -> list[tuple[int, int, int]]:
    from aigc.schemas.tables import ChunkRun

    with get_engine(url).connect() as connection:
        return [tuple(r) for r in connection.execute(
            select(ChunkRun.items, ChunkRun.claimed, ChunkRun.done).where(ChunkRun.job_id == job_id))]


def test_waiting_items_of_other_jobs_join_the_chunks_batches_and_keep_their_own_counts(database_url, monkeypatch):
    model = f"m-{uuid.uuid4()}"
    settings = Settings(database_url=database_url)
    first, first_ids = model_job(database_url, 3, model)
    second, second_ids = model_job(database_url, 2, model)
    set_job(database_url, second, kind="ad_copy", priority=5)  # another kind on the same backend
    backend = Joining()
    monkeypatch.setattr(runner, "get_generator", lambda *a: backend)
    requeued = []

    result = runner.run_chunk(first, first_ids, worker="w", settings=settings,
                              policy=RetryPolicy.from_settings(settings), requeue=lambda *a: requeued.append(a))

    assert (result["done"], result["failed"], result["joined"]) == (3, 0, {second: 2})
    assert (second, second_ids) in backend.joined and not requeued
    assert tuple(job_row(database_url, first)) == ("completed", 3, 0)
    assert tuple(job_row(database_url, second)) == ("completed", 2, 0)
    assert chunk_runs(database_url, second) == [(2, 2, 2)]  # its own row in chunk_runs
    assert chunk_runs(database_url, first) == [(3, 3, 3)]
    with get_engine(database_url).connect() as connection:
        texts = dict(connection.execute(select(Result.item_id, Result.output_text)
                                        .where(Result.job_id == second)).all())
    assert texts == {second_ids[0]: "ok c0", second_ids[1]: "ok c1"}
    # The second job's own message comes later and finds nothing left to do.
    late = runner.run_chunk(second, second_ids, worker="w", settings=settings,
                            policy=RetryPolicy.from_settings(settings))
    assert late["claimed"] == 0 and tuple(job_row(database_url, second)) == ("completed", 2, 0)


def test_only_fresh_items_of_active_jobs_on_the_same_model_and_backend_join(database_url, monkeypatch):
    model = f"m-{uuid.uuid4()}"
    settings = Settings(database_url=database_url)
    chunk, chunk_ids = model_job(database_url, 4, model)
    later_of_same_job = chunk_ids[2:]  # its other chunk, still queued: joins, counted in this run
    other_model, _ = model_job(database_url, 2, model)
    set_job(database_url, other_model, model="other")  # not this test's model
    images, _ = model_job(database_url, 2, model)
    set_job(database_url, images, kind="image_set")
    cancelling, _ = model_job(database_url, 2, model)
    set_job(database_url, cancelling, status="cancelling")
    retried, retried_ids = model_job(database_url, 2, model)
    with get_engine(database_url).begin() as connection:  # claimed before: a run died with them
        from sqlalchemy import update
        connection.execute(update(Item).where(Item.id.in_(retried_ids)).values(attempts=1))
    backend = Joining()
    monkeypatch.setattr(runner, "get_generator", lambda *a: backend)

    result = runner.run_chunk(chunk, chunk_ids[:2], worker="w", settings=settings,
                              policy=RetryPolicy.from_settings(settings))

    assert backend.joined == [(chunk, later_of_same_job)]
    assert result["joined"] == {chunk: 2} and result["done"] == 4
    assert tuple(job_row(database_url, chunk)) == ("completed", 4, 0)
    assert chunk_runs(database_url, chunk) == [(4, 4, 4)]
    for job_id in (other_model, images, retried):
        assert set(statuses(database_url, job_id)) == {"pending"}

    backend.joined.clear()
    alone, alone_ids = model_job(database_url, 1, model)
    runner.run_chunk(alone, alone_ids, worker="w", settings=Settings(database_url=database_url, join_jobs=False),
                     policy=RetryPolicy.from_settings(settings))
    assert backend.joined == [] and set(statuses(database_url, other_model)) == {"pending"}


def test_joined_items_go_back_to_their_job_and_are_sent_again_when_the_chunk_fails(database_url, monkeypatch):
    model = f"m-{uuid.uuid4()}"
    settings = Settings(database_url=database_url)
    first, first_ids = model_job(database_url, 2, model)
    second, second_ids = model_job(database_url, 3, model)
    set_job(database_url, second, priority=7)
    backend = Joining(room=10, succeed=1, failure=TransientError("out of memory", code="out_of_memory"))
    monkeypatch.setattr(runner, "get_generator", lambda *a: backend)
    requeued = []

    with pytest.raises(TransientError):
        runner.run_chunk(first, first_ids, worker="w", settings=settings, last_attempt=False,
                         policy=RetryPolicy.from_settings(settings), requeue=lambda *a: requeued.append(a))

    assert statuses(database_url, first) == {"done": 1, "pending": 1}  # its own retry runs the rest
    assert statuses(database_url, second) == {"pending": 3}
    assert attempts(database_url, second_ids) == [0, 0, 0]  # not charged for another chunk's failure
    [(job, priority, ids)] = requeued
    assert (job.id, priority, ids) == (second, 7, second_ids)

    # On the last attempt the chunk's own items become errors; joined ones still go back.
    requeued.clear()
    backend.succeed = 0
    result = runner.run_chunk(first, first_ids, worker="w", settings=settings, last_attempt=True,
                              policy=RetryPolicy.from_settings(settings), requeue=lambda *a: requeued.append(a))
    assert (result["done"], result["failed"]) == (0, 1)
    assert statuses(database_url, second) == {"pending": 3} and requeued[0][2] == second_ids


def test_joined_items_left_when_the_chunks_job_is_cancelled_go_back(database_url, monkeypatch):
    model = f"m-{uuid.uuid4()}"
    settings = Settings(database_url=database_url)
    first, first_ids = model_job(database_url, 2, model)
    second, second_ids = model_job(database_url, 2, model)

    class CancelledMidway(Joining):
        def run_jobs(self, parts, more=None):
            (job, items), = parts
            held = more(10)
            set_job(database_url, first, status="cancelling")  # `aigc cancel` meanwhile
            yield [ok_row(job, items[0])]
            yield [ok_row(job, items[1])] + [ok_row(j, i) for j, its in held for i in its]

    monkeypatch.setattr(runner, "get_generator", lambda *a: CancelledMidway())
    requeued = []

    runner.run_chunk(first, first_ids, worker="w", settings=settings,
                     policy=RetryPolicy.from_settings(settings), requeue=lambda *a: requeued.append(a))

    assert job_row(database_url, first)[0] == "cancelled"
    assert statuses(database_url, second) == {"pending": 2} and requeued[0][2] == second_ids
    assert job_row(database_url, second)[0] == "running"


@pytest.fixture
def shutdown(monkeypatch):
    """This test's own worker shutdown, begun by the scripted backends (the worker's is SIGTERM)."""
    from aigc.workers.shutdown import Shutdown

    stopping = Shutdown()
    monkeypatch.setattr(runner, "SHUTDOWN", stopping)
    return stopping


@pytest.mark.parametrize("graceful,grace,cut", [(False, 60.0, True), (True, 0.0, True), (True, 60.0, False)],
                         ids=["other-backend", "grace-over", "winding-down"])
def test_a_stopping_worker_hands_back_its_chunk_and_the_joined_items_uncharged(database_url, monkeypatch, shutdown,
                                                                               graceful, grace, cut):
    model = f"m-{uuid.uuid4()}"
    settings = Settings(database_url=database_url)
    first, first_ids = model_job(database_url, 4, model)
    second, second_ids = model_job(database_url, 2, model)
    set_job(database_url, first, priority=3)

    class StoppedMidway(Joining):
        winds_down_on_shutdown = graceful

        def run_jobs(self, parts, more=None):
            (job, items), = parts
            held = more(10)
            yield [ok_row(job, items[0])]
            shutdown.begin(grace)  # SIGTERM
            yield [ok_row(job, items[1])]  # cut here, unless the backend winds down in its grace
            yield [ok_row(job, item) for item in items[2:]] + [ok_row(j, i) for j, its in held for i in its]

    monkeypatch.setattr(runner, "get_generator", lambda *a: StoppedMidway())
    requeued = []

    result = runner.run_chunk(first, first_ids, worker="w", settings=settings,
                              policy=RetryPolicy.from_settings(settings), requeue=lambda *a: requeued.append(a))

    if not cut:  # what the backend gave within the grace is kept; nothing was left
        assert (result["done"], requeued) == (4, [])
        assert statuses(database_url, second) == {"done": 2}
        return
    assert (result["done"], result["failed"]) == (2, 0)
    assert statuses(database_url, first) == {"done": 2, "pending": 2}
    assert statuses(database_url, second) == {"pending": 2}
    assert attempts(database_url, first_ids) == [1, 1, 0, 0]  # the unfinished are not charged
    assert attempts(database_url, second_ids) == [0, 0]
    assert sorted((job.id, priority, ids) for job, priority, ids in requeued) == sorted(
        [(first, 3, first_ids[2:]), (second, 0, second_ids)])
    assert tuple(job_row(database_url, first)) == ("running", 2, 0)


@pytest.mark.parametrize("between", [True, False], ids=["between-items", "mid-item"])
def test_a_rerun_chunk_stopping_hands_back_the_rest_with_the_attempts_it_had(database_url, monkeypatch,
                                                                             shutdown, between):
    settings = Settings(database_url=database_url, max_attempts=5)
    job_id, ids = rerun_job(database_url, 4)
    ran = []

    class StopsOnSecond:
        def run(self, job, items):
            ran.append(items[0].id)
            if items[0].id == ids[1]:
                shutdown.begin(60.0 if between else 0.0)
                if not between:
                    return  # abandoned mid-item: no row
            yield [ok_row(job, items[0])]

    monkeypatch.setattr(runner, "get_generator", lambda *a: StopsOnSecond())
    requeued = []

    runner.run_chunk(job_id, ids, worker="w", settings=settings, policy=RetryPolicy.from_settings(settings),
                     requeue=lambda *a: requeued.append(a))

    assert ran == ids[:2]  # nothing started after shutdown began
    finished = 2 if between else 1
    assert statuses(database_url, job_id) == {"done": finished, "pending": 4 - finished}
    assert attempts(database_url, ids) == [2] * finished + [1] * (4 - finished)  # as before this claim
    assert [(job.id, sent) for job, _, sent in requeued] == [(job_id, ids[finished:])]
