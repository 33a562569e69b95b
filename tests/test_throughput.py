"""Throughput in SQL (chunk_runs and its views) and `aigc status --watch`, after real jobs ran
through a real worker on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from aigc import DispatchError, api, control

from conftest import REPO, plain_rows, settings_env

pytestmark = pytest.mark.integration

DOC = (REPO / "docs" / "results-table.md").read_text(encoding="utf-8")
THROUGHPUT_QUERIES = re.findall(r"```sql\n(.*?)```", DOC.split("## Throughput", 1)[1], flags=re.S)


def test_chunk_runs_and_the_throughput_views_after_a_real_job(stack):
    settings, worker = stack
    items = [{"prompt": f"Line {i} of the story"} for i in range(40)]  # 3 chunks of at most 16
    job_id = api.submit("article", items, params={"max_new_tokens": 6}, settings=settings)
    assert api.wait(job_id, timeout=180, settings=settings).status == "completed"
    url = settings.database_url

    runs = plain_rows(url, "SELECT * FROM chunk_runs WHERE job_id = :j", j=job_id)
    tokens = plain_rows(url, "SELECT SUM(output_tokens) AS n, SUM(prompt_tokens) AS p "
                             "FROM results WHERE job_id = :j", j=job_id)[0]
    # 3 chunks of at most 16; later chunks' items may join an earlier chunk's run (and count in it)
    assert 1 <= len(runs) <= 3 and sum(r["items"] for r in runs) == 40
    assert sum(r["claimed"] for r in runs) == sum(r["done"] for r in runs) == 40
    assert sum(r["output_tokens"] for r in runs) == tokens["n"] > 0
    assert sum(r["prompt_tokens"] for r in runs) == tokens["p"] > 0
    assert {(r["worker"], r["device"], r["failed"], r["artifacts"]) for r in runs} == {(worker.hostname, "cpu", 0, 0)}
    assert all(r["duration_ms"] > 0 for r in runs)

    answers = [plain_rows(url, sql, job=job_id, worker=worker.hostname) for sql in THROUGHPUT_QUERIES]
    assert len(answers) == 3
    (job,), (per_worker,), by_job_and_worker = answers
    assert (job["done"], job["failed"], job["output_tokens"], job["artifacts_per_s"]) == (40, 0, tokens["n"], 0)
    assert job["wall_seconds"] > 0 and job["busy_seconds"] > 0
    assert job["items_per_s"] == pytest.approx(40 / job["wall_seconds"])
    assert job["tokens_per_s"] == pytest.approx(tokens["n"] / job["wall_seconds"])
    assert per_worker["worker"] == worker.hostname and per_worker["device"] == "cpu"
    assert per_worker["items"] >= 40 and per_worker["tokens_per_s"] > 0
    assert per_worker["items_per_s"] == pytest.approx(per_worker["items"] / per_worker["busy_seconds"])
    section = DOC.split("## Throughput", 1)[1]
    views = [plain_rows(url, f"SELECT * FROM {view}")[0] for view in ("job_throughput", "worker_throughput")]
    for name in [*views[0], *views[1]]:
        assert f"`{name}`" in section, f"view column {name} is undocumented"
    mine = [r for r in by_job_and_worker if r["job_id"] == job_id]
    assert [(r["worker"], r["chunks"], r["items"]) for r in mine] == [(worker.hostname, len(runs), 40)]


def _undispatched_job(settings, n: int) -> str:
    """A job stored in SQL whose messages never reached a broker: nothing runs it until resumed."""
    offline = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with pytest.raises(DispatchError) as raised:
        api.submit("article", [{"prompt": f"Item {i}"} for i in range(n)],
                   params={"max_new_tokens": 4}, settings=offline)
    return re.search(r"job ([0-9a-f-]{36})", str(raised.value)).group(1)


class Cli:
    """`aigc ARGS` as a subprocess; stdout is read on a thread, so its lines can be awaited."""

    def __init__(self, settings, *args: str):
        env = os.environ | settings_env(settings) | {"COLUMNS": "200"}
        # Ctrl-C must reach it as it does from a terminal: a test run started in the background
        # of a script ignores SIGINT, and a child would inherit that (a handler is not inherited).
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "aigc.cli", *args], env=env,
                                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.lines: list[str] = []
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("watching"):
                self.started.set()
        self.started.set()

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self.reader.join(10)
        return code, "".join(self.lines)


def test_status_watch_follows_running_jobs_until_they_finish(stack):
    settings, _ = stack
    job_id = _undispatched_job(settings, 24)
    watcher = Cli(settings, "status", "--watch", "--interval", "0.2")
    assert watcher.started.wait(60), watcher.lines
    assert watcher.process.poll() is None, watcher.lines  # the job is queued: it keeps watching
    assert control.resume(job_id, settings=settings) == 24

    code, output = watcher.finish()

    assert code == 0, output
    assert f"job {job_id}: completed (24 done, 0 failed, 24 total)" in output
    assert re.search(r"article " + job_id[:8] + r".*24/24 .*0 failed .*items/s .*tok/s .*completed", output), output


def test_status_watch_stops_on_ctrl_c_and_exits_0(stack):
    settings, _ = stack
    job_id = _undispatched_job(settings, 3)
    watcher = Cli(settings, "status", job_id, "--watch", "--interval", "0.2")
    try:
        assert watcher.started.wait(60), watcher.lines
        watcher.process.send_signal(signal.SIGINT)
        code, output = watcher.finish(60)
    finally:
        control.cancel(job_id, settings=settings)

    assert code == 0, output
    assert f"job {job_id}: queued (0 done, 0 failed, 3 total)" in output
