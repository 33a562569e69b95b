"""Every query in docs/results-table.md runs on SQLite and PostgreSQL and answers correctly."""

from __future__ import annotations

import re
import random
import threading
import time

from sqlalchemy import create_engine, event, text

from aigc.workers import store

from conftest import REPO
from test_store import make_job, row

DOC = (REPO / "docs" / "results-table.md").read_text(encoding="utf-8")
# The throughput queries need a real worker's chunk runs: tests/test_throughput.py runs them.
QUERIES = re.findall(r"```sql\n(.*?)```", DOC.split("## Throughput", 1)[0], flags=re.S)


def test_the_doc_names_every_column():
    from aigc.schemas.tables import ChunkRun, Counter, File, Item, Job, Result

    for table in (Job, Item, Result, ChunkRun, Counter, File):
        for column in table.__table__.columns:
            assert f"| {column.name} |" in DOC, f"{table.__tablename__}.{column.name} is undocumented"


def test_documented_queries_answer_on_this_database(database_url):
    from aigc.schemas.db import get_engine

    job_id, ids = make_job(database_url, 3)
    engine = get_engine(database_url)
    items = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="w", lease_seconds=60)
    store.mark_running(engine=engine, job_id=job_id)
    store.write_results(engine=engine, job_id=job_id, owner="w",
                        rows=[row(job_id, items[2]), row(job_id, items[0]), row(job_id, items[1], error=True)])
    plain = create_engine(database_url)  # no ORM: what a downstream reader has
    try:
        with plain.connect() as connection:
            answers = [connection.execute(text(q), {"last": 0, "job": job_id}).mappings().all()
                       for q in QUERIES]
    finally:
        plain.dispose()
    assert len(answers) == 4
    new, ordered, failed, running = answers
    assert {r["custom_id"] for r in new if r["job_id"] == job_id} == {"c0", "c1", "c2"}
    assert [r["custom_id"] for r in ordered] == ["c0", "c1", "c2"]
    assert [(r["custom_id"], r["error_code"]) for r in failed] == [("c1", "x")]
    assert any(r["id"] == job_id and (r["done"], r["failed"], r["total"]) == (2, 1, 3) for r in running)


def test_reading_new_results_by_seq_never_skips_a_row_while_writers_commit_out_of_order(database_url):
    """Four writers commit batches concurrently, each commit delayed at random (so a row
    numbered earlier often commits later); a reader pages with the documented query."""
    from aigc.schemas.db import get_engine

    engine = get_engine(database_url)
    jobs = [make_job(database_url, 40) for _ in range(4)]
    delay = random.Random(7)

    def late_commit(_connection):
        if threading.current_thread().name.startswith("writer"):
            time.sleep(delay.uniform(0, 0.02))

    event.listen(engine, "commit", late_commit)
    (new_results,) = [q for q in QUERIES if ":last" in q]

    def write(job_id: str, ids: list[int], owner: str) -> None:
        items = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner=owner, lease_seconds=60)
        for start in range(0, len(items), 4):
            store.write_results(engine=engine, job_id=job_id, owner=owner,
                                rows=[row(job_id, item) for item in items[start:start + 4]])

    writers = [threading.Thread(target=write, args=(job_id, ids, f"w{n}"), name=f"writer{n}")
               for n, (job_id, ids) in enumerate(jobs)]
    seen: list[tuple[int, str, str]] = []
    last = 0
    reader = create_engine(database_url)
    try:
        with reader.connect() as connection:
            connection.execute(text("SELECT 1"))
            last = connection.execute(text("SELECT COALESCE(MAX(seq), 0) FROM results")).scalar()
        for writer in writers:
            writer.start()
        deadline = time.monotonic() + 120
        while True:
            running = any(w.is_alive() for w in writers)
            with reader.connect() as connection:
                page = connection.execute(text(new_results), {"last": last}).mappings().all()
            seen += [(r["seq"], r["job_id"], r["custom_id"]) for r in page]
            last = page[-1]["seq"] if page else last
            if not running and not page:
                break
            assert time.monotonic() < deadline, "the writers did not finish"
    finally:
        event.remove(engine, "commit", late_commit)
        for writer in writers:
            writer.join(60)
        reader.dispose()
    mine = {(job_id, f"c{i}") for job_id, _ in jobs for i in range(40)}
    got = [(job_id, custom_id) for _, job_id, custom_id in seen if (job_id, custom_id) in mine]
    assert len(got) == len(set(got)) == len(mine)  # every row once: none skipped, none repeated
    assert [s for s, _, _ in seen] == sorted(s for s, _, _ in seen)


def test_every_documented_query_can_use_an_index_on_postgresql(postgres_url):
    from aigc.schemas.db import upgrade

    upgrade(postgres_url)
    queries = re.findall(r"```sql\n(.*?)```", DOC, flags=re.S)
    plain = create_engine(postgres_url)
    try:
        with plain.connect() as connection:
            connection.execute(text("SET enable_seqscan = off"))  # a seq scan left means no index fits
            for query in queries:
                params = {"last": 0, "job": "j", "worker": "w", "since": "2026-01-01"}
                plan = "\n".join(connection.execute(text("EXPLAIN " + query), params).scalars())
                for table in ("results", "items", "chunk_runs"):
                    assert f"Seq Scan on {table}" not in plan, (query, plan)
    finally:
        plain.dispose()
