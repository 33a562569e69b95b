"""More input formats: CSV and OpenAI Batch API JSONL, read into the same records as JSONL.

Every reader yields ``(line_number, record_or_Problem)`` like :func:`read_jsonl`, so
``validate_records(kind, reader(stream))`` does the per-field validation and the duplicate
``custom_id`` check for every format alike. Readers stream: memory does not grow with the file.
A row or line with a problem found here yields its problems instead of a record.

CSV: the header row names the fields; ``params.<name>`` columns fill the nested ``params``.
Cells are converted by the type the kind's spec declares for the field (int, float, bool, or a
list written ``a;b;c`` or as a JSON array); an empty cell means the field is absent.

OpenAI batch: each line is ``{"custom_id", "method": "POST", "url", "body"}`` for
``/v1/completions`` or ``/v1/chat/completions`` (text kinds only). The body's ``prompt`` or
``messages`` become the item's free-form ``prompt``, its sampling fields the item's ``params``.
``body.model`` is ignored: the job's model runs every line. Body fields that would change the
output but cannot be honoured here (``logprobs``, ``tools``, penalties, ...) are refused rather
than silently dropped, unless null or set to OpenAI's neutral default.
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
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from .enums import Kind
from .parsing import MAX_LINE_BYTES, Problem, read_jsonl
from .specs import MAX_PROMPT_CHARS, SPECS, ItemParams

FORMATS = ("jsonl", "csv", "openai")

Stream = BinaryIO | Iterable[bytes]
Records = Iterator[tuple[int, Any]]


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


# --- OpenAI Batch API JSONL ------------------------------------------------------------------

CHAT_STOP = "\nUser:"  # chat prompts end "Assistant:"; stop before the next user turn
_ENDPOINTS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}
_PARAMS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
           "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop", "n": "n"}
# About OpenAI's own service or bookkeeping; none of these changes the generated text.
_IGNORED = {"model", "user", "metadata", "store", "service_tier"}
# Values that mean "off", so a file written with every default spelled out is still accepted.
_NEUTRAL = {"stream": False, "logprobs": False, "echo": False, "best_of": 1, "logit_bias": {},
            "presence_penalty": 0, "frequency_penalty": 0}
_ROLES = {"system": None, "developer": None, "user": "User", "assistant": "Assistant"}

Bad = Callable[[str, str], None]


def read_openai_batch(stream: Stream, kind: Kind | str) -> Records:
    """Yield ``(line, record_or_Problem)`` per line of an OpenAI Batch API input file, each
    record a free-form ``prompt`` with ``params``, for a text ``kind`` (article, ad_copy)."""
    kind = Kind(kind)
    for line, obj in read_jsonl(stream):
        if isinstance(obj, Problem):
            yield line, obj
        elif not kind.is_text:
            yield line, Problem(line, "-", f"the openai format is for text kinds (article, ad_copy), not {kind}")
        elif not isinstance(obj, dict):
            yield line, Problem(line, "-", f"expected a JSON object, got {type(obj).__name__}")
        else:
            problems: list[Problem] = []
            record = _batch_record(obj, lambda field, msg: problems.append(Problem(line, field, msg)))
            yield from ((line, p) for p in problems) if problems else [(line, record)]


def _batch_record(obj: dict[str, Any], bad: Bad) -> dict[str, Any]:
    for key in sorted(obj.keys() - {"custom_id", "method", "url", "body"}):
        bad(key, "not part of the OpenAI batch format")
    if obj.get("custom_id") is None:
        bad("custom_id", "required in the OpenAI batch format")
    if obj.get("method") != "POST":
        bad("method", f"must be 'POST', got {obj['method']!r}" if "method" in obj else "required; must be 'POST'")
    url, body = obj.get("url"), obj.get("body")
    if not isinstance(url, str) or url not in _ENDPOINTS:  # a list or dict is unhashable
        bad("url", f"must be one of {', '.join(_ENDPOINTS)}" + (f"; got {url!r}" if "url" in obj else ""))
        return {}  # without the endpoint the body cannot be read
    if not isinstance(body, dict):
        bad("body", "must be a JSON object")
        return {}
    for name, value in body.items():
        if name not in (_ENDPOINTS[url], *_PARAMS, *_IGNORED) and value is not None \
                and not (name in _NEUTRAL and value == _NEUTRAL[name]):
            bad(f"body.{name}", "not supported")
    if url == "/v1/completions":
        prompt, source = _completion_prompt(body.get("prompt"), bad), "body.prompt"
    else:
        prompt, source = _chat_prompt(body.get("messages"), bad), "body.messages"
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        bad(source, f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    params = _batch_params(body, bad)
    if url == "/v1/chat/completions" and "stop" not in params:
        params["stop"] = [CHAT_STOP]  # the model would otherwise go on to write the user's turn
    return {"custom_id": obj.get("custom_id"), "prompt": prompt} | ({"params": params} if params else {})


def _completion_prompt(prompt: Any, bad: Bad) -> str | None:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        bad("body.prompt", f"a list of {len(prompt)} prompts is not supported; put one prompt per line")
    elif isinstance(prompt, str):
        bad("body.prompt", "must not be empty")
    else:
        bad("body.prompt", "required" if prompt is None else "must be a string (or a list of one string)")
    return None


def _chat_prompt(messages: Any, bad: Bad) -> str | None:
    """System content first, then ``User: ...`` / ``Assistant: ...`` lines, ending ``Assistant:``."""
    if not isinstance(messages, list) or not messages:
        bad("body.messages", "must be a non-empty list of {role, content} messages")
        return None
    system, turns, ok = [], [], True
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            bad(f"body.messages.{i}", "must be an object with role and content")
            ok = False
            continue
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                             and isinstance(part.get("text"), str) for part in content):
            content = "\n".join(part["text"] for part in content)
        if not isinstance(content, str):
            bad(f"body.messages.{i}.content", 'must be a string or a list of {"type": "text", "text": ...}')
        known_role = isinstance(role, str) and role in _ROLES  # a list or dict is unhashable
        if not known_role:
            bad(f"body.messages.{i}.role", f"must be system, user or assistant; got {role!r}")
        ok = ok and isinstance(content, str) and known_role
        if ok and _ROLES[role]:
            turns.append(f"{_ROLES[role]}: {content}")
        elif ok:
            system.append(content)
    return "\n\n".join([*system, "\n".join([*turns, "Assistant:"])]) if ok else None


def _batch_params(body: dict[str, Any], bad: Bad) -> dict[str, Any]:
    """The body's sampling fields as ``params``, checked here so errors name ``body.<field>``."""
    params: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, target in _PARAMS.items():
        value = body.get(name)
        if value is None:
            continue
        if target in params and params[target] != value:
            bad(f"body.{name}", f"conflicts with body.{source[target]}")
            continue
        params[target] = [value] if name == "stop" and isinstance(value, str) else value
        source[target] = name
    try:
        ItemParams.model_validate(params)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            target, *rest = err["loc"] or ("-",)
            bad(".".join([f"body.{source.get(str(target), target)}", *map(str, rest)]), err["msg"])
    return params
