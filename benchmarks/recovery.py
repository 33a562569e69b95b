"""Recovery time: SIGKILL to job complete with the default lease, as compose.yaml deploys it.

A 400-item job on PostgreSQL and a private redis-server (AOF on, as in compose.yaml), the
default ``AIGC_LEASE_SECONDS`` (60 s) and visibility timeout, the sweeper as compose.yaml runs
it (``aigc sweep --every 15``), one worker alive throughout and two more SIGKILLed mid-chunk one
after the other, each replaced at once (as ``restart: unless-stopped`` does). The model is the
tests' tiny GPT-2 slowed by the fault plugin (0.3 s a batch), so the figure is about recovery,
not about generation speed.

Prints one JSON object: seconds from the first SIGKILL to the job complete, the job's wall time,
the seconds its chunks were busy (summed over workers) and the bound by design (lease + sweep
interval + that busy time). It also checks the exactly-once effect (one row per item, counters
exact) and exits 1 if that fails. The figure is recorded in docs/reliability.md.

Usage: ``python benchmarks/recovery.py``. Needs redis-server on the PATH and PostgreSQL on
127.0.0.1:5432 with trust auth (a database is created and dropped).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]

from sqlalchemy import create_engine, make_url, text  # noqa: E402

from aigc import api  # noqa: E402
from aigc.schemas.settings import Settings  # noqa: E402
from conftest import POSTGRES_URL, plain_rows  # noqa: E402
from test_faults import (PrivateRedis, assert_exactly_once, fault_settings, items,  # noqa: E402
                         start_worker, wait_for)
from tiny_models import build_tiny_gpt2  # noqa: E402

ITEMS = 400
SWEEP_EVERY = 15


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="aigc-recovery-"))
    server = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"aigc_bench_{uuid.uuid4().hex[:12]}"
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    database = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    redis_server = PrivateRedis(folder)
    redis_server.start()
    try:
        return measure(redis_server.url, database, build_tiny_gpt2(folder / "tiny-gpt2"), folder)
    finally:
        redis_server.stop()
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


def measure(broker: str, database: str, model: Path, folder: Path) -> int:
    defaults = Settings()
    settings = fault_settings(broker, database, model, lease_seconds=defaults.lease_seconds,
                              visibility_timeout=None)
    job_id = api.submit("article", items(ITEMS), params={"max_new_tokens": 8}, settings=settings)
    sweeper = subprocess.Popen([sys.executable, "-m", "aigc.cli", "sweep", "--every", str(SWEEP_EVERY)],
                               env=os.environ | settings.to_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=open(folder / "sweeper.log", "wb"))
    slow = {"AIGC_FAULT_SECONDS_PER_BATCH": "0.3"}
    workers = [start_worker(settings, folder, "steady", **slow)]
    try:
        for round_ in range(2):
            victim = start_worker(settings, folder, f"victim{round_}", **slow)
            workers.append(victim)
            wait_for(lambda: plain_rows(database, "SELECT count(*) AS n FROM results WHERE job_id = :j "
                                        "AND worker = :w", j=job_id, w=victim.hostname)[0]["n"] > 0,
                     120, "the victim's first rows")
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            if round_ == 0:
                killed_at = time.monotonic()
        workers.append(start_worker(settings, folder, "replacement", **slow))
        job = api.wait(job_id, timeout=300, settings=settings)
        recovery = time.monotonic() - killed_at
    finally:
        sweeper.terminate()
        sweeper.wait(10)
        for worker in workers:
            worker.stop()
    busy = plain_rows(database, "SELECT sum(duration_ms) / 1000.0 AS s FROM chunk_runs WHERE job_id = :j",
                      j=job_id)[0]["s"]
    wall = plain_rows(database, "SELECT wall_seconds FROM job_throughput WHERE job_id = :j",
                      j=job_id)[0]["wall_seconds"]
    report = {"items": ITEMS, "lease_seconds": defaults.lease_seconds, "sweep_every": SWEEP_EVERY,
              "sigkill_to_complete_s": round(recovery, 1), "job_wall_s": round(float(wall), 1),
              "busy_s": round(float(busy), 1),
              "bound_by_design_s": round(defaults.lease_seconds + SWEEP_EVERY + float(busy), 1),
              "status": job.status}
    try:
        assert job.status == "completed", job.status
        assert_exactly_once(settings, job_id, ITEMS)
        report["exactly_once"] = True
    except AssertionError as exc:
        report["exactly_once"] = f"FAILED: {exc}"
    print(json.dumps(report, indent=2))
    return 0 if report["exactly_once"] is True else 1


if __name__ == "__main__":
    sys.exit(main())
