"""Fixtures: real Redis, real PostgreSQL and SQLite databases, real worker processes.

A service that is not reachable skips its tests locally and fails them in CI (``CI=true``).
"""

from __future__ import annotations

import os

# One torch (OpenMP) thread per process: the suite runs many processes at once (workers, CLI,
# servers), and two suites may share a host. With more OpenMP threads than cores, spin-waiting
# threads starve the rest: two suites on 2 cores made the demo's four articles take 214 s
# instead of about 10. Tests assert behaviour, not speed (benchmarks/ measure that).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from aigc.schemas.db import upgrade
from aigc.schemas.dispatch import celery_config, queue_name
from aigc.schemas.enums import Kind
from aigc.schemas.settings import Settings

from tiny_models import build_tiny_gpt2

IN_CI = os.environ.get("CI", "").lower() == "true"
# The Redis server the tests use. Each run claims databases of its own on it (see redis_db), so
# two runs on one host never share a queue.
REDIS_SERVER = os.environ.get("AIGC_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
REDIS_CLAIM_SECONDS = 3 * 3600  # a run that dies leaves its claim for this long at most
RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
POSTGRES_URL = os.environ.get("AIGC_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).resolve().parents[1]


def need(service: str, error: Exception | None) -> None:
    """Skip (locally) or fail (in CI) when ``service`` could not be reached."""
    if error is None:
        return
    message = f"{service} is not reachable: {error}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: services are required)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 with the real GPT-2 tokenizer, saved like any HF model."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def redis_db() -> Iterator[Callable[[], str]]:
    """``claim()`` → the URL of a Redis database no other test run on this host is using.

    Claims are keys in database 0 (``SET NX`` with an expiry), so concurrent runs pick distinct
    databases among 1-15; each is flushed when claimed and released at the end of the run.
    """
    admin = redis.Redis.from_url(f"{REDIS_SERVER}/0", socket_connect_timeout=2)
    claimed: list[int] = []

    def claim() -> str:
        try:
            databases = int(admin.config_get("databases").get("databases", 16))
        except redis.ResponseError:  # CONFIG may be disabled (managed Redis)
            databases = 16
        except redis.RedisError as exc:
            need("Redis", exc)
        for number in range(1, databases):
            if admin.set(f"aigc-test:claim:{number}", RUN_ID, nx=True, ex=REDIS_CLAIM_SECONDS):
                claimed.append(number)
                redis.Redis.from_url(f"{REDIS_SERVER}/{number}").flushdb()
                return f"{REDIS_SERVER}/{number}"
        raise AssertionError(f"every Redis database on {REDIS_SERVER} is claimed by another test run")

    yield claim
    for number in claimed:
        redis.Redis.from_url(f"{REDIS_SERVER}/{number}").flushdb()
        if admin.get(f"aigc-test:claim:{number}") == RUN_ID.encode():
            admin.delete(f"aigc-test:claim:{number}")


@pytest.fixture(scope="session")
def run_redis_url(redis_db) -> str:
    """This run's main Redis database."""
    return redis_db()


@pytest.fixture(scope="session")
def spare_redis_url(redis_db) -> str:
    """A second database of this run's: a broker the workers do not listen to."""
    return redis_db()


@pytest.fixture(scope="module")
def redis_url(run_redis_url) -> Iterator[str]:
    """This run's Redis database, empty at the start and end of each module."""
    client = redis.Redis.from_url(run_redis_url, socket_connect_timeout=2)
    client.flushdb()
    yield run_redis_url
    client.flushdb()


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the module, dropped afterwards."""
    server = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"aigc_test_{uuid.uuid4().hex[:12]}"
    try:
        with server.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        need("PostgreSQL", exc)
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    from aigc.schemas.db import get_engine

    get_engine(url).dispose()
    with server.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    server.dispose()


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'aigc.db'}"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


class WorkerProcess:
    """A real ``python -m aigc.workers`` subprocess with its own node name and log file."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None,
                 stdout_path: Path | None = None, extra_args: list[str] | None = None):
        """Its stderr and stdout go to ``log_path``; stdout to ``stdout_path`` instead if given."""
        self.settings = settings
        self.hostname = f"cpu-{uuid.uuid4().hex[:8]}@test"
        self.log_path = log_path
        env = os.environ | settings_env(settings) | (extra_env or {})
        with open(log_path, "wb") as log, open(stdout_path or os.devnull, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aigc.workers", "--devices", "cpu", "--hostname", self.hostname,
                 *(extra_args or [])],
                env=env, stdout=out if stdout_path else log,
                stderr=log if stdout_path else subprocess.STDOUT, cwd=REPO)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        """Block until the worker answers a Celery ping over the broker."""
        app = Celery(set_as_current=False)
        app.conf.update(celery_config(self.settings))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if app.control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``AIGC_*`` environment that reproduces ``settings`` in a subprocess."""
    return settings.to_env()


class InProcessWorker:
    """A real Celery worker (``celery.contrib.testing``'s, a thread pool of one as ``aigc
    worker`` runs) consuming this run's queues in a thread of the test process.

    Real broker, real messages, real SQL, the real tasks, runner and backends: only the process
    boundary is left out, which costs a worker start (torch, transformers) per module and adds
    nothing where no test kills the worker. Tests where crashes, signals, the launcher or the
    command line are the point use :class:`WorkerProcess`.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.hostname = f"inproc-{uuid.uuid4().hex[:8]}@test"

    @contextmanager
    def running(self) -> Iterator[InProcessWorker]:
        from celery.app.trace import setup_worker_optimizations, reset_worker_optimizations
        from celery.contrib.testing.worker import start_worker

        from aigc.schemas.settings import get_settings

        # The tasks read the process's settings, as a worker process reads its environment.
        env = self.settings.to_env()
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        get_settings.cache_clear()
        from aigc.workers import tasks  # noqa: F401 (registers the tasks)
        from aigc.workers.app import app

        app.conf.update(celery_config(self.settings))
        app.conf.worker_hijack_root_logger = False  # leave pytest's log capture alone
        # What `celery worker` does before it starts (celery.apps.worker.Worker.on_before_init):
        # without it, tasks see this machine's name as request.hostname, not the node's.
        setup_worker_optimizations(app, self.hostname)
        try:
            with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False,
                              hostname=self.hostname, shutdown_timeout=60,
                              queues=[queue_name(kind) for kind in Kind]):  # as `aigc worker`'s default
                yield self
        finally:
            reset_worker_optimizations(app)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            get_settings.cache_clear()


@pytest.fixture(scope="module")
def stack(database_url, redis_url, tiny_model):
    """Settings shared by this process and a running worker (in process); small chunks and
    batches."""
    settings = Settings(broker_url=redis_url, database_url=database_url, text_model=str(tiny_model),
                        chunk_size=16, max_batch_rows=8, data_dir=tiny_model.parent)
    upgrade(database_url)
    with InProcessWorker(settings).running() as worker:
        yield settings, worker


def plain_rows(url: str, sql: str, **params) -> list[dict]:
    """Read with plain SQL, no ORM: what a downstream reader sees."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


def run_cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ) | settings_env(settings)
    result = subprocess.run([sys.executable, "-m", "aigc.cli", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"aigc {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result
