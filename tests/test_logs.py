"""Worker logs: AIGC_LOG_FORMAT=json gives one JSON object per line; no password ever shows."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from sqlalchemy.engine import make_url

from aigc import api
from aigc.schemas.db import upgrade
from aigc.schemas.settings import Settings
from aigc.workers.logs import JsonFormatter, TextFormatter, secrets_of

from conftest import WorkerProcess

BROKER_PASSWORD, DATABASE_PASSWORD, FLOWER_PASSWORD = "br0ker-Secret", "db-Secret-pw", "fl0wer-Secret"


def test_the_setting_reaches_a_child_process():
    assert Settings(log_format="json").to_env()["AIGC_LOG_FORMAT"] == "json"
    with pytest.raises(ValueError):
        Settings(log_format="xml")


def test_formatters_redact_the_configured_passwords():
    settings = Settings(broker_url=f"redis://default:{BROKER_PASSWORD}@h:6379/0",
                        database_url=f"postgresql://u:{DATABASE_PASSWORD}@h/db", flower_password=FLOWER_PASSWORD)
    try:
        raise ConnectionError(f"cannot reach redis://default:{BROKER_PASSWORD}@h:6379/0")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "db %s flower %s",
                                   (f"postgresql://u:{DATABASE_PASSWORD}@h/db", FLOWER_PASSWORD),
                                   exc_info=sys.exc_info())
    record.job_id = "j1"
    for formatter in (JsonFormatter(secrets_of(settings)), TextFormatter(secrets_of(settings))):
        line = formatter.format(record)
        assert not any(s in line for s in (BROKER_PASSWORD, DATABASE_PASSWORD, FLOWER_PASSWORD)), line
        assert "***" in line
    entry = json.loads(JsonFormatter([]).format(record))
    assert entry["job_id"] == "j1" and entry["level"] == "ERROR" and "ConnectionError" in entry["exception"]


@pytest.mark.integration
def test_a_real_worker_logs_json_lines_without_secrets(redis_url, postgres_url, tiny_model, tmp_path):
    # Redis without requirepass accepts any password for the default user; PostgreSQL's trust
    # auth ignores it: both URLs carry a password that must never reach the log.
    broker = redis_url.replace("redis://", f"redis://default:{BROKER_PASSWORD}@", 1)
    database = make_url(postgres_url).set(password=DATABASE_PASSWORD).render_as_string(hide_password=False)
    settings = Settings(broker_url=broker, database_url=database, text_model=str(tiny_model), chunk_size=8,
                        max_batch_rows=4, log_format="json", flower_password=FLOWER_PASSWORD,
                        join_jobs=False)  # a line per chunk, each run on its own
    upgrade(database)
    worker = WorkerProcess(settings, tmp_path / "stderr.log", stdout_path=tmp_path / "stdout.log")
    try:
        worker.wait_ready()
        job_id = api.submit("article", [{"prompt": f"Item {i}"} for i in range(20)],
                            params={"max_new_tokens": 3}, settings=settings)
        assert api.wait(job_id, timeout=120, settings=settings).status == "completed"
    finally:
        worker.stop()  # its shutdown lines are checked too
    stderr, stdout = worker.log(), (tmp_path / "stdout.log").read_text()

    entries = [json.loads(line) for line in stderr.splitlines()]  # every line is one object
    for entry in entries:
        assert {"timestamp", "level", "logger", "message"} <= set(entry), entry
        assert entry["timestamp"].endswith("Z")
    chunks = [e for e in entries if e.get("job_id") == job_id]
    assert sorted(e["items"] for e in chunks) == [4, 8, 8]
    for entry in chunks:
        assert (entry["logger"], entry["level"], entry["worker"], entry["device"]) == \
            ("aigc.worker", "INFO", worker.hostname, "cpu")
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
    assert sum(e["done"] for e in chunks) == 20
    assert any("ready" in e["message"] for e in entries)
    assert any("default:***@" in e["message"] for e in entries)  # the start-up line, redacted
    # Celery prints its shutdown notice straight to stdout; nothing else goes there.
    assert all(line.startswith("worker: ") for line in stdout.splitlines() if line.strip()), stdout
    for secret in (BROKER_PASSWORD, DATABASE_PASSWORD, FLOWER_PASSWORD):
        assert secret not in stderr + stdout
