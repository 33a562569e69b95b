"""Creating a batch through ``aigc serve`` against ``aigc submit`` of the same file, one run.

A 50,000-line OpenAI Batch file (chat lines) goes through the API the way a user's script
sends it (the official SDK: ``files.create`` then ``batches.create``, timed until the batch is
``in_progress``: validated, stored and enqueued), and through ``aigc submit FILE`` (a fresh
process, as a user types it) and ``submit_file`` in-process, alternately, ``--repeats`` times
each, on PostgreSQL and Redis on localhost. No worker runs: the messages wait in Redis and are
flushed after each step. Prints one JSON object; medians are what to compare.
Usage: ``python benchmarks/openai_api.py [--lines 50000] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from openai import OpenAI
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from api_server import ServerProcess  # noqa: E402
from aigc.api import submit_file  # noqa: E402
from aigc.schemas.db import get_engine, upgrade  # noqa: E402
from aigc.schemas.settings import Settings  # noqa: E402

REDIS = "redis://127.0.0.1:6379"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
KEY = "sk-aigc-benchmark"
TARGET = 10_000  # lines/s, upload + create until in_progress


def write_file(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps({"custom_id": f"request-{i}", "method": "POST",
                                  "url": "/v1/chat/completions",
                                  "body": {"model": "gpt-4o-mini", "max_tokens": 200, "messages": [
                                      {"role": "system", "content": "You are a concise writer."},
                                      {"role": "user", "content": f"Write a short note about topic {i}."}]}})
                      + "\n")


def claim_redis() -> tuple[str, callable]:
    """A Redis database no test run is using (the tests' claim keys, see tests/conftest.py)."""
    admin = redis.Redis.from_url(f"{REDIS}/0")
    for number in range(15, 0, -1):
        if admin.set(f"aigc-test:claim:{number}", f"bench-{os.getpid()}", nx=True, ex=3600):
            url = f"{REDIS}/{number}"
            redis.Redis.from_url(url).flushdb()

            def release() -> None:
                redis.Redis.from_url(url).flushdb()
                admin.delete(f"aigc-test:claim:{number}")
            return url, release
    raise SystemExit("every Redis database is claimed")


def fresh_postgres() -> tuple[str, callable]:
    server = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"aigc_bench_{uuid.uuid4().hex[:8]}"
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        get_engine(url).dispose()
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    return url, drop


def items_of(url: str, job_id: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM items WHERE job_id = :j"), {"j": job_id}).scalar()
    finally:
        engine.dispose()


def through_api(sdk: OpenAI, path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    with open(path, "rb") as stream:
        uploaded = sdk.files.create(file=(path.name, stream), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    seconds = time.perf_counter() - started
    assert batch.status == "in_progress", batch
    return seconds, str(uuid.UUID(batch.id.removeprefix("batch_")))


def through_cli(settings: Settings, path: Path) -> tuple[float, str]:
    env = os.environ | settings.to_env()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aigc.cli", "submit", str(path)], env=env,
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stdout.strip()


def in_process(settings: Settings, path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    job_id = submit_file(path, settings=settings)
    return time.perf_counter() - started, job_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    broker, release = claim_redis()
    database, drop = fresh_postgres()
    runs: dict[str, list[float]] = {"api": [], "aigc_submit": [], "submit_file": []}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "batch.jsonl"
        write_file(path, args.lines)
        size = path.stat().st_size
        settings = Settings(broker_url=broker, database_url=database, data_dir=Path(folder),
                            text_model="text-small",
                            api_keys=[f"bench:{hashlib.sha256(KEY.encode()).hexdigest()}"])
        upgrade(database)
        server = ServerProcess(settings, Path(folder) / "server.log").start()
        try:
            sdk = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=600)
            for _ in range(args.repeats):
                for name, run in (("api", lambda: through_api(sdk, path)),
                                  ("aigc_submit", lambda: through_cli(settings, path)),
                                  ("submit_file", lambda: in_process(settings, path))):
                    seconds, job_id = run()
                    assert items_of(database, job_id) == args.lines
                    redis.Redis.from_url(broker).flushdb()
                    runs[name].append(seconds)
        finally:
            server.stop()
            drop()
            release()
    rates = {name: round(args.lines / statistics.median(seconds)) for name, seconds in runs.items()}
    report = {"benchmark": "openai_api", "lines": args.lines, "repeats": args.repeats,
              "database": "postgresql", "seconds": {k: [round(s, 2) for s in v] for k, v in runs.items()},
              "lines_per_s": rates, "api_over_aigc_submit": round(rates["api"] / rates["aigc_submit"], 2),
              "target_api_lines_per_s": TARGET, "file_bytes": size}
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
