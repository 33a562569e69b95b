"""Short leases kept alive by a heartbeat, and a sweeper that frees a dead worker's items at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from sqlalchemy import update

from aigc import api, control
from aigc.schemas.db import get_engine
from aigc.schemas.dispatch import queue_name
from aigc.schemas.settings import Settings
from aigc.schemas.tables import Job, utcnow
from aigc.workers import store

from conftest import REPO, WorkerProcess, plain_rows
from test_faults import FAULT_ENV, assert_exactly_once, fault_settings, items
from test_store import make_job

# Marked per test: the pure ones below run in the fast lane.


def queued_ids(settings: Settings, kind: str = "article") -> list[int]:
    import base64

    client = redis.Redis.from_url(settings.broker_url)
    bodies = [json.loads(raw) for key in client.keys(queue_name(kind) + "*") for raw in client.lrange(key, 0, -1)]
    return sorted(i for body in bodies for i in json.loads(base64.b64decode(body["body"]))[0][1])


def test_the_default_lease_is_short_and_the_heartbeat_renews_it(database_url):
    assert Settings().lease_seconds == 60  # a dead worker's items are free within a minute
    engine = get_engine(database_url)
    job_id, ids = make_job(database_url, 3)
    store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="a", lease_seconds=1)
    assert store.renew_leases(engine=engine, item_ids=ids, owner="b", lease_seconds=60) == 0
    assert store.renew_leases(engine=engine, item_ids=ids, owner="a", lease_seconds=60) == 3
    time.sleep(1.2)  # past the first lease, within the renewed one: nobody else may claim
    assert store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="c", lease_seconds=60) == []


@pytest.mark.integration  # worker or CLI subprocesses
def test_sweep_resends_expired_leases_at_once_even_while_the_job_progresses(redis_url, database_url, tmp_path):
    settings = Settings(broker_url=redis_url, database_url=database_url, data_dir=tmp_path)
    redis.Redis.from_url(redis_url).flushdb()
    engine = get_engine(database_url)
    job_id, ids = make_job(database_url, 6)
    store.claim(engine=engine, job_id=job_id, item_ids=ids[:4], owner="dead/1", lease_seconds=1)
    store.claim(engine=engine, job_id=job_id, item_ids=ids[4:], owner="alive/2", lease_seconds=60)
    time.sleep(1.1)
    with engine.begin() as connection:  # another worker just made progress: the job is not stale
        connection.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))

    assert control.sweep(stale_seconds=600, settings=settings) == {job_id: 4}

    assert queued_ids(settings) == ids[:4]  # the dead worker's items only, once
    rows = plain_rows(database_url, "SELECT id, status, lease_owner FROM items WHERE job_id = :j ORDER BY id", j=job_id)
    assert [(r["status"], r["lease_owner"]) for r in rows] == [("pending", None)] * 4 + [("leased", "alive/2")] * 2
    assert control.sweep(stale_seconds=600, settings=settings) == {}  # nothing sent twice


@pytest.mark.integration  # worker or CLI subprocesses
def test_sweep_lets_a_cancelled_job_with_a_dead_worker_finish_cancelling(redis_url, database_url, tmp_path):
    settings = Settings(broker_url=redis_url, database_url=database_url, data_dir=tmp_path)
    engine = get_engine(database_url)
    job_id, ids = make_job(database_url, 2)
    store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="dead/1", lease_seconds=1)
    assert control.cancel(job_id, settings=settings) == "cancelling"  # an item is still leased
    time.sleep(1.1)

    control.sweep(settings=settings)

    assert api.status(job_id, settings=settings).status == "cancelled"


@pytest.mark.integration  # worker or CLI subprocesses
def test_a_live_worker_keeps_a_chunk_that_outlasts_its_lease(redis_url, sqlite_url, tiny_model, tmp_path):
    # One chunk of 8 items, one item a batch, ~1 s each: 8 s against a 2 s lease, with an idle
    # second worker and the sweeper running every half second. Without the heartbeat the
    # sweeper would hand the items to the second worker after 2 s.
    settings = fault_settings(redis_url, sqlite_url, tiny_model, chunk_size=8, max_batch_rows=1,
                              lease_seconds=2, visibility_timeout=3600)
    first = WorkerProcess(settings, tmp_path / "first.log", FAULT_ENV | {"AIGC_FAULT_SECONDS_PER_BATCH": "1"})
    first.wait_ready()
    second = None
    sweeper = subprocess.Popen([sys.executable, "-m", "aigc.cli", "sweep", "--every", "0.5"],
                               env=os.environ | settings.to_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "sweeper.log", "wb"))
    try:
        job_id = api.submit("article", items(8), params={"max_new_tokens": 4}, settings=settings)
        deadline = time.monotonic() + 60
        while api.status(job_id, settings=settings).status == "queued":
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.1)
        second = WorkerProcess(settings, tmp_path / "second.log")
        second.wait_ready()
        job = api.wait(job_id, timeout=120, settings=settings)
    finally:
        sweeper.terminate()
        sweeper.wait(10)
        first.stop()
        if second:
            second.stop()
    assert job.status == "completed"
    assert_exactly_once(settings, job_id, 8)
    rows = plain_rows(sqlite_url, "SELECT DISTINCT worker FROM results WHERE job_id = :j", j=job_id)
    assert [r["worker"] for r in rows] == [first.hostname]
    attempts = plain_rows(sqlite_url, "SELECT max(attempts) AS n FROM items WHERE job_id = :j", j=job_id)
    assert attempts[0]["n"] == 1  # never claimed again
    runs = plain_rows(sqlite_url, "SELECT worker, done, duration_ms FROM chunk_runs WHERE job_id = :j", j=job_id)
    assert len(runs) == 1 and runs[0]["done"] == 8 and runs[0]["duration_ms"] > 2000 * 2


@pytest.mark.integration  # worker or CLI subprocesses
def test_a_stopped_worker_hands_back_what_it_has_not_finished_and_another_finishes_it(
        redis_url, sqlite_url, tiny_model, tmp_path):
    # One chunk of 40 items of 100 tokens, a row at a time (about 5 s here): SIGTERM comes
    # with most of it to do. The leases (300 s) outlast the test and no sweeper runs: only the
    # message the stopping worker sends can bring the rest to the second worker.
    settings = fault_settings(redis_url, sqlite_url, tiny_model, chunk_size=40, max_batch_rows=1,
                              lease_seconds=300, visibility_timeout=3600)
    first = WorkerProcess(settings, tmp_path / "first.log")
    second = None
    try:
        first.wait_ready()
        job_id = api.submit("article", items(40), params={"max_new_tokens": 100}, settings=settings)
        deadline = time.monotonic() + 60
        while not plain_rows(sqlite_url, "SELECT count(*) AS n FROM results WHERE job_id = :j", j=job_id)[0]["n"]:
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.1)
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(60) == 0, first.log()

        states = plain_rows(sqlite_url, "SELECT status, attempts, count(*) AS n FROM items WHERE job_id = :j "
                                        "GROUP BY status, attempts ORDER BY status", j=job_id)
        done = sum(s["n"] for s in states if s["status"] == "done")
        assert 0 < done < 40, states
        # The rest is pending again, no attempt charged, and sent as a chunk of its own.
        assert states == [{"status": "done", "attempts": 1, "n": done},
                          {"status": "pending", "attempts": 0, "n": 40 - done}], states
        pending = plain_rows(sqlite_url, "SELECT id FROM items WHERE job_id = :j AND status = 'pending'", j=job_id)
        assert queued_ids(settings) == sorted(r["id"] for r in pending)
        assert f"{40 - done} unfinished item(s) of the run handed back" in first.log()

        second = WorkerProcess(settings.model_copy(update={"max_batch_rows": 40}), tmp_path / "second.log")
        second.wait_ready()
        job = api.wait(job_id, timeout=120, settings=settings)
    finally:
        first.stop()
        if second:
            second.stop()
    assert job.status == "completed"
    assert_exactly_once(settings, job_id, 40)
    rows = plain_rows(sqlite_url, "SELECT worker, count(*) AS n FROM results WHERE job_id = :j GROUP BY worker", j=job_id)
    assert {r["worker"]: r["n"] for r in rows} == {first.hostname: done, second.hostname: 40 - done}
