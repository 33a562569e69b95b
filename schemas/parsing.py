"""Turning raw input (a JSONL file, an iterable of dicts) into validated item specs.

Problems are reported per line and field (``LINE:FIELD: message``), all at once, so a user
fixes a file in one pass; :func:`problems_from` is the one converter from pydantic's errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from .enums import Kind
from .specs import SPECS

MAX_LINE_BYTES = 1 << 20  # one item's JSON; a longer line is refused, not parsed
MAX_REPORTED_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input line (1-based) and field (``-`` for the whole line).

    ``code`` is a machine-readable kind of problem where one is known (``invalid_json``,
    ``duplicate_custom_id``, pydantic's error type such as ``missing``); it is not part of
    equality, and the OpenAI API maps it to its own error codes.
    """

    line: int
    field: str
    message: str
    code: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.line}:{self.field}: {self.message}"


class InputError(ValueError):
    """The input was refused; ``problems`` lists (up to a cap) what is wrong and where."""

    def __init__(self, problems: list[Problem], total: int | None = None):
        self.problems = problems
        self.total = total if total is not None else len(problems)
        more = self.total - len(problems)
        lines = [str(p) for p in problems] + ([f"... and {more} more"] if more > 0 else [])
        super().__init__(f"{self.total} problem(s) in the input:\n" + "\n".join(lines))


@dataclass(frozen=True)
class ParsedItem:
    """A valid item: where it came from, its id within the job, and its normalised input."""

    line: int
    custom_id: str
    input: dict[str, Any]


def read_jsonl(stream: BinaryIO | Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object_or_Problem)`` for each non-blank line of a JSONL stream."""
    for number, raw in enumerate(stream, start=1):
        if len(raw) > MAX_LINE_BYTES:
            yield number, Problem(number, "-", f"line is {len(raw)} bytes; the limit is {MAX_LINE_BYTES}",
                                  "line_too_long")
            continue
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            if number == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark, as editors write
        except UnicodeDecodeError as exc:
            yield number, Problem(number, "-", f"not valid UTF-8 (byte {exc.start})", "invalid_utf8")
            continue
        if not text.strip():
            continue
        text = text.rstrip("\r\n")  # else an error at the end of the line reads "column 1"
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            where = "the end of the line" if exc.pos >= len(text) else f"column {exc.pos + 1}"
            # Some messages end in "at" ("Unterminated string starting at"): no "at at".
            yield number, Problem(number, "-", f"invalid JSON: {exc.msg.removesuffix(' at')} at {where}",
                                  "invalid_json")
        except RecursionError:
            yield number, Problem(number, "-", "invalid JSON: nested too deeply", "invalid_json")


def validate_records(kind: Kind | str, records: Iterable[tuple[int, Any]]) -> Iterator[ParsedItem | Problem]:
    """Validate ``(line, record)`` pairs against ``kind``'s spec; yield items and problems.

    Items without a ``custom_id`` get ``item-<line>``; a ``custom_id`` seen twice is a problem.
    """
    spec_type = SPECS[Kind(kind)]
    seen: set[str] = set()
    for line, record in records:
        if isinstance(record, Problem):
            yield record
            continue
        if not isinstance(record, dict):
            yield Problem(line, "-", f"expected a JSON object, got {type(record).__name__}", "invalid_json")
            continue
        try:
            spec = spec_type.model_validate(record)
        except ValidationError as exc:
            yield from problems_from(line, exc)
            continue
        custom_id = getattr(spec, "custom_id", None) or f"item-{line}"
        if custom_id in seen:
            yield Problem(line, "custom_id", f"duplicate custom_id {custom_id!r}", "duplicate_custom_id")
            continue
        seen.add(custom_id)
        yield ParsedItem(line, custom_id, _dump(spec))


def validate_items(kind: Kind | str, items: Iterable[Any]) -> Iterator[ParsedItem | Problem]:
    """Validate Python objects (dicts or spec models); their position (1-based) is the line."""
    def records() -> Iterator[tuple[int, Any]]:
        for number, item in enumerate(items, start=1):
            yield number, item.model_dump(exclude_unset=True) if isinstance(item, BaseModel) else item

    return validate_records(kind, records())


def _dump(spec: BaseModel) -> dict[str, Any]:
    data = spec.model_dump(mode="json", exclude={"custom_id"}, exclude_none=True)
    if "params" in data and not data["params"]:
        del data["params"]
    return data


# Errors whose message is clearer with the input it refused ("...; got 'hot'").
_SHOW_INPUT = {"literal_error", "int_parsing", "float_parsing", "bool_parsing", "finite_number",
               "json_array"}
# Pydantic's message, where it does not say what would have been accepted.
_MESSAGES = {"bool_parsing": "Input should be a valid boolean (true/false, yes/no, on/off, 1/0)"}


def problems_from(line: int, exc: ValidationError, *, prefix: str = "",
                  messages: dict[str, str] | None = None) -> Iterator[Problem]:
    """The one converter from a pydantic ``ValidationError`` to :class:`Problem`\\ s of ``line``.

    ``prefix`` goes before every field (``body`` → ``body.max_tokens``); ``messages`` replaces
    pydantic's message for the error types it names (``{"missing": "required"}``). A value that
    does not parse, or a literal that does not match, says what it got.
    """
    messages = _MESSAGES | (messages or {})
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "") or "-"
        message = messages.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        if err["type"] in _SHOW_INPUT:
            message = f"{message}; got {_show(err['input'])}"
        yield Problem(line, field, message, err["type"])


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
