"""``aigc demo`` in a subprocess, as a new user runs it: with Redis, and with none answering."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_demo_runs_the_sample_jobs_end_to_end(broker, redis_url, tmp_path):
    """The README's first command, with the shipped default model: what a new user sees."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    env["AIGC_BROKER_URL"] = redis_url if broker == "redis" else "redis://127.0.0.1:1/0"
    env["COLUMNS"] = "200"

    result = subprocess.run([sys.executable, "-m", "producer.cli", "demo", "--timeout", "240"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    assert ("embedded filesystem broker" in result.stdout) == (broker == "embedded")
    assert "article job" in result.stdout and "ad_copy job" in result.stdout
    engine = create_engine(f"sqlite:///{tmp_path / 'aigc.db'}")
    with engine.connect() as connection:
        statuses = connection.execute(text("SELECT kind, status, done FROM jobs ORDER BY kind")).all()
        results = connection.execute(text("SELECT count(*) FROM results WHERE output_text != '' "
                                          "AND model = 'text-small' AND seed IS NOT NULL")).scalar()
    engine.dispose()
    assert [tuple(s) for s in statuses] == [("ad_copy", "completed", 2), ("article", "completed", 4)]
    assert results == 6  # min_new_tokens: no sampled item ends before it starts
