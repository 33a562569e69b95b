"""The runner on a real database with a scripted generator: transient and permanent failures."""

from __future__ import annotations

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


def test_a_rerun_chunk_runs_singly_and_charges_only_the_item_that_dies(database_url, monkeypatch):
    from sqlalchemy import update

    settings = Settings(database_url=database_url, max_attempts=5)
    job_id, ids = make_job(database_url, 4)
    with get_engine(database_url).begin() as connection:  # an earlier claim of all four died
        connection.execute(update(Item).where(Item.id.in_(ids)).values(attempts=1))
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
