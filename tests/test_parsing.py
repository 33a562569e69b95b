"""Input validation: every problem reported with its line and field."""

from __future__ import annotations

import io
import json

import pytest

from aigc.schemas.parsing import (MAX_LINE_BYTES, ParsedItem, Problem, read_jsonl, validate_items,
                             validate_records)
from aigc.schemas.specs import LENGTH_HELP


def check(kind: str, data: bytes) -> tuple[list[ParsedItem], list[str]]:
    out = list(validate_records(kind, read_jsonl(io.BytesIO(data))))
    return ([o for o in out if isinstance(o, ParsedItem)], [str(o) for o in out if isinstance(o, Problem)])


def test_valid_lines_get_ids_and_defaults():
    items, problems = check("article", b'{"topic": "bees"}\n\n{"custom_id": "x", "prompt": "Hi"}\n')
    assert problems == []
    assert [(i.line, i.custom_id) for i in items] == [(1, "item-1"), (3, "x")]
    assert items[0].input["length"] == 300 and "custom_id" not in items[1].input


@pytest.mark.parametrize("line,expected", [
    (b'{"topic": ', "1:-: invalid JSON"),
    (b'{"tone": "calm"}', "1:topic: Field required"),
    (b'{"topic": "x", "length": "longest"}', "1:length: " + LENGTH_HELP + "; got 'longest'"),
    (b'{"topic": "x", "length": 5}', "1:length: " + LENGTH_HELP + "; got 5"),
    (b'{"topic": "x", "length": 5001}', "1:length: " + LENGTH_HELP + "; got 5001"),
    (b'{"topic": "x", "length": 2.5}', "1:length: Input should be a valid integer, got a number with a fractional part"),
    (b'{"topic": "x", "colour": "red"}', "1:colour: Extra inputs are not permitted"),
    (b'{"topic": "   "}', "1:topic: String should have at least 1 character"),
    (b'{"topic": "x", "params": {"max_new_tokens": 100000}}', "1:params.max_new_tokens: Input should be less than or equal to 4096"),
    (b'{"topic": "x", "params": {"max_new_tokens": -1}}', "1:params.max_new_tokens: Input should be greater than or equal to 1"),
    (b'["topic"]', "1:-: expected a JSON object, got list"),
    (b'\xff\xfe{}', "1:-: not valid UTF-8 (byte 0)"),
    (b'{"topic": "' + b"x" * MAX_LINE_BYTES + b'"}', f"1:-: line is {MAX_LINE_BYTES + 14} bytes"),
    (b"[" * 100_000 + b"]" * 100_000, "1:-: invalid JSON: nested too deeply"),
    (b'{"topic": "x", "params": ' + b'{"a": ' * 5000 + b'1' + b'}' * 5001, "1:-: invalid JSON: nested too deeply"),
    (b'{"topic": "a\\u0000b"}', "1:topic: contains control character U+0000 at position 1"),
    (b'{"prompt": "\\u001b[2J wipe"}', "1:prompt: contains control character U+001B at position 0"),
    (b'{"topic": "x", "keywords": ["ok", "b\\u0007"]}', "1:keywords.1: contains control character U+0007"),
    (b'{"topic": "x", "custom_id": "id\\u007f"}', "1:custom_id: contains control character U+007F"),
    (b'{"topic": "x", "params": {"stop": ["\\u0000"]}}', "1:params.stop.0: contains control character U+0000"),
])
def test_each_problem_names_line_and_field(line, expected):
    items, problems = check("article", line + b"\n")
    assert items == []
    assert len(problems) >= 1 and problems[0].startswith(expected), problems


def test_tab_newline_and_carriage_return_are_ordinary_text():
    items, problems = check("article", b'{"prompt": "a\\tb\\r\\nc", "params": {"stop": ["\\n"]}}\n')
    assert problems == []
    assert items[0].input["prompt"] == "a\tb\r\nc" and items[0].input["params"]["stop"] == ["\n"]


def test_all_problems_are_reported_at_once_with_their_lines():
    data = b'{"topic": "ok"}\n{bad\n{"topic": "a", "custom_id": "d"}\n{"topic": "b", "custom_id": "d"}\n{"product": 1}\n'
    items, problems = check("article", data)
    assert [i.line for i in items] == [1, 3]
    assert [p.split(":")[0:2] for p in problems] == [["2", "-"], ["4", "custom_id"], ["5", "product"]]


def test_ad_copy_limits():
    _, problems = check("ad_copy", b'{"product": "x", "n_variants": 11, "channel": "tv"}\n')
    assert sorted(p.split(":")[1] for p in problems) == ["channel", "n_variants"]


def test_python_objects_are_numbered_by_position():
    out = list(validate_items("article", [{"topic": "a"}, {"topic": 3}, "nope"]))
    assert isinstance(out[0], ParsedItem)
    assert [str(p).split(":")[:2] for p in out[1:]] == [["2", "topic"], ["3", "-"]]


def test_item_json_round_trips_through_storage():
    (item,) = [o for o in validate_items("article", [{"topic": "é ✓", "params": {"seed": 3}}])]
    assert json.loads(json.dumps(item.input))["params"] == {"seed": 3}


def test_a_utf8_bom_is_accepted_and_json_errors_say_where():
    items, problems = check("article", b'\xef\xbb\xbf{"topic": "bees"}\n{"topic": "x\n{"topic": \n')
    assert [i.input["topic"] for i in items] == ["bees"]
    assert problems == ["2:-: invalid JSON: Unterminated string starting at column 11",
                        "3:-: invalid JSON: Expecting value at the end of the line"]
