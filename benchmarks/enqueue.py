"""Enqueue rate: a JSONL file through ``submit_file`` to rows in ``items`` and messages in Redis.

Side by side in one process: aigc's path (validate all, bulk insert, chunks of ids) against the
naive path people write by hand (one Celery message per item carrying its payload, no SQL).
Prints one JSON object. Usage: ``python benchmarks/enqueue.py [--items 100000]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import create_engine, text

from aigc.api import submit_file
from aigc.schemas.db import upgrade
from aigc.schemas.dispatch import celery_config, queue_name
from aigc.schemas.settings import Settings

REDIS = "redis://127.0.0.1:6379/12"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def write_items(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps({"custom_id": f"c{i}", "topic": f"topic {i}",
                                  "keywords": ["alpha", "beta"], "tone": "calm"}) + "\n")


def fresh_postgres() -> tuple[str, callable]:
    server = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"aigc_bench_{uuid.uuid4().hex[:8]}"
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        from aigc.schemas.db import get_engine
        get_engine(url).dispose()
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))

    url = POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    return url, drop


def aigc_rate(path: Path, n: int, database_url: str) -> dict:
    settings = Settings(broker_url=REDIS, database_url=database_url, chunk_size=64)
    upgrade(database_url)
    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    started = time.perf_counter()
    job_id = submit_file(path, "article", settings=settings)
    seconds = time.perf_counter() - started
    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT count(*) FROM items WHERE job_id = :j"), {"j": job_id}).scalar()
    engine.dispose()
    messages = sum(client.llen(key) for key in client.keys(queue_name("article") + "*"))
    assert rows == n and messages == -(-n // 64), (rows, messages)
    client.flushdb()
    return {"items_per_s": round(n / seconds), "seconds": round(seconds, 2), "messages": messages}


def naive_rate(path: Path, n: int) -> dict:
    """One message per item with its payload: what a hand-written Celery setup does."""
    app = Celery(set_as_current=False)
    app.conf.update(celery_config(Settings(broker_url=REDIS)))
    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    started = time.perf_counter()
    with open(path, encoding="utf-8") as stream, app.producer_or_acquire() as producer:
        for count, line in enumerate(stream):
            if count == n:
                break
            app.send_task("naive.generate", args=[json.loads(line)], queue="naive", producer=producer)
    seconds = time.perf_counter() - started
    assert client.llen("naive") == n
    client.flushdb()
    return {"items_per_s": round(n / seconds), "seconds": round(seconds, 2), "messages": n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--naive-items", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "items.jsonl"
        write_items(path, args.items)
        naive = naive_rate(path, args.naive_items)
        sqlite = aigc_rate(path, args.items, f"sqlite:///{folder}/bench.db")
        pg_url, drop = fresh_postgres()
        try:
            postgres = aigc_rate(path, args.items, pg_url)
        finally:
            drop()
    report = {
        "benchmark": "enqueue", "items": args.items,
        "aigc_sqlite": sqlite, "aigc_postgres": postgres, "naive_one_message_per_item": naive,
        "sqlite_over_naive": round(sqlite["items_per_s"] / naive["items_per_s"], 2),
        "postgres_over_naive": round(postgres["items_per_s"] / naive["items_per_s"], 2),
        "target_items_per_s": 20_000,
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
