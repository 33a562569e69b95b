"""The worker's SQL on real SQLite and PostgreSQL: leases, upserts, counts, final states."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import insert, select, update
from sqlmodel import Session

from aigc.schemas.db import get_engine, upgrade
from aigc.schemas.tables import Item, Job, Result
from aigc.workers import store
from aigc.workers.contract import ClaimedItem, ResultRow


def make_job(url: str, n: int) -> tuple[str, list[int]]:
    upgrade(url)
    engine = get_engine(url)
    job_id = str(uuid.uuid4())
    with Session(engine) as session, session.begin():
        session.add(Job(id=job_id, kind="article", model="m", status="queued", total=n))
        session.flush()
        session.execute(insert(Item), [{"job_id": job_id, "custom_id": f"c{i}", "index": i,
                                        "input": {"prompt": "x"}, "status": "pending"} for i in range(n)])
    with engine.connect() as connection:
        ids = list(connection.execute(select(Item.id).where(Item.job_id == job_id)
                                      .order_by(Item.index)).scalars())
    return job_id, ids


def row(job_id: str, item: ClaimedItem, error: bool = False) -> ResultRow:
    base = {"job_id": job_id, "item_id": item.id, "custom_id": item.custom_id, "kind": "article",
            "model": "m", "params": {}}
    return ResultRow(**base, **({"error_code": "x", "error_message": "bad"} if error else {"output_text": "ok"}))


def test_an_item_is_leased_to_one_owner_until_its_lease_expires(database_url):
    engine = get_engine(database_url)
    job_id, ids = make_job(database_url, 4)

    first = store.claim(engine=engine, job_id=job_id, item_ids=ids[:3], owner="a", lease_seconds=60)
    second = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="b", lease_seconds=1)

    assert [i.id for i in first] == ids[:3]
    assert [i.id for i in second] == ids[3:]
    time.sleep(1.1)
    third = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="c", lease_seconds=60)
    assert [i.id for i in third] == ids[3:]  # b's lease ran out; a's did not
    with engine.connect() as connection:
        attempts = dict(connection.execute(select(Item.id, Item.attempts).where(Item.job_id == job_id)).all())
    assert attempts == {ids[0]: 1, ids[1]: 1, ids[2]: 1, ids[3]: 2}


def test_results_are_written_once_and_counted_once(database_url):
    engine = get_engine(database_url)
    job_id, ids = make_job(database_url, 3)
    items = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="a", lease_seconds=60)
    store.mark_running(engine=engine, job_id=job_id)

    assert store.write_results(engine=engine, job_id=job_id, rows=[row(job_id, items[0])], owner="a") == (1, 0)
    assert store.write_results(engine=engine, job_id=job_id, rows=[row(job_id, items[0])], owner="a") == (0, 0)
    assert store.write_results(engine=engine, job_id=job_id, rows=[row(job_id, items[1])], owner="z") == (0, 0)
    assert store.finish_if_complete(engine=engine, job_id=job_id) is None

    done = store.write_results(engine=engine, job_id=job_id,
                               rows=[row(job_id, items[1]), row(job_id, items[2], error=True)], owner="a")
    assert done == (1, 1)
    assert store.finish_if_complete(engine=engine, job_id=job_id) == "completed_with_errors"
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert (job.done, job.failed, job.status) == (2, 1, "completed_with_errors")
        assert job.started_at is not None and job.finished_at is not None
        assert len(session.exec(select(Result).where(Result.job_id == job_id)).all()) == 3


def test_final_state_reflects_failures(database_url):
    engine = get_engine(database_url)
    for errors, expected in ((0, "completed"), (2, "failed")):
        job_id, ids = make_job(database_url, 2)
        items = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="a", lease_seconds=60)
        rows = [row(job_id, item, error=i < errors) for i, item in enumerate(items)]
        store.write_results(engine=engine, job_id=job_id, rows=rows, owner="a")
        assert store.finish_if_complete(engine=engine, job_id=job_id) == expected
        assert store.finish_if_complete(engine=engine, job_id=job_id) is None  # only once


def test_a_cancelled_job_is_not_marked_complete(database_url):
    engine = get_engine(database_url)
    job_id, ids = make_job(database_url, 1)
    items = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="a", lease_seconds=60)
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
    store.write_results(engine=engine, job_id=job_id, rows=[row(job_id, items[0])], owner="a")
    assert store.finish_if_complete(engine=engine, job_id=job_id) is None
