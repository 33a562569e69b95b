"""The backend contract: a plugin written against it runs end to end; the row model, the
results table and the exports agree; the adaptive batch halves and remembers."""

from __future__ import annotations

import csv
import io
from collections import OrderedDict
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch

from aigc import api
from aigc.export import parquet_schema, write_csv, write_parquet
from aigc.schemas.enums import Kind
from aigc.schemas.results import EXPORT_COLUMNS, ResultRow
from aigc.schemas.settings import Settings
from aigc.schemas.tables import Result
from aigc.workers import registry, runner
from aigc.workers.batching import AdaptiveBatch
from aigc.workers.contract import ClaimedItem, JobInfo, as_result_rows, result_row
from aigc.workers.errors import TransientError
from aigc.workers.retry import RetryPolicy

from test_store import make_job


class Shouting:
    """A plugin as a user would write one: typed, one batch of two items at a time."""

    def __init__(self, model: str, settings: Settings) -> None:
        self.memory_bytes = 0
        self.model = model

    def run(self, job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]:
        for start in range(0, len(items), 2):
            rows = []
            for item in items[start:start + 2]:
                if item.index == 1:  # a failed item is a row, not an exception
                    rows.append(result_row(job, item, error_code="no_shouting",
                                           error_message="item 1 may not shout"))
                else:
                    text = item.input["prompt"].upper()
                    rows.append(result_row(job, item, output_text=text, output={"text": text},
                                           seed=item.index, prompt_tokens=1, output_tokens=1,
                                           latency_ms=0.5, device="cpu"))
            yield rows


def test_a_typed_plugin_runs_end_to_end_and_its_rows_export(database_url, monkeypatch):
    monkeypatch.setattr(registry, "BUILTIN_BACKENDS", ())
    monkeypatch.setattr(registry, "_backends", {})
    monkeypatch.setattr(registry, "_warm", OrderedDict())
    registry.register(Kind.article)(Shouting)
    settings = Settings(database_url=database_url)
    job_id, ids = make_job(database_url, 3)

    summary = runner.run_chunk(job_id, ids, worker="w1", settings=settings,
                               policy=RetryPolicy.from_settings(settings))

    assert (summary["done"], summary["failed"]) == (2, 1)
    assert api.status(job_id, settings=settings).status == "completed_with_errors"
    rows = list(api.results(job_id, settings=settings))
    assert [tuple(row) for row in rows] == [EXPORT_COLUMNS] * 3
    assert [(r["output_text"], r["error_code"], r["worker"]) for r in rows] == \
        [("X", None, "w1"), (None, "no_shouting", "w1"), ("X", None, "w1")]
    assert rows[0]["output"] == {"text": "X"} and rows[0]["created_at"] is not None

    parquet = io.BytesIO()
    assert write_parquet(rows, parquet) == 3
    table = pq.read_table(io.BytesIO(parquet.getvalue()))
    assert table.schema.equals(parquet_schema()) and table.column("output_text").to_pylist()[0] == "X"
    text = io.StringIO()
    write_csv(rows, text)
    assert next(csv.reader(io.StringIO(text.getvalue()))) == list(EXPORT_COLUMNS)


def test_the_row_model_is_the_results_table_less_what_the_writer_assigns():
    columns = {c.name: c for c in Result.__table__.columns}
    assert list(ResultRow.model_fields) == [name for name in columns if name not in ("id", "seq")]
    for name, field in ResultRow.model_fields.items():
        optional = not field.is_required()
        assert optional or not columns[name].nullable, name  # a required field is NOT NULL
        if columns[name].nullable:
            assert field.default is None, f"{name} is nullable in the table: it defaults to None"
    assert EXPORT_COLUMNS == tuple(n for n in columns if n not in ("id", "seq", "job_id", "item_id"))


def test_the_parquet_schema_keeps_its_types():
    schema = parquet_schema()
    assert schema.names == list(EXPORT_COLUMNS)
    assert {n: str(schema.field(n).type) for n in ("seed", "prompt_tokens", "latency_ms", "created_at",
                                                    "output", "params", "artifact_uris")} == {
        "seed": "int64", "prompt_tokens": "int64", "latency_ms": "double",
        "created_at": "timestamp[us, tz=UTC]", "output": "string", "params": "string",
        "artifact_uris": "string"}
    assert isinstance(schema, pa.Schema)


def test_rows_yielded_as_dicts_are_validated_naming_the_field():
    base = {"job_id": "j", "item_id": 1, "custom_id": "c", "kind": "article", "model": "m"}
    (row,) = as_result_rows([base | {"output_text": "ok"}])
    assert isinstance(row, ResultRow) and row.output_text == "ok" and row.params == {}
    with pytest.raises(pydantic.ValidationError, match="output_txt"):
        as_result_rows([base | {"output_txt": "ok"}])
    with pytest.raises(pydantic.ValidationError, match="prompt_tokens"):
        ResultRow(**base, prompt_tokens="many")


def test_the_adaptive_batch_halves_on_out_of_memory_and_remembers():
    batching = AdaptiveBatch(torch.device("cpu"), "row")
    tried = []

    def forward(part: slice) -> list[int]:  # as if only 3 rows fit
        tried.append((part.start, part.stop))
        if part.stop - part.start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(range(part.start, part.stop))

    assert batching.limit(8) == 8 and batching.cap is None
    results = list(batching.run(8, forward))

    assert results == [[0, 1], [2, 3], [4, 5], [6, 7]]  # every row once, in order
    assert tried == [(0, 8), (0, 4), (0, 2), (2, 4), (4, 8), (4, 6), (6, 8)]
    assert batching.cap == 2 and batching.limit(8) == 2 and batching.limit(1) == 1

    def never_fits(part: slice) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(TransientError, match="out of memory generating a single row") as error:
        list(batching.run(2, never_fits))
    assert error.value.code == "out_of_memory"
