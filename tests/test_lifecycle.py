"""Cancel, resume, skip-invalid and every export format, against a real worker."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
import redis

from aigc import api, control
from aigc.schemas.dispatch import queue_name
from aigc.schemas.parsing import InputError
from aigc.schemas.settings import Settings

from conftest import WorkerProcess, plain_rows, run_cli

pytestmark = pytest.mark.integration


def queue_length(settings, kind="article") -> int:
    client = redis.Redis.from_url(settings.broker_url)
    return sum(client.llen(key) for key in client.keys(queue_name(kind) + "*"))


def test_cancel_mid_job_keeps_finished_results_and_starts_nothing_more(stack):
    settings, _ = stack
    fine_chunks = settings.model_copy(update={"chunk_size": 2})
    job_id = api.submit("article", [{"prompt": f"Story {i}:"} for i in range(300)],
                        params={"max_new_tokens": 48}, settings=fine_chunks)
    deadline = time.monotonic() + 60
    while api.status(job_id, settings=settings).done < 6:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)

    assert control.cancel(job_id, settings=settings) in ("cancelling", "cancelled")
    job = api.wait(job_id, timeout=60, settings=settings)
    drained = time.monotonic() + 60
    while queue_length(settings):  # the worker drains the remaining messages, running none
        assert time.monotonic() < drained, "the worker did not drain the cancelled job's messages"
        time.sleep(0.1)
    time.sleep(1.0)

    job = api.status(job_id, settings=settings)
    assert job.status == "cancelled" and job.cancel_requested_at and job.finished_at
    assert 6 <= job.done < 300 and job.failed == 0
    results = plain_rows(settings.database_url, "SELECT custom_id FROM results WHERE job_id = :j", j=job_id)
    statuses = dict((r["status"], r["n"]) for r in plain_rows(
        settings.database_url, "SELECT status, count(*) AS n FROM items WHERE job_id = :j GROUP BY status", j=job_id))
    assert len(results) == job.done == statuses["done"]
    assert statuses["cancelled"] == 300 - job.done and set(statuses) == {"done", "cancelled"}
    assert control.cancel(job_id, settings=settings) == "cancelled"  # idempotent
    with pytest.raises(ValueError, match="cancelled job is not resumed"):
        control.resume(job_id, settings=settings)


def test_resume_resends_what_the_broker_lost(stack, spare_redis_url):
    settings, _ = stack
    elsewhere = settings.model_copy(update={"broker_url": spare_redis_url})
    lost = redis.Redis.from_url(elsewhere.broker_url)
    job_id = api.submit("article", [{"topic": f"t{i}"} for i in range(20)],
                        params={"max_new_tokens": 4}, settings=elsewhere)
    lost.flushdb()  # the messages are gone; the rows are not
    time.sleep(0.5)
    assert api.status(job_id, settings=settings).status == "queued"

    result = run_cli(settings, "resume", job_id)
    assert "20 item(s) re-sent" in result.stderr
    job = api.wait(job_id, timeout=120, settings=settings)

    assert (job.status, job.done) == ("completed", 20)
    assert control.resume(job_id, settings=settings) == 0  # nothing left to send


def test_skip_invalid_submits_the_good_lines_and_files_the_bad(stack, tmp_path):
    settings, _ = stack
    source = tmp_path / "mixed.jsonl"
    source.write_text('{"topic": "a"}\n{"topic": 5}\nnot json\n{"topic": "b"}\n', encoding="utf-8")

    result = run_cli(settings, "submit", str(source), "--kind", "article", "--skip-invalid",
                     "--max-new-tokens", "3", "--wait", "--timeout", "120")

    job_id = result.stdout.strip()
    assert "2 problem(s) skipped" in result.stderr
    rejected = [json.loads(line) for line in (tmp_path / "mixed.jsonl.errors.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejected] == [(2, "topic"), (3, "-")]
    assert [r["custom_id"] for r in api.results(job_id, settings=settings)] == ["item-1", "item-4"]


def test_every_export_format_describes_every_result(stack, tmp_path):
    settings, _ = stack
    items = [{"custom_id": "p", "prompt": "Hello"}, {"custom_id": "q", "prompt": "World", "params": {"n": 2}},
             {"custom_id": "long", "prompt": "word " * 400}]
    job_id = api.submit("article", items, params={"max_new_tokens": 5}, settings=settings)
    assert api.wait(job_id, timeout=120, settings=settings).status == "completed_with_errors"
    rows = list(api.results(job_id, settings=settings))

    run_cli(settings, "results", job_id, "--format", "parquet", "-o", str(tmp_path / "r.parquet"))
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [r["custom_id"] for r in table] == ["p", "q", "long"]
    assert [r["output_text"] for r in table] == [r["output_text"] for r in rows]
    assert [r["finish_reason"] for r in table] == ["length", "length", None]
    assert json.loads(table[1]["params"])["temperature"] > 0 and table[2]["error_code"] == "prompt_too_long"
    assert json.loads(table[1]["params"])["n"] == 2

    only_errors = run_cli(settings, "results", job_id, "--errors").stdout.splitlines()
    assert [json.loads(line)["custom_id"] for line in only_errors] == ["long"]
    refused = run_cli(settings, "results", job_id, "--format", "parquet", check=False)
    assert refused.returncode == 2 and "needs --output" in refused.stderr


def test_openai_exports_validate_with_the_official_sdk(stack, tmp_path):
    """Chat lines come back as chat.completion, completion lines as text_completion, failures
    in OpenAI's error file: each checked by the openai package's own types."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    settings, _ = stack
    source = tmp_path / "batch.jsonl"
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}},
        {"custom_id": "two", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2, "seed": 5}},
        {"custom_id": "text", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 5}},
        {"custom_id": "huge", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "Once upon", "max_tokens": 4000}},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    job_id = run_cli(settings, "submit", str(source), "--wait", "--timeout", "120", check=False).stdout.strip()
    output = [json.loads(line) for line in run_cli(settings, "results", job_id, "--format", "openai").stdout.splitlines()]
    errors = [json.loads(line) for line in
              run_cli(settings, "results", job_id, "--format", "openai", "--errors").stdout.splitlines()]

    assert api.status(job_id, settings=settings).kind == "article"  # no --kind for an OpenAI file
    assert [line["custom_id"] for line in output] == ["chat", "two", "text"]
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["id"].startswith("batch_req_") and line["response"]["status_code"] == 200
    chat = ChatCompletion.model_validate(output[0]["response"]["body"])
    two = ChatCompletion.model_validate(output[1]["response"]["body"])
    text = Completion.model_validate(output[2]["response"]["body"])
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 6 and chat.usage.total_tokens == chat.usage.prompt_tokens + 6
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 8
    assert text.object == "text_completion" and text.choices[0].text and text.choices[0].finish_reason == "length"
    assert text.model == chat.model == api.status(job_id, settings=settings).model
    rows = {r["custom_id"]: r for r in api.results(job_id, settings=settings)}
    assert chat.choices[0].message.content == rows["chat"]["output_text"]
    assert len({chat.id, two.id, text.id}) == 3

    assert [line["custom_id"] for line in errors] == ["huge"]
    assert errors[0]["response"] is None and errors[0]["error"]["code"] == "max_new_tokens_too_large"
    assert "max_new_tokens=4000" in errors[0]["error"]["message"]
    again = run_cli(settings, "results", job_id, "--format", "openai").stdout.splitlines()
    assert [json.loads(line) for line in again] == output  # ids are stable across exports


