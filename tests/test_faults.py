"""Fault injection (``pytest -m faults``): real workers, real Redis and PostgreSQL, real failures.

Each test owns the service it breaks (a private redis-server, a private PostgreSQL cluster), so
killing, flushing or stopping it cannot disturb anything else. The promise under test is the
exactly-once effect: every item ends with exactly one results row, counted once, and the job
finishes.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from aigc import api
from aigc.schemas.db import upgrade
from aigc.schemas.settings import Settings

from conftest import REPO, WorkerProcess, need, plain_rows, run_cli

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_ENV = {"AIGC_PLUGINS": "fault_plugin", "PYTHONPATH": str(REPO / "tests")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own, with AOF on (as compose.yaml runs it in production)."""

    def __init__(self, folder: Path):
        self.binary = shutil.which("redis-server")
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # redis fsyncs the AOF on SIGTERM
            self.process.wait(20)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb in a temporary folder), to stop and start."""

    def __init__(self):
        found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
        self.bin = Path(found).parent if found else None
        self.folder = Path(tempfile.mkdtemp(prefix="aigc-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/aigc"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")  # the cluster, its socket and log live here
        self._run("initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres")
        self.start()
        server = create_engine(self.url.replace("/aigc", "/postgres"), isolation_level="AUTOCOMMIT")
        with server.connect() as connection:
            connection.execute(text("CREATE DATABASE aigc"))
        server.dispose()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w",
                  "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture()
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    if server.binary is None:
        need("redis-server", FileNotFoundError("redis-server is not installed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def private_postgres():
    server = PrivatePostgres()
    if server.bin is None:
        need("PostgreSQL server binaries", FileNotFoundError("initdb is not installed"))
    try:
        server.init()
    except (subprocess.CalledProcessError, OSError) as exc:
        server.remove()
        need("a private PostgreSQL cluster", exc)
    yield server
    server.remove()


def fault_settings(broker_url: str, database_url: str, model: Path, **overrides) -> Settings:
    """Short leases and visibility timeout so that recovery happens within a test."""
    upgrade(database_url)
    values = dict(broker_url=broker_url, database_url=database_url, text_model=str(model),
                  chunk_size=10, max_batch_rows=5, lease_seconds=5, visibility_timeout=4,
                  data_dir=model.parent)
    return Settings(**(values | overrides))


def items(n: int, poison: int | None = None) -> list[dict]:
    return [{"topic": "poison" if i == poison else f"topic {i}", "custom_id": f"c{i}"} for i in range(n)]


def count_results(url: str, job_id: str) -> int:
    return plain_rows(url, "SELECT count(*) AS n FROM results WHERE job_id = :j", j=job_id)[0]["n"]


def assert_exactly_once(settings: Settings, job_id: str, n: int, *, failed: int = 0) -> None:
    url = settings.database_url
    ids = [r["custom_id"] for r in plain_rows(url, "SELECT custom_id FROM results WHERE job_id = :j", j=job_id)]
    assert len(ids) == len(set(ids)) == n, f"{len(ids)} rows, {len(set(ids))} distinct, {n} items"
    assert set(ids) == {f"c{i}" for i in range(n)}
    job = plain_rows(url, "SELECT status, total, done, failed FROM jobs WHERE id = :j", j=job_id)[0]
    status = "completed_with_errors" if failed else "completed"
    assert job == {"status": status, "total": n, "done": n - failed, "failed": failed}
    statuses = plain_rows(url, "SELECT DISTINCT status FROM items WHERE job_id = :j", j=job_id)
    assert {r["status"] for r in statuses} <= {"done", "error"}


def start_worker(settings: Settings, tmp_path: Path, name: str, **env: str) -> WorkerProcess:
    worker = WorkerProcess(settings, tmp_path / f"{name}.log", FAULT_ENV | env)
    worker.wait_ready()
    return worker


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_sigkill_at_random_points_loses_and_duplicates_nothing(private_redis, postgres_url, tiny_model, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    settings = fault_settings(private_redis.url, postgres_url, tiny_model)
    n = 400
    job_id = api.submit("article", items(n), params={"max_new_tokens": 8}, settings=settings)
    # A message popped from Redis by a worker killed before kombu recorded it as unacknowledged
    # is gone; the sweeper every deployment runs re-sends such items from SQL.
    sweeper = subprocess.Popen([sys.executable, "-m", "aigc.cli", "sweep", "--stale", "5", "--every", "2"],
                               env=os.environ | settings.to_env(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sweeper.log", "wb"))
    kills, worker = [], None
    t0 = time.monotonic()
    try:
        for round_ in range(5):
            worker = start_worker(settings, tmp_path, f"worker{round_}", AIGC_FAULT_SECONDS_PER_BATCH="0.05")
            before = count_results(postgres_url, job_id)
            wait_for(lambda: count_results(postgres_url, job_id) > before, 120, "the worker's first rows")
            time.sleep(rng.uniform(0, 0.6))
            worker.process.send_signal(signal.SIGKILL)
            worker.process.wait()
            kills.append(count_results(postgres_url, job_id))
            print(f"kill {round_}: {kills[-1]} rows at {time.monotonic() - t0:.1f} s")
        assert kills[-1] < n, f"the job finished before the last kill (seed {seed}): {kills}"
        worker = start_worker(settings, tmp_path, "survivor")
        job = api.wait(job_id, timeout=240, settings=settings)
        print(f"done at {time.monotonic() - t0:.1f} s")
    finally:
        sweeper.terminate()
        sweeper.wait(10)
        if worker:
            worker.stop()
    assert job.status == "completed", f"seed {seed}, rows at each kill {kills}"
    assert_exactly_once(settings, job_id, n)
    reruns = plain_rows(postgres_url, "SELECT count(*) AS n FROM items WHERE job_id = :j AND attempts > 1", j=job_id)
    assert reruns[0]["n"] > 0  # the kills did interrupt claimed work, which was run again
    # Runs killed mid-chunk still account for what they committed: throughput counts every item.
    runs = plain_rows(postgres_url, "SELECT count(*) AS runs, sum(done) AS done FROM chunk_runs WHERE job_id = :j", j=job_id)
    assert runs[0]["done"] == n, runs


@contextmanager
def job_in_flight(settings: Settings, tmp_path: Path, n: int):
    """A worker, and an ``n``-item job of which it has written the first rows: (worker, job id)."""
    worker = start_worker(settings, tmp_path, "worker", AIGC_FAULT_SECONDS_PER_BATCH="0.2")
    try:
        job_id = api.submit("article", items(n), params={"max_new_tokens": 8}, settings=settings)
        wait_for(lambda: count_results(settings.database_url, job_id) > 0, 120, "first rows")
        yield worker, job_id
    finally:
        worker.stop()


def test_flushall_mid_job_then_sweep_finishes_with_nothing_lost(private_redis, sqlite_url, tiny_model, tmp_path):
    # Joining off: a chunk run would otherwise claim the job's later items straight from SQL
    # while its own items run, so the one message in hand (or the next, fetched just before the
    # flush) could carry the whole job and the sweep would have nothing to re-send. Here each
    # message runs its own chunk, so at most two of the twelve run after the flush.
    settings = fault_settings(private_redis.url, sqlite_url, tiny_model, join_jobs=False)
    n = 120
    with job_in_flight(settings, tmp_path, n) as (worker, job_id):
        private_redis.client().flushall()
        time.sleep(3)  # the chunk in hand finishes; nothing else is queued any more
        assert count_results(sqlite_url, job_id) < n
        assert api.status(job_id, settings=settings).status == "running"

        swept = run_cli(settings, "sweep", "--stale", "2").stderr

        assert re.search(rf"job {job_id}: \d+ item\(s\) re-sent", swept), swept
        job = api.wait(job_id, timeout=180, settings=settings)
        assert "joined" not in worker.log()  # the premise: every item came by its own message
    assert job.status == "completed"
    assert_exactly_once(settings, job_id, n)


def test_redis_restart_mid_job_workers_reconnect_and_finish(private_redis, sqlite_url, tiny_model, tmp_path):
    settings = fault_settings(private_redis.url, sqlite_url, tiny_model)
    n = 120
    with job_in_flight(settings, tmp_path, n) as (worker, job_id):
        private_redis.stop()
        time.sleep(3)
        private_redis.start()  # the queue comes back from the append-only file

        job = api.wait(job_id, timeout=180, settings=settings)

        assert worker.process.poll() is None, worker.log()  # the same process, reconnected
    assert job.status == "completed"
    assert_exactly_once(settings, job_id, n)
    assert "Trying to re-establish the connection" in worker.log() or "Connection to broker lost" in worker.log()


def test_postgres_down_for_twenty_seconds_is_ridden_out(private_redis, private_postgres, tiny_model, tmp_path):
    from aigc.schemas.db import get_engine

    settings = fault_settings(private_redis.url, private_postgres.url, tiny_model, lease_seconds=120)
    n = 100
    with job_in_flight(settings, tmp_path, n) as (worker, job_id):
        private_postgres.stop()
        get_engine(private_postgres.url).dispose()  # our own pooled connections died with it
        time.sleep(20)
        private_postgres.start()

        job = api.wait(job_id, timeout=180, settings=settings)

        assert worker.process.poll() is None, worker.log()
    assert job.status == "completed"
    assert_exactly_once(settings, job_id, n)
    assert "database unreachable" in worker.log()  # the outage was met, and waited out


def test_a_task_outliving_the_visibility_timeout_is_not_run_twice(redis_url, sqlite_url, tiny_model, tmp_path):
    # One chunk of 12 items, a batch at a time, ~0.5 s each: ~6 s against a 2 s visibility
    # timeout and a restore scan every second (half the timeout), so the broker hands the same
    # message to the idle second worker meanwhile.
    settings = fault_settings(redis_url, sqlite_url, tiny_model, chunk_size=12, max_batch_rows=1,
                              visibility_timeout=2, lease_seconds=300)
    slow = {"AIGC_FAULT_SECONDS_PER_BATCH": "0.5"}
    first, second = (WorkerProcess(settings, tmp_path / f"{name}.log", FAULT_ENV | slow) for name in ("first", "second"))
    try:
        first.wait_ready()  # both start at once
        second.wait_ready()
        job_id = api.submit("article", items(12), params={"max_new_tokens": 4}, settings=settings)
        job = api.wait(job_id, timeout=180, settings=settings)
        time.sleep(1)
    finally:
        first.stop()
        second.stop()
    assert job.status == "completed"
    assert_exactly_once(settings, job_id, 12)
    received = [set(re.findall(r"\[([0-9a-f-]{36})\] received", w.log())) for w in (first, second)]
    assert received[0] & received[1], "the message was not delivered twice: the test proved nothing"
    workers = plain_rows(sqlite_url, "SELECT DISTINCT worker FROM results WHERE job_id = :j", j=job_id)
    assert len(workers) == 1  # the second delivery found every item leased or done


def test_an_item_that_crashes_its_worker_every_time_ends_as_an_error(redis_url, sqlite_url, tiny_model, tmp_path):
    settings = fault_settings(redis_url, sqlite_url, tiny_model, max_attempts=2, lease_seconds=2,
                              visibility_timeout=2)
    n = 20
    job_id = api.submit("article", items(n, poison=7), params={"max_new_tokens": 4}, settings=settings)
    crashes = 0
    deadline = time.monotonic() + 240
    while not api.status(job_id, settings=settings).status.startswith("completed"):
        assert time.monotonic() < deadline, "the job never finished"
        # Not waited for: it may take the poison chunk and die before it ever answers a ping.
        worker = WorkerProcess(settings, tmp_path / f"worker{crashes}.log",
                               FAULT_ENV | {"AIGC_FAULT_CRASH_TOPIC": "poison"})
        while worker.process.poll() is None and not api.status(job_id, settings=settings).status.startswith("completed"):
            assert time.monotonic() < deadline, "the job never finished"
            time.sleep(0.2)
        if worker.process.poll() is None:
            worker.stop()
        else:
            crashes += 1
        assert crashes <= 5, "the poison item was retried without end"
    assert crashes == 2  # one crash per allowed attempt, then the cap
    assert_exactly_once(settings, job_id, n, failed=1)
    rows = plain_rows(sqlite_url, "SELECT custom_id, error_code FROM results WHERE job_id = :j AND error_code IS NOT NULL", j=job_id)
    assert rows == [{"custom_id": "c7", "error_code": "too_many_attempts"}]


HOSTILE = [
    (b'{"topic": "x"}\n{"topic": ' + b'"' + b"a" * (6 << 20) + b'"}\n', "2:-: line is"),
    (b'{"topic": "x", "keywords": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n", "1:-: invalid JSON: nested too deeply"),
    (b'{"topic": "ok"}\n{"prompt": "clear \\u001b[2J screen"}\n', "2:prompt: contains control character U+001B"),
    (b'{"topic": "nul \\u0000 byte"}\n', "1:topic: contains control character U+0000"),
    (b'{"topic": "x", "params": {"max_new_tokens": 1e9}}\n', "1:params.max_new_tokens"),
    (b'{"custom_id": "a", "topic": "x"}\n{"custom_id": "a", "topic": "y"}\n', "2:custom_id"),
    (b'\xc3\x28 not utf-8\n', "1:-: not valid UTF-8"),
]


@pytest.mark.parametrize("data,expected", HOSTILE, ids=["6MB-line", "nested", "escape", "nul", "huge-tokens", "dup-id", "utf8"])
def test_hostile_input_is_refused_whole_with_nothing_written(data, expected, redis_url, postgres_url, tiny_model, tmp_path):
    settings = fault_settings(redis_url, postgres_url, tiny_model)
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(data)
    count = "SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM items) AS items"
    before = plain_rows(postgres_url, count)

    result = run_cli(settings, "submit", str(path), "--kind", "article", check=False)

    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert plain_rows(postgres_url, count) == before
