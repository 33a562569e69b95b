"""Every query in docs/results-table.md runs on SQLite and PostgreSQL and answers correctly."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import create_engine, text

from schemas.tables import utcnow
from workers import store

from conftest import REPO
from test_store import make_job, row

DOC = (REPO / "docs" / "results-table.md").read_text(encoding="utf-8")
# The throughput queries need a real worker's chunk runs: tests/test_throughput.py runs them.
QUERIES = re.findall(r"```sql\n(.*?)```", DOC.split("## Throughput", 1)[0], flags=re.S)


def test_the_doc_names_every_column():
    from schemas.tables import ChunkRun, File, Item, Job, Result

    for table in (Job, Item, Result, ChunkRun, File):
        for column in table.__table__.columns:
            assert f"| {column.name} |" in DOC, f"{table.__tablename__}.{column.name} is undocumented"


def test_documented_queries_answer_on_this_database(database_url):
    from schemas.db import get_engine

    since = utcnow() - timedelta(seconds=5)
    job_id, ids = make_job(database_url, 3)
    engine = get_engine(database_url)
    items = store.claim(engine=engine, job_id=job_id, item_ids=ids, owner="w", lease_seconds=60)
    store.mark_running(engine=engine, job_id=job_id)
    store.write_results(engine=engine, job_id=job_id, owner="w",
                        rows=[row(job_id, items[2]), row(job_id, items[0]), row(job_id, items[1], error=True)])
    plain = create_engine(database_url)  # no ORM: what a downstream reader has
    try:
        with plain.connect() as connection:
            answers = [connection.execute(text(q), {"since": since, "job": job_id}).mappings().all()
                       for q in QUERIES]
    finally:
        plain.dispose()
    assert len(answers) == 4
    new, ordered, failed, running = answers
    assert {r["custom_id"] for r in new if r["job_id"] == job_id} == {"c0", "c1", "c2"}
    assert [r["custom_id"] for r in ordered] == ["c0", "c1", "c2"]
    assert [(r["custom_id"], r["error_code"]) for r in failed] == [("c1", "x")]
    assert any(r["id"] == job_id and (r["done"], r["failed"], r["total"]) == (2, 1, 3) for r in running)
