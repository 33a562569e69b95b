"""The retry policy is one object: what the Celery tasks retry by and what the runner's SQL
calls ride out outages by (docs/reliability.md)."""

from __future__ import annotations

import functools
import logging
import sqlite3
from dataclasses import dataclass

import pytest
from celery.exceptions import Retry
from sqlalchemy.exc import OperationalError

from aigc.schemas.settings import Settings
from aigc.workers import runner, store
from aigc.workers.errors import DatabaseUnavailable, TransientError
from aigc.workers.retry import RetryPolicy

from test_store import make_job


@dataclass
class Claimed:
    attempts: int


def test_the_policy_states_what_the_docs_promise():
    policy = RetryPolicy.from_settings(Settings(max_attempts=3, db_outage_seconds=7))
    assert (policy.max_attempts, policy.outage_seconds) == (3, 7)
    assert RetryPolicy.from_settings(Settings()) == RetryPolicy()  # the settings' defaults are the policy's
    assert RetryPolicy().chunk_waits() == [5, 10, 20, 40]
    assert [RetryPolicy().is_last_try(n) for n in range(5)] == [False] * 4 + [True]
    assert not policy.over_cap(Claimed(3)) and policy.over_cap(Claimed(4))
    assert not policy.runs_singly([Claimed(1), Claimed(1)])
    assert not policy.runs_singly([Claimed(2)])  # alone already
    assert policy.runs_singly([Claimed(1), Claimed(2)])  # an earlier run of the chunk died


def test_celery_retries_a_chunk_by_the_policy(monkeypatch):
    from aigc.workers import tasks

    assert tasks.POLICY == RetryPolicy.from_settings(tasks.get_settings())
    calls = []

    def transient(*args, **kwargs):
        calls.append(kwargs)
        raise TransientError("out of memory generating a single row", code="out_of_memory")

    monkeypatch.setattr(tasks, "run_chunk", transient)
    for name, task in tasks.TASKS.items():
        assert task.autoretry_for == (TransientError,) and task.max_retries == tasks.POLICY.chunk_retries
        retried = []
        monkeypatch.setattr(task, "retry", lambda exc=None, **kw: retried.append(kw) or Retry(exc=exc))
        for retries in range(tasks.POLICY.chunk_retries + 1):
            task.push_request(retries=retries, hostname="w@test")
            try:
                with pytest.raises(Retry):
                    task.run("job", [1, 2])
            finally:
                task.pop_request()
        # Celery's backoff without jitter; past max_retries Celery raises the error instead.
        assert [kw["countdown"] for kw in retried[:4]] == tasks.POLICY.chunk_waits() == [5, 10, 20, 40], name
        assert all(call["policy"] is tasks.POLICY for call in calls)
        assert [call["last_attempt"] for call in calls[-5:]] == [False] * 4 + [True]


class Recording(RetryPolicy):
    """A policy that notes which functions it was asked to ride out."""

    def ride_out(self, function, /, *args, **kwargs):
        ridden.append(function.__name__)
        return super().ride_out(function, *args, **kwargs)


ridden: list[str] = []


def test_every_sql_call_of_a_chunk_goes_through_the_policy_handed_in(sqlite_url, monkeypatch):
    ridden.clear()
    called = []
    for name in ("load_job", "claim", "mark_running", "start_chunk_run", "write_results", "release",
                 "finish_if_complete", "add_attempts", "job_status", "finish_cancel", "end_chunk_run",
                 "renew_leases"):
        monkeypatch.setattr(store, name, spy(getattr(store, name), called))
    job_id, ids = make_job(sqlite_url, 3)
    monkeypatch.setattr(runner, "get_generator", lambda *a: Batches())

    runner.run_chunk(job_id, ids, worker="w", settings=Settings(database_url=sqlite_url),
                     policy=Recording())

    assert {"load_job", "claim", "write_results", "finish_if_complete"} <= set(called)
    assert sorted(ridden) == sorted(name for name in called if name != "renew_leases")


def spy(real, called: list[str]):
    @functools.wraps(real)
    def call(*args, **kwargs):
        called.append(real.__name__)
        return real(*args, **kwargs)
    return call


class Batches:
    """One row per batch, so the runner asks the job's status between batches."""

    def run(self, job, items):
        for item in items:
            yield [{"job_id": job.id, "item_id": item.id, "custom_id": item.custom_id,
                    "kind": job.kind, "model": job.model, "params": {}, "output_text": "ok"}]


def test_the_outage_window_is_the_policy_handed_in_not_a_global(sqlite_url, monkeypatch, caplog):
    real = store.write_results
    failures = []

    def locked_twice(**kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError("UPDATE counters", {}, sqlite3.OperationalError("database is locked"))
        return real(**kwargs)

    monkeypatch.setattr(store, "write_results", locked_twice)
    monkeypatch.setattr(runner, "get_generator", lambda *a: Batches())
    settings = Settings(database_url=sqlite_url)

    job_id, ids = make_job(sqlite_url, 2)
    with pytest.raises(DatabaseUnavailable, match="database unreachable for 0 s in locked_twice"):
        runner.run_chunk(job_id, ids, worker="w", settings=settings, policy=RetryPolicy(outage_seconds=0))

    failures.clear()
    job_id, ids = make_job(sqlite_url, 2)
    with caplog.at_level(logging.WARNING, logger="aigc.worker"):
        result = runner.run_chunk(job_id, ids, worker="w", settings=settings,
                                  policy=RetryPolicy(outage_seconds=30, outage_first_wait=0.01))
    assert (result["done"], result["failed"]) == (2, 0) and len(failures) == 2
    assert "database unreachable in locked_twice (OperationalError); retrying in 0.0 s" in caplog.text
