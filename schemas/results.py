"""One result row: what a generator backend yields per item, what the worker writes into
``results``, and the columns every export (JSONL, CSV, Parquet) carries.

The fields are the ``results`` table's columns (``aigc.schemas.tables.Result``) less ``id`` and
``seq``, which the writer assigns; ``tests/test_contract.py`` keeps the two in step. Column
lists elsewhere are derived from here, never written out again.
"""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ResultRow(BaseModel):
    """The result of one item: an output or an error, and how it was made.

    A backend sets the identity fields (from its job and item), either the output fields or
    ``error_code``/``error_message``, and what it knows of seed, params, tokens, latency and
    device. ``worker`` is filled in by the runner and ``created_at`` by the writer.
    A row with ``error_code`` set counts as a failed item; without, as done.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    custom_id: str
    item_id: int  # items.id of the item this row finishes
    kind: str
    output_text: str | None = None  # text kinds: the text, variants joined by blank lines
    output: dict[str, Any] | None = None  # structured output (title/body, variants, images)
    artifact_uris: list[str] | None = None  # files written to the artifact store
    error_code: str | None = None  # set: the item failed (``model_not_found``, ...)
    error_message: str | None = None
    finish_reason: str | None = None  # text kinds: "stop" or "length"; else None
    model: str
    seed: int | None = None  # the seed the item ran with (given or derived)
    params: dict[str, Any] = Field(default_factory=dict)  # the parameters it ran with
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: float | None = None
    worker: str | None = None  # set by the runner: ``node@host``
    device: str | None = None  # ``cpu``, ``cuda``
    created_at: datetime | None = None  # set by the writer when the row is inserted

    @property
    def failed(self) -> bool:
        return self.error_code is not None


# aigc's own ids for the row: exports and ``aigc.results`` name an item by custom_id.
INTERNAL_COLUMNS = ("job_id", "item_id")
EXPORT_COLUMNS: tuple[str, ...] = tuple(name for name in ResultRow.model_fields
                                        if name not in INTERNAL_COLUMNS)


def column_type(name: str) -> type:
    """The Python type of column ``name`` without its ``None``: str, int, float, datetime,
    dict or list (the last two are JSON)."""
    annotation = ResultRow.model_fields[name].annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


JSON_COLUMNS: tuple[str, ...] = tuple(name for name in EXPORT_COLUMNS
                                      if column_type(name) in (dict, list))
