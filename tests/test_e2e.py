"""End to end: the producer API and CLI, real Redis, a real worker process, SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json

import pytest

from aigc import DispatchError, api

from conftest import plain_rows, run_cli

pytestmark = pytest.mark.integration


def test_fifty_articles_land_in_sql(stack, tiny_model):
    settings, worker = stack
    items = [{"topic": f"topic number {i}", "keywords": ["k"] * (i % 4)} for i in range(50)]
    job_id = api.submit("article", items, params={"max_new_tokens": 12}, settings=settings)

    job = api.wait(job_id, timeout=180, settings=settings)

    assert (job.status, job.total, job.done, job.failed) == ("completed", 50, 50, 0)
    assert job.started_at is not None and job.finished_at >= job.started_at
    rows = plain_rows(settings.database_url, "SELECT * FROM results WHERE job_id = :j", j=job_id)
    assert len(rows) == 50
    assert sorted(r["custom_id"] for r in rows) == sorted(f"item-{i}" for i in range(1, 51))
    for row in rows:
        assert row["output_text"], row
        assert row["error_code"] is None
        assert row["prompt_tokens"] > 10 and 1 <= row["output_tokens"] <= 12
        assert row["model"] == str(tiny_model)
        assert row["worker"] == worker.hostname and row["device"] == "cpu"
        assert row["seed"] is not None and row["latency_ms"] > 0
    statuses = plain_rows(settings.database_url,
                          "SELECT status, count(*) AS n FROM items WHERE job_id = :j GROUP BY status",
                          j=job_id)
    assert statuses == [{"status": "done", "n": 50}]


def test_results_come_back_in_submission_order_with_ad_variants(stack):
    settings, _ = stack
    items = [{"custom_id": f"ad-{i}", "product": "boots" + " very" * (7 * i % 11), "n_variants": 2}
             for i in range(10)]
    job_id = api.submit("ad_copy", items, params={"max_new_tokens": 6}, settings=settings)
    assert api.wait(job_id, timeout=120, settings=settings).status == "completed"

    rows = list(api.results(job_id, settings=settings))

    assert [r["custom_id"] for r in rows] == [f"ad-{i}" for i in range(10)]
    for row in rows:
        variants = row["output"]["variants"]
        assert len(variants) == 2 and all("headline" in v for v in variants)
        assert row["params"]["temperature"] > 0  # variants are sampled, never two greedy copies


def test_missing_model_fails_every_item_with_a_clear_error(stack, tmp_path):
    settings, _ = stack
    missing = tmp_path / "no-such-model"
    job_id = api.submit("article", [{"topic": "a"}, {"topic": "b"}], model=str(missing),
                        settings=settings)

    job = api.wait(job_id, timeout=60, settings=settings)

    assert (job.status, job.done, job.failed) == ("failed", 0, 2)
    rows = list(api.results(job_id, settings=settings))
    assert {r["error_code"] for r in rows} == {"model_not_found"}
    assert all(str(missing) in r["error_message"] for r in rows)


def test_cli_submit_wait_status_and_export(stack, tmp_path):
    settings, _ = stack
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"Once upon a time {i}"}) + "\n"
                              for i in range(5)), encoding="utf-8")

    submitted = run_cli(settings, "submit", str(source), "--kind", "article",
                        "--max-new-tokens", "5", "--wait", "--timeout", "120")
    job_id = submitted.stdout.strip()
    assert "completed" in submitted.stderr

    shown = run_cli(settings, "status", job_id)
    assert job_id[:8] in shown.stdout and "completed" in shown.stdout

    out_jsonl = tmp_path / "out.jsonl"
    run_cli(settings, "results", job_id, "--format", "jsonl", "-o", str(out_jsonl))
    lines = [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()]
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(5)]
    assert all(line["output"]["text"] == line["output_text"] and line["output_tokens"] for line in lines)

    out_csv = tmp_path / "out.csv"
    run_cli(settings, "results", job_id, "--format", "csv", "-o", str(out_csv))
    with open(out_csv, newline="", encoding="utf-8") as stream:
        records = list(csv.DictReader(stream))
    assert [r["custom_id"] for r in records] == [f"c{i}" for i in range(5)]
    assert all(json.loads(r["params"])["max_new_tokens"] == 5 for r in records)


def test_cli_refuses_a_bad_file_and_creates_nothing(stack, tmp_path):
    settings, _ = stack
    source = tmp_path / "bad.jsonl"
    source.write_text('{"topic": "fine"}\n{"topic": \n{"tone": "calm"}\n', encoding="utf-8")
    before = plain_rows(settings.database_url, "SELECT count(*) AS n FROM jobs")[0]["n"]

    result = run_cli(settings, "submit", str(source), "--kind", "article", check=False)

    assert result.returncode == 2
    assert "2:-: invalid JSON" in result.stderr
    assert "3:topic: Field required" in result.stderr
    assert "no job was created" in result.stderr
    assert plain_rows(settings.database_url, "SELECT count(*) AS n FROM jobs")[0]["n"] == before


def test_csv_and_openai_batch_files_round_trip(stack, tmp_path):
    settings, _ = stack
    table = tmp_path / "ads.csv"
    table.write_text("custom_id,product,audience,n_variants,params.max_new_tokens\n"
                     "a1,boots,hikers,2,6\n"
                     'a2,"lamp, solar",gardeners,1,4\n', encoding="utf-8")
    job_id = run_cli(settings, "submit", str(table), "--kind", "ad_copy", "--wait",
                     "--timeout", "120").stdout.strip()
    rows = list(api.results(job_id, settings=settings))
    assert [(r["custom_id"], len(r["output"].get("variants", [None]))) for r in rows] == [("a1", 2), ("a2", 1)]
    assert [r["params"]["max_new_tokens"] for r in rows] == [6, 4]

    batch = tmp_path / "batch.jsonl"
    lines = [{"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-x", "max_tokens": 5, "messages": [
                  {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}},
             {"custom_id": "done-2", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "Once", "max_tokens": 3, "n": 2, "temperature": 0.7, "seed": 5}}]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    job_id = run_cli(settings, "submit", str(batch), "--kind", "article", "--wait",
                     "--timeout", "120").stdout.strip()
    out = [json.loads(line) for line in
           run_cli(settings, "results", job_id, "--format", "openai").stdout.splitlines()]

    assert [o["custom_id"] for o in out] == ["chat-1", "done-2"]
    assert all(o["error"] is None and o["response"]["status_code"] == 200 for o in out)
    assert [len(o["response"]["body"]["choices"]) for o in out] == [1, 2]
    assert out[1]["response"]["body"]["usage"]["completion_tokens"] <= 6
    stored = {r["custom_id"]: r for r in api.results(job_id, settings=settings)}
    assert stored["done-2"]["seed"] == 5 and stored["chat-1"]["params"]["stop"] == ["\nUser:"]


def test_jobs_submitted_while_one_runs_join_its_batch_and_keep_their_own_rows(stack):
    settings, worker = stack
    long = api.submit("article", [{"prompt": f"Once {i}"} for i in range(2)], settings=settings,
                      params={"max_new_tokens": 240, "min_new_tokens": 240})  # 2 rows of 8: room
    articles = api.submit("article", [{"topic": f"bees {i}"} for i in range(3)], settings=settings,
                          params={"max_new_tokens": 10})
    ads = api.submit("ad_copy", [{"product": f"boots {i}", "n_variants": 1} for i in range(2)],
                     settings=settings, params={"max_new_tokens": 10})

    for job_id, total in ((long, 2), (articles, 3), (ads, 2)):
        job = api.wait(job_id, timeout=120, settings=settings)
        assert (job.status, job.done) == ("completed", total)
        rows = list(api.results(job_id, settings=settings))
        assert len(rows) == total and all(r["output_text"] and r["worker"] == worker.hostname for r in rows)
    runs = {job_id: plain_rows(settings.database_url, "SELECT * FROM chunk_runs WHERE job_id = :j", j=job_id)
            for job_id in (long, articles, ads)}
    assert [len(r) for r in runs.values()] == [1, 1, 1]  # the later jobs' own messages found nothing left
    (first,) = runs[long]
    for job_id in (articles, ads):  # each ran inside the long job's run, with its own counts
        (run,) = runs[job_id]
        assert first["started_at"] <= run["started_at"] < first["finished_at"]
        assert run["done"] == run["claimed"] == len(list(api.results(job_id, settings=settings)))



def test_items_a_worker_hands_back_are_sent_again_as_a_chunk_the_workers_run(stack):
    """``tasks.requeue`` (joined items a failed run left unfinished) sends the message the
    producer sends: a real worker takes it from the real broker and finishes the job."""
    from aigc.schemas.db import get_engine
    from aigc.workers import store
    from aigc.workers.tasks import requeue

    settings, worker = stack
    offline = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with pytest.raises(DispatchError) as raised:  # saved in SQL, never sent
        api.submit("article", [{"prompt": f"Back {i}"} for i in range(3)], params={"max_new_tokens": 4},
                   settings=offline)
    job_id = raised.value.job_id
    ids = [row["id"] for row in plain_rows(settings.database_url, "SELECT id FROM items WHERE job_id = :j "
                                           "ORDER BY id", j=job_id)]

    requeue(store.load_job(engine=get_engine(settings.database_url), job_id=job_id), 3, ids)

    job = api.wait(job_id, timeout=120, settings=settings)
    assert (job.status, job.done) == ("completed", 3)
    assert {r["worker"] for r in api.results(job_id, settings=settings)} == {worker.hostname}
