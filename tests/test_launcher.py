"""The fleet launcher: one pinned process per device, supervised; busy workers stay reachable."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery

from aigc import api
from aigc.schemas.dispatch import celery_config
from aigc.schemas.settings import Settings
from aigc.workers.launcher import parse_devices

from conftest import REPO, settings_env

# Marked per test: the pure ones below run in the fast lane.


def test_parse_devices():
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices(" 0, 1 ") == ["0", "1"]
    assert parse_devices("3") == ["3"]
    for bad in ("gpu0", "0,0", "", "1,x"):
        with pytest.raises(ValueError, match="--devices"):
            parse_devices(bad)


def children_of(pid: int) -> dict[int, str]:
    """{child pid: its CUDA_VISIBLE_DEVICES}, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(item.split("=", 1) for item in
                       (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        found[int(entry.name)] = env.get("CUDA_VISIBLE_DEVICES")
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fleet_settings(redis_url, sqlite_url, tiny_model):
    return Settings(broker_url=redis_url, database_url=sqlite_url, text_model=str(tiny_model))


# This CPU host pretends to have two GPUs (tests/fake_cuda): the launcher's code runs as is.
FAKE_GPUS = {"PYTHONPATH": f"{REPO / 'tests' / 'fake_cuda'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize("gpus,devices,message", [
    ("0", "0,1", "GPU 0, 1 does not exist: this host has no CUDA device; use --devices cpu"),
    ("2", "1,2", "GPU 2 does not exist: this host has GPUs 0-1"),
    ("0", "0", "GPU 0 is not available here"),
    ("1", "1", "GPU 1 is not available here"),
])
@pytest.mark.integration  # worker or CLI subprocesses
def test_a_gpu_that_does_not_exist_is_a_startup_error(fleet_settings, gpus, devices, message):
    env = os.environ | settings_env(fleet_settings) | FAKE_GPUS | {"AIGC_TEST_FAKE_GPUS": gpus}
    started = subprocess.run([sys.executable, "-m", "aigc.workers", "--devices", devices, "--no-preload"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert started.returncode != 0
    assert message in " ".join(started.stderr.replace("│", " ").split()), started.stderr
    assert "Traceback" not in started.stderr


@pytest.mark.integration  # worker or CLI subprocesses
def test_one_pinned_process_per_device_restarted_when_it_dies(fleet_settings, tmp_path):
    tag = uuid.uuid4().hex[:6]
    log = open(tmp_path / "fleet.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "aigc.workers", "--devices", "0,1", "--hostname", f"{{device}}-{tag}@test",
         "--no-preload"], env=os.environ | settings_env(fleet_settings) | FAKE_GPUS | {"AIGC_TEST_FAKE_GPUS": "2"},
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    app = Celery(set_as_current=False)
    app.conf.update(celery_config(fleet_settings))
    names = [f"gpu0-{tag}@test", f"gpu1-{tag}@test"]
    try:
        replies = wait_for(lambda: len(app.control.ping(destination=names, timeout=1)) == 2 and True,
                           120, "both device workers to answer")
        assert replies
        pinned = children_of(launcher.pid)
        assert sorted(pinned.values()) == ["0", "1"]

        victim = next(pid for pid, device in pinned.items() if device == "1")
        os.kill(victim, signal.SIGKILL)
        restarted = wait_for(lambda: [pid for pid, d in children_of(launcher.pid).items()
                                      if d == "1" and pid != victim], 60, "a restarted gpu1 worker")
        assert restarted and sorted(children_of(launcher.pid).values()) == ["0", "1"]
        wait_for(lambda: app.control.ping(destination=[names[1]], timeout=1), 120, "gpu1 to answer again")
    finally:
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(60)
        log.close()
    assert code == 0
    assert children_of(launcher.pid) == {}
    assert "exited with -9" in (tmp_path / "fleet.log").read_text()


@pytest.mark.integration  # worker or CLI subprocesses
def test_a_busy_worker_answers_ping(fleet_settings, tmp_path):
    from conftest import WorkerProcess

    settings = fleet_settings.model_copy(update={"max_batch_rows": 1})
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        job_id = api.submit("article", [{"prompt": f"Tell a long story {i}"} for i in range(40)],
                            params={"max_new_tokens": 200}, settings=settings)
        wait_for(lambda: api.status(job_id, settings=settings).status == "running", 60, "the job to start")
        app = Celery(set_as_current=False)
        app.conf.update(celery_config(settings))
        answered = app.control.ping(destination=[worker.hostname], timeout=2)
        active = app.control.inspect(destination=[worker.hostname], timeout=2).active()
        assert api.status(job_id, settings=settings).status == "running"  # still busy
        assert answered == [{worker.hostname: {"ok": "pong"}}]
        assert [(t["name"], t["args"][0], t["kwargs"]) for t in active[worker.hostname]] == \
            [("aigc.article", job_id, {"items": 40})]
    finally:
        worker.stop()


@pytest.mark.parametrize("args,message", [
    (["--pool", "prefork"], "--pool is not supported: the pool is always threads"),
    (["-c", "4"], "one chunk at a time per process"),
    (["--autoscale", "4,1"], "--autoscale is not supported"),
    (["--frobnicate"], "no such option: --frobnicate"),
    (["-Q", "poems"], "unknown queue(s) poems"),
])
@pytest.mark.integration  # worker or CLI subprocesses
def test_worker_options_that_do_not_fit_are_refused_with_a_reason(args, message):
    refused = subprocess.run([sys.executable, "-m", "aigc.cli", "worker", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert message in " ".join(refused.stderr.replace("│", " ").split()), refused.stderr


@pytest.mark.integration  # worker or CLI subprocesses
def test_worker_help_is_real_and_celery_options_pass_through(fleet_settings, tmp_path):
    shown = subprocess.run([sys.executable, "-m", "aigc.cli", "worker", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env=os.environ | {"COLUMNS": "200"})
    assert shown.returncode == 0
    for option in ("--devices", "--queues", "-Q", "--hostname", "--loglevel", "--concurrency",
                   "--no-preload", "--heartbeat-interval", "--pool"):
        assert option in shown.stdout, option
    from conftest import WorkerProcess

    worker = WorkerProcess(fleet_settings, tmp_path / "worker.log", extra_args=[
        "-l", "DEBUG", "-Q", "article", "-c", "1", "--heartbeat-interval", "3", "--pidfile", str(tmp_path / "w.pid")])
    try:
        worker.wait_ready()
        app = Celery(set_as_current=False)
        app.conf.update(celery_config(fleet_settings))
        queues = app.control.inspect(destination=[worker.hostname], timeout=2).active_queues()
        assert [q["name"] for q in queues[worker.hostname]] == ["article"]
        assert int((tmp_path / "w.pid").read_text()) == worker.process.pid  # Celery's own option
        assert " DEBUG " in worker.log()
        env = os.environ | settings_env(fleet_settings)
        ping = [sys.executable, "-m", "aigc.cli", "ping", "--timeout", "3"]
        alive = subprocess.run([*ping, worker.hostname], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        silent = subprocess.run([*ping, "nobody@%h", "--json"], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert (alive.returncode, alive.stdout) == (0, f"{worker.hostname}: ok\n")  # the healthcheck
        assert silent.returncode == 1 and json.loads(silent.stdout) == {f"nobody@{socket.gethostname()}": False}
    finally:
        worker.stop()
