"""Image sets end to end: the producer, real Redis, a real worker process, SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from aigc import api
from aigc.schemas.db import upgrade
from aigc.schemas.settings import Settings

from conftest import WorkerProcess, plain_rows, run_cli
from tiny_models import build_tiny_dcgan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image_stack(database_url, redis_url, tmp_path_factory):
    """A worker whose default image model is a tiny DCGAN, writing under a file:// URL root."""
    folder = tmp_path_factory.mktemp("images")
    model = build_tiny_dcgan(folder / "tiny-dcgan")
    root = folder / "artifacts"
    settings = Settings(broker_url=redis_url, database_url=database_url, image_model=str(model),
                        artifact_root=f"file://{root}", chunk_size=2, max_batch_images=3,
                        data_dir=folder)
    upgrade(database_url)
    worker = WorkerProcess(settings, folder / "worker.log")
    try:
        worker.wait_ready()
        yield settings, worker, root
    finally:
        worker.stop()


def as_json(value):
    """JSON columns read with plain SQL: text on SQLite, already decoded on PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def test_an_image_set_job_writes_files_and_rows(image_stack):
    settings, worker, root = image_stack
    items = [{"custom_id": "sheet", "n_images": 5, "grid": True, "seed": 11},
             {"custom_id": "../../etc/passwd", "n_images": 2},
             {"custom_id": "single", "n_images": 1, "seed": 12}]
    job_id = api.submit("image_set", items, settings=settings)

    job = api.wait(job_id, timeout=120, settings=settings)

    assert (job.status, job.total, job.done, job.failed) == ("completed", 3, 3, 0)
    assert job.model == settings.image_model
    rows = {r["custom_id"]: r for r in plain_rows(
        settings.database_url, "SELECT * FROM results WHERE job_id = :j", j=job_id)}
    assert sorted(rows) == sorted(i["custom_id"] for i in items)
    for item in items:
        row = rows[item["custom_id"]]
        uris, output = as_json(row["artifact_uris"]), as_json(row["output"])
        assert len(uris) == item["n_images"] + bool(item.get("grid"))
        assert row["error_code"] is None and row["output_text"] is None
        assert row["model"] == settings.image_model and row["kind"] == "image_set"
        assert row["worker"] == worker.hostname and row["device"] == "cpu" and row["latency_ms"] > 0
        assert row["seed"] == item.get("seed", row["seed"]) and row["seed"] is not None
        assert [i["seed"] for i in output["images"]] == [row["seed"] + k for k in range(item["n_images"])]
        for record, uri in zip(output["images"], uris):
            path = Path(uri.removeprefix("file://"))
            assert path.resolve().is_relative_to(root.resolve())
            assert path.stat().st_size == record["bytes"]
            assert Image.open(path).size == (record["width"], record["height"]) == (64, 64)
    grid = as_json(rows["sheet"]["output"])["grid"]
    assert Image.open(grid["uri"].removeprefix("file://")).size == (grid["width"], grid["height"]) == (200, 134)
    assert as_json(rows["single"]["output"])["grid"] is None
    assert len(list(root.rglob("*.png"))) == 5 + 1 + 2 + 1
    assert sorted(p.name for p in root.parent.iterdir() if p.name != "tiny-dcgan") == \
        ["artifacts", "worker.log"]  # nothing escaped the root


def test_the_same_seed_gives_the_same_files_across_jobs(image_stack):
    settings, _, _ = image_stack
    first = api.submit("image_set", [{"custom_id": "a", "n_images": 3, "seed": 99}], settings=settings)
    second = api.submit("image_set", [{"custom_id": "z", "n_images": 1, "seed": 100},
                                      {"custom_id": "b", "n_images": 3, "seed": 99}], settings=settings)
    for job_id in (first, second):
        assert api.wait(job_id, timeout=120, settings=settings).status == "completed"

    def files(job_id: str, custom_id: str) -> list[bytes]:
        row = next(r for r in api.results(job_id, settings=settings) if r["custom_id"] == custom_id)
        return [Path(u.removeprefix("file://")).read_bytes() for u in row["artifact_uris"]]

    assert files(first, "a") == files(second, "b")
    assert files(second, "z") == files(first, "a")[1:2]  # seed 100 is image 1 of seed 99


def test_cli_results_lists_the_files(image_stack, tmp_path):
    settings, _, _ = image_stack
    source = tmp_path / "images.csv"
    source.write_text("custom_id,n_images,grid,seed\nc1,2,true,5\nc2,1,false,6\n", encoding="utf-8")
    job_id = run_cli(settings, "submit", str(source), "--kind", "image_set", "--wait",
                     "--timeout", "120").stdout.strip()

    listed = run_cli(settings, "results", job_id, "--files").stdout.splitlines()
    exported = [json.loads(line) for line in run_cli(settings, "results", job_id).stdout.splitlines()]

    assert len(listed) == 4 and all(uri.startswith("file://") and uri.endswith(".png") for uri in listed)
    assert listed == [uri for line in exported for uri in line["artifact_uris"]]
    assert all(Image.open(io.BytesIO(Path(u.removeprefix("file://")).read_bytes())).format == "PNG" for u in listed)
    assert [line["seed"] for line in exported] == [5, 6]
