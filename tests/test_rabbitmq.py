"""RabbitMQ as the broker, end to end: kombu decides which broker URLs work, not an allow-list."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from aigc import api
from aigc.schemas.db import upgrade
from aigc.schemas.settings import Settings

from conftest import WorkerProcess, need, plain_rows

pytestmark = pytest.mark.integration

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672"


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost():
    """A virtual host of this test's own (queues named like the kinds are then ours alone)."""
    if shutil.which("rabbitmqctl") is None:
        need("RabbitMQ", FileNotFoundError("rabbitmqctl is not installed"))
    name = f"aigc-test-{uuid.uuid4().hex[:8]}"
    try:
        rabbitmqctl("add_vhost", name)
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except (subprocess.SubprocessError, OSError) as exc:
        need("RabbitMQ", exc)
    yield name
    rabbitmqctl("delete_vhost", name)


def test_a_job_runs_through_rabbitmq(vhost, sqlite_url, tiny_model, tmp_path):
    upgrade(sqlite_url)
    settings = Settings(broker_url=f"{RABBITMQ}/{vhost}", database_url=sqlite_url,
                        text_model=str(tiny_model), chunk_size=4, data_dir=tmp_path)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        job_id = api.submit("article", [{"topic": f"t{i}"} for i in range(10)],
                            params={"max_new_tokens": 4}, settings=settings)
        job = api.wait(job_id, timeout=120, settings=settings)
    finally:
        worker.stop()
    assert (job.status, job.done) == ("completed", 10), worker.log()
    rows = plain_rows(sqlite_url, "SELECT DISTINCT worker FROM results WHERE job_id = :j", j=job_id)
    assert [r["worker"] for r in rows] == [worker.hostname]
    assert "guest:guest" not in worker.log()  # the start-up line shows the URL redacted
