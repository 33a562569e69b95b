"""More input formats: CSV, and OpenAI Batch API JSONL (schemas/openai_batch.py for text lines,
schemas/openai_images.py for image lines), read into the same records as JSONL.

Every reader yields ``(line_number, record_or_Problem)`` like :func:`read_jsonl`, so
``validate_records(kind, reader(stream))`` does the per-field validation and the duplicate
``custom_id`` check for every format alike. Readers stream: memory does not grow with the file.
A row or line with a problem found here yields its problems instead of a record.

CSV: the header row names the fields; ``params.<name>`` columns fill the nested ``params``.
Cells are converted by the type the kind's spec declares for the field (int, float, bool, or a
list written ``a;b;c`` or as a JSON array); an empty cell means the field is absent.

``detect_format`` tells the three apart and ``reader_for`` picks the reader.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel, BeforeValidator

from .enums import Kind
from .openai_batch import OPENAI_KIND, Records, Stream, read_openai_batch
from .parsing import MAX_LINE_BYTES, Problem, read_jsonl
from .specs import SPECS

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
    rows = _csv_rows(stream)
    header_line, header = next(rows, (0, None))
    if header is None:
        return
    if isinstance(header, Problem):
        yield header_line, header  # without a readable header no row can be interpreted
        return
    columns = _columns(SPECS[Kind(kind)], header, header_line)
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
        problems = []
        for column, cell in zip(columns, row):
            if isinstance(column, Problem) or not cell.strip():
                continue
            name, coerce = column
            try:
                value = coerce(cell)
            except ValueError as exc:
                problems.append(Problem(line, name, str(exc)))
                continue
            parent, _, field = name.rpartition(".")
            (record.setdefault(parent, {}) if parent else record)[field] = value
        yield from ((line, p) for p in problems) if problems else [(line, record)]


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


def _columns(spec: type[BaseModel], header: list[str], line: int) -> list[tuple[str, Callable] | Problem]:
    """Per header cell, its field name (``params.seed`` for nested) and converter, or a Problem."""
    known: dict[str, Callable[[str], Any]] = {}
    for name, field in spec.model_fields.items():
        nested = _unwrap(field.annotation)
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            known |= {f"{name}.{sub}": _coercer(f.annotation) for sub, f in nested.model_fields.items()}
        elif name == "messages":  # chat messages do not fit in a cell: JSONL or OpenAI lines
            continue
        elif any(isinstance(m, BeforeValidator) for m in field.metadata):
            known[name] = str  # the field reads text itself (an article's ``length: short``)
        else:
            known[name] = _coercer(field.annotation)
    columns: list[tuple[str, Callable] | Problem] = []
    names = [cell.strip() for cell in header]
    for number, name in enumerate(names):
        if not name:
            columns.append(Problem(line, "-", f"column {number + 1} has no name"))
        elif name not in known:
            columns.append(Problem(line, name, f"unknown column; known: {', '.join(known)}"))
        elif name in names[:number]:
            columns.append(Problem(line, name, "column appears twice"))
        else:
            columns.append((name, known[name]))
    return columns


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` → ``X``."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        options = [a for a in args if a is not type(None)]
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType) and len(options) == 1:
            annotation = options[0]
        else:
            return annotation


def _coercer(annotation: Any) -> Callable[[str], Any]:
    """How a cell becomes a value of ``annotation``; strings (and Literals) go to pydantic as-is."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is list or annotation is list:
        args = typing.get_args(annotation)
        return functools.partial(_to_list, item=_coercer(args[0]) if args else str)
    return _SCALARS.get(annotation, str)


def _scalar(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def coerce(text: str) -> Any:
        try:
            return parse(text.strip())
        except (ValueError, KeyError):
            raise ValueError(f"not {what}: {_show(text)}") from None
    return coerce


def _int(text: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text):  # int() would also take "1_000"
        raise ValueError
    return int(text)


def _finite(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise ValueError
    return value


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_SCALARS = {bool: _scalar(lambda text: _BOOLS[text.lower()], "a boolean (true/false, yes/no, 1/0)"),
            int: _scalar(_int, "an integer"), float: _scalar(_finite, "a number")}


def _to_list(text: str, item: Callable[[str], Any]) -> list[Any]:
    text = text.strip()
    if not text.startswith("["):
        return [item(part.strip()) for part in text.split(";") if part.strip()]
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list):
        raise ValueError(f"not a JSON array: {_show(text)}")
    return value


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
