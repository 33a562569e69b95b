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

from typing import Annotated, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .enums import Kind
from .parsing import MAX_LINE_BYTES, Problem, problems_from, read_jsonl
from .specs import MAX_NEW_TOKENS, SPECS, ChatMessage, CustomId, StopText

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


# --- OpenAI Batch API JSONL ------------------------------------------------------------------

OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
OPENAI_KIND = Kind.article  # what an OpenAI Batch file runs as when no kind is named


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchLine(_OpenAIModel):
    """One line of an OpenAI Batch input file."""

    custom_id: CustomId
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


def _neutral(default: Any) -> Any:
    """A body field that changes the output unless left at OpenAI's neutral ``default``: a
    file written with every default spelled out is accepted; anything else cannot be honoured."""
    def check(value: Any) -> Any:
        if value is not None and value != default:
            raise PydanticCustomError("unsupported", "not supported")
        return value
    return Annotated[Any, AfterValidator(check)]


def _one_prompt(prompt: Any) -> Any:
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise PydanticCustomError("one_prompt", "a list of {n} prompts is not supported; "
                                      "put one prompt per line", {"n": len(prompt)})
        return prompt[0]
    if not isinstance(prompt, str):
        raise PydanticCustomError("prompt_type", "must be a string (or a list of one string)")
    return prompt


class _Body(_OpenAIModel):
    # About OpenAI's own service or bookkeeping; none of these changes the text. ``model`` is
    # ignored: the job's model runs every line.
    model: Any = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[list[StopText] | None, BeforeValidator(
        lambda v: [v] if isinstance(v, str) else v)] = Field(None, max_length=8)
    n: int | None = Field(None, ge=1, le=10)
    stream: _neutral(False) = None
    stream_options: _neutral(None) = None
    logprobs: _neutral(False) = None
    top_logprobs: _neutral(0) = None
    echo: _neutral(False) = None
    best_of: _neutral(1) = None
    logit_bias: _neutral({}) = None
    presence_penalty: _neutral(0) = None
    frequency_penalty: _neutral(0) = None
    suffix: _neutral(None) = None
    parallel_tool_calls: _neutral(None) = None
    modalities: _neutral(["text"]) = None

    @model_validator(mode="after")
    def _one_limit(self) -> "_Body":
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("conflict", "conflicts with body.max_tokens"),
                loc=("max_completion_tokens",), input=self.max_completion_tokens)])
        return self

    def params(self) -> dict[str, Any]:
        """The sampling fields as an item's ``params``."""
        params = {"max_new_tokens": self.max_tokens or self.max_completion_tokens,
                  "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "stop": self.stop, "n": self.n}
        return {k: v for k, v in params.items() if v is not None}


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: Annotated[str, BeforeValidator(_one_prompt)]


_BODIES = {"/v1/chat/completions": ChatBody, "/v1/completions": CompletionBody}
_MESSAGES = {"extra_forbidden": "not supported", "missing": "required"}
_TOP_MESSAGES = {"extra_forbidden": "not part of the OpenAI batch format",
                 "missing": "required in the OpenAI batch format"}
# Where an item field came from in the body, for problems the item's spec finds.
_SPEC_FIELDS = {"prompt": "body.prompt", "messages": "body.messages", "params": "body"}
_PARAM_FIELDS = {"max_new_tokens": "max_tokens"}


def read_openai_batch(stream: Stream, kind: Kind | str = OPENAI_KIND, *,
                      endpoint: str | None = None) -> Records:
    """Yield ``(line, record_or_Problem)`` per line of an OpenAI Batch API input file: chat
    lines as ``messages``, completion lines as a free-form ``prompt``, sampling as ``params``,
    for a text ``kind`` (article, ad_copy). With ``endpoint`` (a batch's), every line's ``url``
    must be that one, as OpenAI requires."""
    kind = Kind(kind)
    spec = SPECS[kind]
    for line, obj in read_jsonl(stream):
        if isinstance(obj, Problem):
            yield line, obj
        elif not kind.is_text:
            yield line, Problem(line, "-", f"the openai format is for text kinds (article, ad_copy), not {kind}")
        elif not isinstance(obj, dict):
            yield line, Problem(line, "-", f"expected a JSON object, got {type(obj).__name__}", "invalid_json")
        elif endpoint is not None and isinstance(obj.get("url"), str) and obj["url"] != endpoint:
            yield line, Problem(line, "url", f"must be the batch's endpoint {endpoint}; got "
                                f"{obj.get('url')!r}", "mismatched_endpoint")
        else:
            checked = _checked_record(line, obj, spec)
            yield from ((line, p) for p in checked) if isinstance(checked, list) else [(line, checked)]


def _checked_record(line: int, obj: dict[str, Any], spec: type[BaseModel]) -> dict[str, Any] | list[Problem]:
    """The line's item record, or its problems (each named by the line's own fields)."""
    try:
        request = BatchLine.model_validate(obj)
    except ValidationError as exc:
        return list(problems_from(line, exc, messages=_TOP_MESSAGES))
    try:
        body = _BODIES[request.url].model_validate(request.body)
    except ValidationError as exc:
        return list(problems_from(line, exc, prefix="body", messages=_MESSAGES))
    record = _record(request.custom_id, body)
    try:  # what the item's spec adds (sizes, the last message's role): named by body field
        spec.model_validate(record)
    except ValidationError as exc:
        return [_body_field(problem) for problem in problems_from(line, exc)]
    return record


def _body_field(problem: Problem) -> Problem:
    """A problem the item's spec found, renamed after the line's field it came from."""
    head, _, rest = problem.field.partition(".")
    if head == "params":
        name, _, rest = rest.partition(".")
        head, rest = "body", ".".join(filter(None, [_PARAM_FIELDS.get(name, name), rest]))
    field = ".".join(filter(None, [_SPEC_FIELDS.get(head, head), rest]))
    return Problem(problem.line, field, problem.message, problem.code)


def _record(custom_id: str, body: _Body) -> dict[str, Any]:
    """An item record from a validated body: its body is validated once (this is the hot path
    of large batch files)."""
    record: dict[str, Any] = {"custom_id": custom_id}
    if isinstance(body, ChatBody):
        record["messages"] = [m.model_dump(exclude_none=True) for m in body.messages]
    else:
        record["prompt"] = body.prompt
    params = body.params()
    return record | ({"params": params} if params else {})