def test_higher_priority_jobs_run_first(spare_redis_url, sqlite_url, tiny_model, tmp_path):
    broker = spare_redis_url
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(broker_url=broker, database_url=sqlite_url, text_model=str(tiny_model),
                        chunk_size=4)
    items = [{"prompt": f"Line {i}"} for i in range(4)]
    order = [("low", 0), ("urgent", 9), ("middle", 5)]
    jobs = {name: api.submit("article", items, params={"max_new_tokens": 8}, priority=p,
                             metadata={"name": name}, settings=settings) for name, p in order}
    with pytest.raises(InputError, match="0:priority"):
        api.submit("article", items, priority=10, settings=settings)

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        finished = {name: api.wait(job_id, timeout=120, settings=settings).finished_at
                    for name, job_id in jobs.items()}
    finally:
        worker.stop()
    assert sorted(finished, key=finished.get) == ["urgent", "middle", "low"]


def test_sweep_finishes_jobs_whose_messages_or_workers_were_lost(stack, spare_redis_url):
    from datetime import timedelta

    from sqlalchemy import update

    from aigc.schemas.db import get_engine
    from aigc.schemas.tables import Item, Job, utcnow

    settings, _ = stack
    elsewhere = settings.model_copy(update={"broker_url": spare_redis_url})
    lost = api.submit("article", [{"topic": f"t{i}"} for i in range(6)], params={"max_new_tokens": 3},
                      settings=elsewhere)
    dead = api.submit("article", [{"topic": f"d{i}"} for i in range(4)], params={"max_new_tokens": 3},
                      settings=elsewhere)
    # An API batch past its completion window, its messages lost and two of its items held by
    # a dead worker: with no `aigc serve` running, the sweep expires it instead of re-sending.
    overdue = api.submit("article", [{"topic": f"o{i}"} for i in range(5)], params={"max_new_tokens": 3},
                         settings=elsewhere)
    redis.Redis.from_url(elsewhere.broker_url).flushdb()
    past = utcnow() - timedelta(hours=1)
    with get_engine(settings.database_url).begin() as connection:  # a worker died holding these
        connection.execute(update(Item).where(Item.job_id == dead).values(
            status="leased", lease_owner="gone@host/1", lease_expires_at=past, attempts=1))
        connection.execute(update(Item).where(Item.job_id == overdue, Item.index < 2).values(
            status="leased", lease_owner="gone@host/1", lease_expires_at=past, attempts=1))
        connection.execute(update(Job).where(Job.id.in_([lost, dead, overdue])).values(updated_at=past))
        connection.execute(update(Job).where(Job.id == overdue).values(
            expires_at=past, completion_window="24h", endpoint="/v1/completions", input_file_id="file-in"))
    fresh = api.submit("article", [{"topic": "f"}], params={"max_new_tokens": 3}, settings=elsewhere)

    swept = run_cli(settings, "sweep", "--stale", "600").stderr

    assert f"job {lost}: 6 item(s) re-sent" in swept and f"job {dead}: 4 item(s) re-sent" in swept
    assert fresh not in swept  # progress is recent: left alone
    assert f"job {overdue}: expired (its completion window ended)" in swept
    assert f"job {overdue}: " not in swept.replace(f"job {overdue}: expired", "")  # nothing re-sent
    job = api.status(overdue, settings=settings)
    assert job.status == "cancelled" and job.expired_at and job.done == 0
    assert plain_rows(settings.database_url, "SELECT DISTINCT status FROM items WHERE job_id = :j",
                      j=overdue) == [{"status": "cancelled"}]
    from openai.types import Batch

    from aigc.server.batches import batch_object

    shown = Batch.model_validate(batch_object(job, {}, None))  # what `aigc serve` then answers
    assert shown.status == "expired" and shown.expired_at >= shown.expires_at
    for job_id, n in ((lost, 6), (dead, 4)):
        job = api.wait(job_id, timeout=120, settings=settings)
        assert (job.status, job.done) == ("completed", n)
    assert control.sweep(stale_seconds=0, settings=settings).get(lost) is None
    control.cancel(fresh, settings=settings)
