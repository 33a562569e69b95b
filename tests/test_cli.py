"""The `aigc` command line for scripts: full values off a terminal, --json, --version, and one
line with a documented exit code when the database, the broker or a setting is wrong."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from aigc import api
from aigc.schemas.settings import Settings

from conftest import REPO

pytestmark = pytest.mark.integration

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def aigc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`aigc ARGS` with stdout and stderr piped (not a terminal), in a clean AIGC_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_") and k != "COLUMNS"}
    return subprocess.run([sys.executable, "-m", "aigc.cli", *args], env=base | (env or {}),
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def settings(redis_url, database_url, tmp_path):
    from aigc.schemas.db import upgrade

    upgrade(database_url)
    return Settings(broker_url=redis_url, database_url=database_url, data_dir=tmp_path)


def test_version():
    from importlib.metadata import version

    shown = aigc("--version")
    assert (shown.returncode, shown.stdout) == (0, f"aigc {version('aigc')}\n")


def test_status_piped_shows_full_values_and_json_parses(settings):
    job_id = api.submit("ad_copy", [{"product": "boots"}], metadata={"team": "a"}, settings=settings)
    env = settings.to_env()

    listed = aigc("status", env=env)
    shown = aigc("status", job_id, env=env)
    as_list = aigc("status", "--json", env=env)
    as_one = aigc("status", job_id, "--json", env=env)

    assert listed.returncode == shown.returncode == as_list.returncode == as_one.returncode == 0
    line = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "ad_copy" in line and "queued" in line and "…" not in listed.stdout
    assert job_id in shown.stdout and "…" not in shown.stdout
    document = json.loads(as_one.stdout)
    assert {k: document[k] for k in ("id", "kind", "status", "total", "done", "failed", "metadata")} == \
        {"id": job_id, "kind": "ad_copy", "status": "queued", "total": 1, "done": 0, "failed": 0,
         "metadata": {"team": "a"}}
    assert re.match(r"\d{4}-\d\d-\d\dT", document["created_at"])
    assert job_id in [job["id"] for job in json.loads(as_list.stdout)]
    assert aigc("status", "no-such-job", "--json", env=env).returncode == 1


def test_broker_down_prints_the_stored_job_id_and_an_unbroken_resume_command(database_url, tmp_path):
    from aigc.schemas.db import upgrade

    upgrade(database_url)
    items = tmp_path / "items.jsonl"
    items.write_text('{"topic": "tides"}\n', encoding="utf-8")
    env = Settings(broker_url="redis://127.0.0.1:1/0", database_url=database_url, data_dir=tmp_path).to_env()

    submitted = aigc("submit", str(items), "--kind", "article", env=env)

    assert submitted.returncode == 3
    assert re.fullmatch(UUID + "\n", submitted.stdout), submitted.stdout
    assert f"run `aigc resume {submitted.stdout.strip()}` once the broker is back" in submitted.stderr
    assert api.status(submitted.stdout.strip(), settings=Settings(database_url=database_url)).total == 1


@pytest.mark.parametrize("args", [["status"], ["status", "some-job"], ["status", "--json"],
                                  ["submit", "ITEMS", "--kind", "article"], ["results", "some-job"],
                                  ["cancel", "some-job"], ["resume", "some-job"], ["sweep"], ["db", "upgrade"]])
def test_an_unreachable_database_is_one_line_and_exit_5_for_every_command(args, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"topic": "tides"}\n', encoding="utf-8")
    args = [str(items) if a == "ITEMS" else a for a in args]
    env = {"AIGC_DATABASE_URL": "postgresql://app:Secret-pw-4242@127.0.0.1:1/app",
           "AIGC_BROKER_URL": "redis://127.0.0.1:1/0"}

    failed = aigc(*args, env=env)

    assert failed.returncode == 5, failed.stderr
    (line,) = failed.stderr.splitlines()
    assert line.startswith("aigc: database postgresql://app:***@127.0.0.1:1/app is unreachable: "), line
    assert "Secret" not in failed.stderr + failed.stdout


def test_a_bad_setting_is_one_line_exit_6_and_never_shows_the_password():
    failed = aigc("status", env={"AIGC_DATABASE_URL": "mysql://app:LeakMe-4242@db/app"})

    assert failed.returncode == 6
    assert failed.stderr == "aigc: invalid settings: AIGC_DATABASE_URL must be sqlite:// or postgresql://\n"


def test_sweep_touches_its_alive_file_after_a_pass(settings, tmp_path):
    alive = tmp_path / "sweeper.alive"
    swept = aigc("sweep", "--alive-file", str(alive), env=settings.to_env())
    assert swept.returncode == 0 and alive.exists()


def test_reusing_a_key_with_another_file_is_refused_naming_the_conflict(settings, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"topic": "tides"}\n', encoding="utf-8")
    second.write_text('{"topic": "bees"}\n', encoding="utf-8")
    env = settings.to_env()
    job_id = aigc("submit", str(first), "--kind", "article", "--key", "k-files", env=env).stdout.strip()

    again = aigc("submit", str(first), "--kind", "article", "--key", "k-files", env=env)
    other = aigc("submit", str(second), "--kind", "article", "--key", "k-files", env=env)
    kind = aigc("submit", str(first), "--kind", "ad_copy", "--key", "k-files", env=env)

    assert (again.returncode, again.stdout.strip()) == (0, job_id)
    assert other.returncode == 2 and f"belongs to job {job_id}, submitted with a different items" in other.stderr
    assert kind.returncode == 2  # the file does not even fit ad_copy: refused before the key


def test_results_of_an_unknown_job_raise_like_wait(settings):
    with pytest.raises(LookupError, match="no job nope"):
        api.results("nope", settings=settings)


def test_watch_shows_the_job_s_own_elapsed_time(settings):
    from datetime import timedelta

    from sqlalchemy import update

    from aigc.schemas.db import get_engine
    from aigc.schemas.tables import Job, utcnow

    job_id = api.submit("article", [{"topic": "a"}], settings=settings)
    start = utcnow() - timedelta(seconds=3725)
    with get_engine(settings.database_url).begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(
            status="completed", started_at=start, finished_at=start + timedelta(seconds=3725), done=1))
    watched = aigc("status", job_id, "--watch", env=settings.to_env() | {"COLUMNS": "200"})
    assert watched.returncode == 0
    assert "1:02:05" in watched.stdout, watched.stdout  # started an hour ago, not when the watch began


def test_the_results_table_shows_each_ad_variant_as_its_labelled_lines():
    from rich.console import Console

    from aigc.progress import results_table

    def variant(i: int) -> dict:
        parts = (f"Sunshine and Light {i}", "We're your unique sun-loving companion, perfect for your home.",
                 "Create your own spell of beauty today by visiting our solar garden lamp!")
        text = "\n".join(f"{label}: {part}" for label, part in zip(("Headline", "Body", "Call to action"), parts))
        return dict(zip(("headline", "body", "cta"), parts)) | {"text": text, "finish_reason": "stop"}

    row = {"prompt_tokens": 150, "output_tokens": 78, "error_code": None, "worker": "w", "device": "cpu"}
    rows = [row | {"custom_id": "two", "output": {"variants": [variant(1), variant(2)]}, "output_text": "x" * 400},
            row | {"custom_id": "five", "output": {"variants": [variant(i) for i in range(5)]}, "output_text": ""}]
    console = Console(width=260, record=True)
    console.print(results_table(rows, title="ad_copy"))
    # the output column of each table line: "│ custom_id │ output │ tokens │ worker │"
    cells = [" ".join(line.split("│")[2].split()) for line in console.export_text().splitlines()
             if line.count("│") == 5]

    heads = [at for at, cell in enumerate(cells) if cell.startswith("Headline:")]
    assert [cells[at] for at in heads] == [f"Headline: Sunshine and Light {i}" for i in (1, 2, 0, 1, 2)]
    for at in heads:  # each on lines of its own, whole, not run together into one clipped paragraph
        assert cells[at + 1:at + 3] == ["Body: We're your unique sun-loving companion, perfect for your home.",
                                        "Call to action: Create your own spell of beauty today by visiting our "
                                        "solar garden lamp!"]
    assert "… 2 more variant(s)" in cells and "Headline: Sunshine and Light 3" not in cells
