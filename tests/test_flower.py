"""Flower on the real broker, started by `aigc flower`: authentication on, workers and tasks seen,
Prometheus metrics, and the dashboard rendered by headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from aigc import api
from aigc.schemas.settings import Settings

from conftest import REPO, WorkerProcess, need

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_flower_requires_a_password():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    result = subprocess.run([sys.executable, "-m", "aigc.cli", "flower"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "AIGC_FLOWER_PASSWORD" in result.stderr


@pytest.fixture(scope="module")
def flower(redis_url, sqlite_url, tiny_model, tmp_path_factory):
    """`aigc flower` with basic auth and a real worker that has finished one job of 3 items."""
    tmp = tmp_path_factory.mktemp("flower")
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, text_model=str(tiny_model),
                        flower_user="ops", flower_password="s3cret-pw")
    worker = WorkerProcess(settings, tmp / "worker.log")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "aigc.cli", "flower", "--port", str(port)],
                               env=os.environ | settings.to_env(), cwd=REPO,
                               stdout=open(tmp / "flower.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        worker.wait_ready()
        deadline = time.monotonic() + 60
        while get(f"{base}/healthcheck")[0] != 200:
            assert process.poll() is None and time.monotonic() < deadline, (tmp / "flower.log").read_text()
            time.sleep(0.3)
        job_id = api.submit("article", [{"prompt": "Hello"}] * 3, params={"max_new_tokens": 3}, settings=settings)
        api.wait(job_id, timeout=60, settings=settings)
        yield base, worker, job_id, tmp
    finally:
        process.terminate()
        process.wait(20)
        worker.stop()
    assert "s3cret-pw" not in (tmp / "flower.log").read_text()


AUTH = ("ops", "s3cret-pw")


def test_flower_shows_the_worker_and_its_tasks_behind_auth(flower):
    base, worker, job_id, _ = flower
    assert get(f"{base}/api/workers")[0] == 401
    assert get(f"{base}/api/workers", ("ops", "wrong"))[0] == 401
    assert get(f"{base}/", None)[0] == 401
    status, body = get(f"{base}/api/workers?refresh=1", AUTH)
    assert status == 200 and worker.hostname in json.loads(body)
    mine = wait_for_tasks(base, job_id)
    assert {t["name"] for t in mine} == {"aigc.article"}  # one name per kind; the job is an argument
    assert all(t["kwargs"] == "{'items': 3}" for t in mine), mine  # the chunk's size
    assert all(t["sent"] for t in mine)  # the producer's task-sent event: queued chunks are seen
    by_name = json.loads(get(f"{base}/api/tasks?taskname=aigc.article", AUTH)[1])
    assert {t["uuid"] for t in mine} <= set(by_name)


def wait_for_tasks(base: str, job_id: str) -> list[dict]:
    """The job's tasks as Flower knows them, once all have succeeded."""
    deadline = time.monotonic() + 30
    while True:
        tasks = json.loads(get(f"{base}/api/tasks", AUTH)[1])
        mine = [t for t in tasks.values() if job_id in str(t.get("args"))]
        if mine and all(t["state"] == "SUCCESS" for t in mine):
            return mine
        assert time.monotonic() < deadline, tasks
        time.sleep(0.5)


def test_prometheus_metrics_count_the_job_s_task_events(flower):
    base, worker, job_id, _ = flower
    wait_for_tasks(base, job_id)
    status, body = get(f"{base}/metrics", AUTH)
    assert status == 200
    metrics = body.decode()
    task = "aigc.article"
    for event in ("task-received", "task-started", "task-succeeded"):
        assert re.search(rf'flower_events_total{{task="{task}",type="{event}",worker="{worker.hostname}"}} \d', metrics)
    assert f'flower_worker_online{{worker="{worker.hostname}"}} 1.0' in metrics
    assert f'flower_task_runtime_seconds_count{{task="{task}",worker="{worker.hostname}"}}' in metrics
    # Flower 2.2 serves /metrics (and /healthcheck) without authentication, for scrapers:
    # docs/operations.md says so; this notices if a Flower upgrade changes it.
    assert get(f"{base}/metrics")[0] == 200


def chromium(*args: str, profile) -> subprocess.CompletedProcess:
    binary = os.environ.get("AIGC_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    need("Chromium", None if binary else FileNotFoundError("no chromium on PATH (apt-get install chromium)"))
    # --virtual-time-budget lets the page's scripts (DataTables filling the worker table from
    # /workers?json=1) finish before the DOM or the screenshot is taken.
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,720",
                           "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_dashboard_renders_the_worker_in_headless_chromium(flower):
    base, worker, job_id, tmp = flower
    wait_for_tasks(base, job_id)
    # Chromium takes the credentials from the URL for a top-level navigation and reuses them
    # for the page's own requests (same origin, same realm).
    page = base.replace("http://", "http://ops:s3cret-pw@") + "/workers"
    denied = chromium("--dump-dom", base + "/workers", profile=tmp / "anonymous")
    assert worker.hostname not in denied.stdout

    dom = chromium("--dump-dom", page, profile=tmp / "chrome")
    rows = re.findall(r"<tr[^>]*>.*?</tr>", dom.stdout.split('id="workers-table"', 1)[-1], flags=re.S)
    (row,) = [r for r in rows if worker.hostname in r]
    assert ">Online<" in row  # drawn by the page's script from its authenticated request
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)
    assert re.sub(r"<[^>]+>", "", cells[3]) == "1"  # processed: the job's one chunk

    png = tmp / "flower-workers.png"
    shot = chromium(f"--screenshot={png}", page, profile=tmp / "chrome")
    assert png.exists(), shot.stderr
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1280, 720)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # a page, not a blank frame


def series(metrics: str) -> set[str]:
    """The metric series (name and labels) of a Prometheus text page."""
    return {line.rsplit(" ", 1)[0] for line in metrics.splitlines() if line and not line.startswith("#")}


def test_twenty_more_jobs_add_no_metric_series(flower):
    base, worker, job_id, _ = flower
    settings = worker.settings
    wait_for_tasks(base, job_id)
    before = series(get(f"{base}/metrics", AUTH)[1].decode())
    jobs = [api.submit("article", [{"prompt": "Hi"}], params={"max_new_tokens": 1}, settings=settings)
            for _ in range(20)]
    for job in jobs:
        assert api.wait(job, timeout=60, settings=settings).status == "completed"
    for job in jobs:
        wait_for_tasks(base, job)
    after = series(get(f"{base}/metrics", AUTH)[1].decode())
    assert after == before, sorted(after - before)
