"""Input formats besides JSONL: CSV here, OpenAI Batch lines in schemas/openai_batch.py and
schemas/openai_images.py. Every reader yields ``(line, record_or_Problem)`` like
:func:`~schemas.parsing.read_jsonl`, streaming, for ``validate_records``.

CSV: a header names the fields (``params.<name>`` for generation overrides); each row is
validated by the kind's spec in pydantic's lax mode (``"3"``, ``"yes"``), lists as ``a;b`` or a
JSON array, an empty cell meaning the field is not given.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import typing
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from .enums import Kind
from .openai_batch import OPENAI_KIND, Records, Stream, read_openai_batch
from .parsing import MAX_LINE_BYTES, Problem, problems_from, read_jsonl
from .specs import CSV_CONTEXT, SPECS

FORMATS = ("jsonl", "csv", "openai")
__all__ = ["FORMATS", "OPENAI_KIND", "detect_format", "read_csv", "read_openai_batch", "reader_for"]


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"csv"`` for a ``.csv`` file; otherwise ``"openai"`` if the first non-blank line is an
    object with ``url`` and ``body``, else ``"jsonl"`` (the readers report anything malformed)."""
    if os.fspath(path).lower().endswith(".csv"):
        return "csv"
    with open(path, "rb") as stream:
        first = next((raw for raw in iter(lambda: stream.readline(MAX_LINE_BYTES + 1), b"")
                      if raw.strip()), b"")
    try:
        obj = json.loads(first)
    except (ValueError, RecursionError):
        return "jsonl"
    return "openai" if isinstance(obj, dict) and "url" in obj and "body" in obj else "jsonl"


def reader_for(fmt: str, kind: Kind | str) -> Callable[[Stream], Records]:
    """The reader for format ``fmt`` (one of :data:`FORMATS`) and ``kind``: ``reader(stream)``."""
    kind = Kind(kind)
    if fmt == "openai" and kind is Kind.image_set:  # /v1/images/generations lines
        from .openai_images import read_openai_images

        return functools.partial(read_openai_images, endpoint=None)
    readers = {"jsonl": read_jsonl, "csv": functools.partial(read_csv, kind=kind),
               "openai": functools.partial(read_openai_batch, kind=kind)}
    if fmt not in readers:
        raise ValueError(f"unknown input format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    return readers[fmt]


# --- CSV -------------------------------------------------------------------------------------

def read_csv(stream: Stream, kind: Kind | str) -> Records:
    """Yield ``(line, record_or_Problem)`` per non-blank CSV row; ``line`` is the physical line
    where the row starts (the header is line 1). An empty file yields nothing."""
    spec = SPECS[Kind(kind)]
    rows = _csv_rows(stream)
    header_line, header = next(rows, (0, None))
    if header is None:
        return
    if isinstance(header, Problem):
        yield header_line, header  # without a readable header no row can be interpreted
        return
    columns = _columns(spec, header, header_line)
    for column in columns:
        if isinstance(column, Problem):  # reported once; its cells are skipped in every row
            yield header_line, column
    for line, row in rows:
        if isinstance(row, Problem):
            yield line, row
            continue
        if len(row) > len(columns):
            yield line, Problem(line, "-", f"row has {len(row)} cells; the header has {len(columns)}")
            continue
        record: dict[str, Any] = {}
        for name, cell in zip(columns, row):
            if isinstance(name, str) and cell.strip():
                parent, _, field = name.rpartition(".")
                (record.setdefault(parent, {}) if parent else record)[field] = cell.strip()
        try:
            valid = spec.model_validate(record, context=CSV_CONTEXT)
        except ValidationError as exc:
            yield from ((line, problem) for problem in problems_from(line, exc))
            continue
        yield line, valid.model_dump(mode="json", exclude_unset=True)


class _TooLong(Exception):
    pass


class _Lines:
    """Decoded physical lines for ``csv.reader``, counting lines and the current record's bytes.

    An iterator object, not a generator, so that raising ``_TooLong`` does not end it.
    """

    def __init__(self, stream: Stream):
        self._raw = iter(stream)
        self.number = self.record_bytes = 0
        self.bad: list[Problem] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = next(self._raw)
        self.number += 1
        self.record_bytes += len(raw)
        if self.record_bytes > MAX_LINE_BYTES:
            raise _TooLong
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.bad.append(Problem(self.number, "-", f"not valid UTF-8 (byte {exc.start})"))
            text = raw.decode("utf-8", "replace")  # keep parsing to find where the record ends
        return text.removeprefix("\ufeff") if self.number == 1 else text


def _csv_rows(stream: Stream) -> Iterator[tuple[int, list[str] | Problem]]:
    lines = _Lines(stream)
    reader = csv.reader(lines, strict=True)  # an unterminated quote is an error, not a guess
    while True:
        start, lines.record_bytes, lines.bad = lines.number + 1, 0, []
        try:
            row = next(reader)
        except StopIteration:
            return
        except _TooLong:  # the reader starts afresh on the next line, as after a csv.Error
            yield start, Problem(start, "-", f"record is longer than {MAX_LINE_BYTES} bytes")
            continue
        except csv.Error as exc:
            yield start, Problem(start, "-", f"malformed CSV: {exc}")
            continue
        if lines.bad:
            yield start, lines.bad[0]
        elif any(cell.strip() for cell in row):
            yield start, row


def _columns(spec: type[BaseModel], header: list[str], line: int) -> list[str | Problem]:
    """Per header cell, its field name (``params.seed`` for nested), or a Problem."""
    known: list[str] = []
    for name, field in spec.model_fields.items():
        nested = [a for a in typing.get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            known += [f"{name}.{sub}" for sub in nested[0].model_fields]
        elif name != "messages":  # chat messages do not fit in a cell: JSONL or OpenAI lines
            known.append(name)
    columns: list[str | Problem] = []
    names = [cell.strip() for cell in header]
    for number, name in enumerate(names):
        if not name:
            columns.append(Problem(line, "-", f"column {number + 1} has no name"))
        elif name not in known:
            columns.append(Problem(line, name, f"unknown column; known: {', '.join(known)}"))
        elif name in names[:number]:
            columns.append(Problem(line, name, "column appears twice"))
        else:
            columns.append(name)
    return columns
