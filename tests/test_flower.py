"""Flower on the real broker, started by `aigc flower`: authentication on, workers and tasks seen."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from producer import api
from schemas.settings import Settings

from conftest import REPO, WorkerProcess

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
    result = subprocess.run([sys.executable, "-m", "producer.cli", "flower"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "AIGC_FLOWER_PASSWORD" in result.stderr


def test_flower_shows_the_worker_and_its_tasks_behind_auth(redis_url, sqlite_url, tiny_model, tmp_path):
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, text_model=str(tiny_model),
                        flower_user="ops", flower_password="s3cret-pw")
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower", "--port", str(port)],
                              env=os.environ | settings.to_env(), cwd=REPO,
                              stdout=open(tmp_path / "flower.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        worker.wait_ready()
        deadline = time.monotonic() + 60
        while get(f"{base}/healthcheck")[0] != 200:
            assert flower.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
            time.sleep(0.3)
        job_id = api.submit("article", [{"prompt": "Hello"}] * 3, params={"max_new_tokens": 3}, settings=settings)
        api.wait(job_id, timeout=60, settings=settings)

        assert get(f"{base}/api/workers")[0] == 401
        assert get(f"{base}/api/workers", ("ops", "wrong"))[0] == 401
        assert get(f"{base}/", None)[0] == 401
        status, body = get(f"{base}/api/workers?refresh=1", ("ops", "s3cret-pw"))
        assert status == 200 and worker.hostname in json.loads(body)
        deadline = time.monotonic() + 30
        while True:
            tasks = json.loads(get(f"{base}/api/tasks", ("ops", "s3cret-pw"))[1])
            mine = [t for t in tasks.values() if job_id in str(t.get("args"))]
            if mine and all(t["state"] == "SUCCESS" for t in mine):
                break
            assert time.monotonic() < deadline, tasks
            time.sleep(0.5)
        assert {t["name"] for t in mine} == {f"aigc.article job={job_id} items=3"}
        assert "s3cret-pw" not in (tmp_path / "flower.log").read_text()
    finally:
        flower.terminate()
        flower.wait(20)
        worker.stop()
