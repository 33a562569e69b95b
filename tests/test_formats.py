"""CSV and OpenAI batch input: round trips against JSONL, and each malformed input's LINE:FIELD."""

from __future__ import annotations

import io
import itertools
import json

import pytest

from aigc.schemas.specs import LENGTH_HELP
from aigc.schemas.formats import (FORMATS, detect_format, read_csv, read_openai_batch, reader_for)
from aigc.schemas.parsing import MAX_LINE_BYTES, ParsedItem, Problem, read_jsonl, validate_records


def check(kind: str, reader, data: bytes) -> tuple[list[ParsedItem], list[str]]:
    out = list(validate_records(kind, reader(io.BytesIO(data))))
    return ([o for o in out if isinstance(o, ParsedItem)], [str(o) for o in out if isinstance(o, Problem)])


def csv_check(kind: str, data: bytes):
    return check(kind, lambda s: read_csv(s, kind), data)


def openai_check(kind: str, lines: list, raw: bytes = b""):
    data = b"\n".join(json.dumps(line).encode() for line in lines) + raw
    return check(kind, lambda s: read_openai_batch(s, kind), data)


def batch_line(body: dict, url: str = "/v1/completions", **top) -> dict:
    return {"custom_id": "r1", "method": "POST", "url": url, "body": body} | top


# --- CSV -------------------------------------------------------------------------------------

def test_csv_articles_give_the_same_items_as_jsonl(tmp_path):
    csv_path = tmp_path / "articles.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbfcustom_id,topic,keywords,length,tone,params.max_new_tokens,params.stop,params.temperature\r\n"
        b"bees,Bees,honey;wax,400,calm,200,END;STOP,0.7\r\n"
        b'ants,"Ants, and\nhow they march","[""colony"", ""queen""]",,,,,\r\n'
        b"\r\n"
        b",,,,,,,\r\n"
        b"moles,Moles,,  120 ,,,,\r\n"
    )
    jsonl_path = tmp_path / "articles.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in [
        {"custom_id": "bees", "topic": "Bees", "keywords": ["honey", "wax"], "length": 400, "tone": "calm",
         "params": {"max_new_tokens": 200, "stop": ["END", "STOP"], "temperature": 0.7}},
        {"custom_id": "ants", "topic": "Ants, and\nhow they march", "keywords": ["colony", "queen"]},
        {"custom_id": "moles", "topic": "Moles", "length": 120},
    ]))
    with csv_path.open("rb") as stream:
        from_csv = list(validate_records("article", read_csv(stream, "article")))
    with jsonl_path.open("rb") as stream:
        from_jsonl = list(validate_records("article", read_jsonl(stream)))
    assert all(isinstance(o, ParsedItem) for o in from_csv), from_csv
    assert [(i.custom_id, i.input) for i in from_csv] == [(i.custom_id, i.input) for i in from_jsonl]
    # physical lines: the quoted newline makes "ants" span lines 3-4, so "moles" is on line 7
    assert [i.line for i in from_csv] == [2, 3, 7]
    assert from_csv[0].input["params"] == {"max_new_tokens": 200, "stop": ["END", "STOP"], "temperature": 0.7}


def test_csv_coerces_ad_copy_and_image_set_fields_by_their_spec_types():
    items, problems = csv_check("ad_copy", b"product,channel,max_chars,n_variants,params.seed\nboots,search,90,3,7\n")
    assert problems == []
    assert items[0].input == {"product": "boots", "audience": "general audience", "channel": "search",
                                  "tone": "friendly", "max_chars": 90, "n_variants": 3, "params": {"seed": 7}}
    items, problems = csv_check("image_set", b"custom_id,n_images,seed,grid,label\n"
                                              b"a,2,5,Yes,cats\nb,1,,0,\nc,3,,true,\n")
    assert problems == []
    assert [(i.custom_id, i.input) for i in items] == [
        ("a", {"n_images": 2, "seed": 5, "grid": True, "label": "cats"}),
        ("b", {"n_images": 1, "grid": False}),
        ("c", {"n_images": 3, "grid": True}),
    ]


@pytest.mark.parametrize("cell,grid", [("yes", True), ("YES", True), ("true", True), ("1", True), ("on", True),
                                       ("no", False), ("False", False), ("0", False), ("off", False)])
def test_csv_booleans_are_pydantics_lax_spellings(cell, grid):
    items, problems = csv_check("image_set", f"grid\n{cell}\n".encode())
    assert problems == [] and items[0].input["grid"] is grid


def test_csv_numbers_follow_pydantics_lax_mode():
    items, problems = csv_check("image_set", b"custom_id,n_images,seed\na, 2 ,1.0\nb,1.5,\nc,3,1e3\n")
    assert [(i.custom_id, i.input) for i in items] == [("a", {"n_images": 2, "seed": 1, "grid": False})]
    assert problems == [f"3:n_images: {INTEGER}; got '1.5'", f"4:seed: {INTEGER}; got '1e3'"]
    items, problems = csv_check("article", b"topic,params.temperature,params.top_p\nbees,0.5,1\nants,inf,x\n")
    assert items[0].input["params"] == {"temperature": 0.5, "top_p": 1.0}
    assert problems == ["3:params.temperature: Input should be a finite number; got 'inf'",
                        f"3:params.top_p: {NUMBER}; got 'x'"]


def test_csv_empty_cells_are_not_given_and_list_cells_drop_blank_parts():
    items, problems = csv_check("article", b"topic,keywords,tone,params.stop,params.seed\n"
                                           b"bees,a;;b; ,,END;; STOP ,\n"
                                           b"ants,;,  ,  ,\n")
    assert problems == []
    assert items[0].input["keywords"] == ["a", "b"] and items[0].input["params"] == {"stop": ["END", "STOP"]}
    assert items[0].input["tone"] == "neutral"  # the spec's default, as if the column were absent
    assert items[1].input["keywords"] == [] and "params" not in items[1].input


def test_a_b_lists_are_csv_only():
    """In JSON a list is an array: a string there is still refused, not split."""
    _, problems = check("article", read_jsonl, b'{"topic": "bees", "keywords": "a;b"}\n')
    assert problems == ["1:keywords: Input should be a valid list"]
    _, problems = check("article", read_jsonl, b'{"topic": "bees", "params": {"temperature": NaN}}\n')
    assert problems == ["1:params.temperature: Input should be a finite number; got nan"]


def test_csv_ids_are_per_line_and_duplicates_are_caught_by_validation():
    items, problems = csv_check("article", b"topic,custom_id\na,\nb,x\nc,x\n")
    assert [(i.line, i.custom_id) for i in items] == [(2, "item-2"), (3, "x")]
    assert problems == ["4:custom_id: duplicate custom_id 'x'"]


@pytest.mark.parametrize("data", [b"", b"\n\n", b"\xef\xbb\xbf", b"topic,length\n"])
def test_csv_without_rows_yields_nothing(data):
    assert list(read_csv(io.BytesIO(data), "article")) == []


def test_csv_reads_lazily():
    def endless():
        yield b"topic\n"
        while True:
            yield b"bees\n"
    first = list(itertools.islice(read_csv(endless(), "article"), 3))
    assert first == [(2, {"topic": "bees"}), (3, {"topic": "bees"}), (4, {"topic": "bees"})]


NUMBER = "Input should be a valid number, unable to parse string as a number"
INTEGER = "Input should be a valid integer, unable to parse string as an integer"
UNKNOWN = "1:colour: unknown column; known: custom_id, prompt, params.max_new_tokens, params.min_new_tokens, params.temperature, " \
          "params.top_p, params.repetition_penalty, params.seed, params.stop, params.n, topic, keywords, length, tone, language, title"


@pytest.mark.parametrize("kind,data,expected", [
    ("article", b"tone\ncalm\n", ["2:topic: Field required (or give a free-form 'prompt' or chat 'messages')"]),
    ("article", b"topic,colour\nbees,red\nants,blue\n", [UNKNOWN]),
    ("article", b"topic,length\nbees,300\nants,longest\n", ["3:length: " + LENGTH_HELP + "; got 'longest'"]),
    ("article", b"topic,length\nbees,3.5\n", ["2:length: " + LENGTH_HELP + "; got '3.5'"]),
    ("article", b"topic,params.temperature\nbees,hot\n", [f"2:params.temperature: {NUMBER}; got 'hot'"]),
    ("article", b"topic,params.temperature\nbees,nan\n", ["2:params.temperature: Input should be a finite number; got 'nan'"]),
    ("article", b"topic,keywords\nbees,[oops\n", ["2:keywords: not a JSON array; got '[oops'"]),
    ("article", b"topic,params.max_new_tokens\nbees,5000\n",
     ["2:params.max_new_tokens: Input should be less than or equal to 4096"]),
    ("image_set", b"n_images,grid\n4,maybe\n", ["2:grid: Input should be a valid boolean (true/false, yes/no, on/off, 1/0); got 'maybe'"]),
    ("image_set", b"n_images,params.seed\n4,1\n",
     ["1:params.seed: unknown column; known: custom_id, n_images, seed, label, grid, size"]),
    ("article", b"topic\nbees\n\xff\xfeants\nwasps\n", ["3:-: not valid UTF-8 (byte 0)"]),
    ("article", b"topic,length\nbees,300,extra\n", ["2:-: row has 3 cells; the header has 2"]),
    ("article", b'topic\n"bees\nants\n', ['2:-: malformed CSV: unexpected end of data']),
    ("article", b'topic\n"bees"x\nants\n', ["2:-: malformed CSV: ',' expected after '\"'"]),
    ("article", b"topic,,length\nbees,,300\n", ["1:-: column 2 has no name"]),
    ("article", b"topic,topic\nbees,ants\n", ["1:topic: column appears twice"]),
    ("article", b"topic,length\n" + b"x" * MAX_LINE_BYTES + b"\n",
     [f"2:-: record is longer than {MAX_LINE_BYTES} bytes"]),
])
def test_csv_problems_name_line_and_field(kind, data, expected):
    _, problems = csv_check(kind, data)
    assert problems == expected


def test_csv_problems_are_all_reported_and_good_rows_survive_them():
    data = b"".join([
        b"topic,length,params.seed,params.temperature\n",
        b"ok,300,1,\n",                         # 2
        b"bad,300,minus,hot\n",                 # 3: two problems on one row
        b'"multi\nline",\xff,,\n',              # 4-5: bad UTF-8 on line 5, reported there
        b"x" * (MAX_LINE_BYTES + 1) + b"\n",    # 6: too long; parsing resumes on the next line
        b"fine,50,,\n",                         # 7
        b"named,long,,\n",                      # 8: a named length, as in JSONL
        b"worse,longer,,\n",                    # 9: found by the spec's own validator
    ])
    items, problems = csv_check("article", data)
    assert [i.line for i in items] == [2, 7, 8] and items[2].input["length"] == 800
    assert problems == [f"3:params.temperature: {NUMBER}; got 'hot'", f"3:params.seed: {INTEGER}; got 'minus'",
                        "5:-: not valid UTF-8 (byte 6)", f"6:-: record is longer than {MAX_LINE_BYTES} bytes",
                        "9:length: " + LENGTH_HELP + "; got 'longer'"]


# --- OpenAI batch ----------------------------------------------------------------------------

def test_openai_completions_file_round_trips(tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        batch_line({"model": "gpt-4o-mini", "prompt": "Write about bees.", "max_tokens": 64,
                    "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "END", "n": 2, "user": "u1",
                    "stream": False, "presence_penalty": 0, "logprobs": None}, custom_id="a"),
        batch_line({"prompt": ["Write about ants."], "stop": ["X", "Y"], "max_completion_tokens": 10},
                   custom_id="b"),
        batch_line({"prompt": "Plain."}, custom_id="c"),
    ]) + "\n\n")
    with path.open("rb") as stream:
        out = list(validate_records("article", reader_for(detect_format(str(path)), "article")(stream)))
    assert all(isinstance(o, ParsedItem) for o in out), out
    assert [(o.line, o.custom_id, o.input["prompt"], o.input.get("params")) for o in out] == [
        (1, "a", "Write about bees.",
         {"max_new_tokens": 64, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["END"], "n": 2}),
        (2, "b", "Write about ants.", {"max_new_tokens": 10, "stop": ["X", "Y"]}),
        (3, "c", "Plain.", None),
    ]
    assert "model" not in out[0].input and out[0].input["length"] == 300


def test_openai_chat_lines_keep_their_messages():
    """The messages are stored as messages: the worker renders them with the model's template."""
    items, problems = openai_check("ad_copy", [batch_line({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You write ads."},
            {"role": "user", "content": [{"type": "text", "text": "Boots for hikers."},
                                         {"type": "text", "text": "Keep it short."}]},
            {"role": "assistant", "content": "Dry feet, every trail."},
            {"role": "user", "content": "Another one.", "name": "sam"},
        ],
        "max_completion_tokens": 40, "temperature": 1.0,
    }, url="/v1/chat/completions")])
    assert problems == []
    assert items[0].input["messages"] == [
        {"role": "system", "content": "You write ads."},
        {"role": "user", "content": "Boots for hikers.\nKeep it short."},
        {"role": "assistant", "content": "Dry feet, every trail."},
        {"role": "user", "content": "Another one.", "name": "sam"},
    ]
    assert "prompt" not in items[0].input
    assert items[0].input["params"] == {"max_new_tokens": 40, "temperature": 1.0}


@pytest.mark.parametrize("messages,expected", [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
     "1:body.messages: the last message must not be the assistant's: the model writes the next one"),
    ([{"role": "user", "content": "x" * 20_000}, {"role": "user", "content": "y" * 20_000}],
     "1:body.messages: messages hold 40000 characters; the limit is 32000"),
    ([{"role": "user", "content": "clear \x1b[2J"}],
     "1:body.messages.0.content: contains control character U+001B at position 6; only tab, "
     "newline and carriage return are allowed"),
    ([{"role": "user", "content": [{"type": "text", "text": "look"},
                                   {"type": "input_audio", "input_audio": {}}]}],
     "1:body.messages.0.content: part 1 is 'input_audio': only text parts are supported (the "
     "model reads text only)"),
    ([{"role": "user", "content": "Hi", "tool_calls": []}], "1:body.messages.0.tool_calls: not supported"),
])
def test_openai_chat_lines_the_model_cannot_take_are_refused(messages, expected):
    items, problems = openai_check("article", [batch_line({"messages": messages}, url=CHAT)])
    assert items == [] and problems == [expected]


def test_openai_reads_lazily_and_catches_duplicate_ids():
    def endless():
        while True:
            yield json.dumps(batch_line({"prompt": "p"})).encode() + b"\n"
    first = list(itertools.islice(validate_records("article", read_openai_batch(endless(), "article")), 2))
    assert isinstance(first[0], ParsedItem) and str(first[1]) == "2:custom_id: duplicate custom_id 'r1'"


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("line,expected", [
    (batch_line({"prompt": "p"}, url="/v1/embeddings"),
     ["1:url: Input should be '/v1/chat/completions' or '/v1/completions'; got '/v1/embeddings'"]),
    ({"custom_id": "r1", "method": "POST", "body": {"prompt": "p"}},
     ["1:url: required in the OpenAI batch format"]),
    (batch_line({"prompt": "p"}, url=["/v1/completions"]),
     ["1:url: Input should be '/v1/chat/completions' or '/v1/completions'; got ['/v1/completions']"]),
    (batch_line({"messages": [{"role": ["user"], "content": "x"}]}, url=CHAT),
     ["1:body.messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'; got ['user']"]),
    (batch_line({"prompt": "p"}, method="GET"), ["1:method: Input should be 'POST'; got 'GET'"]),
    ({"custom_id": "r1", "url": "/v1/completions", "body": {"prompt": "p"}}, ["1:method: required in the OpenAI batch format"]),
    ({"method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}},
     ["1:custom_id: required in the OpenAI batch format"]),
    (batch_line({"prompt": "p"}, custom_id=None), ["1:custom_id: Input should be a valid string"]),
    (batch_line({"prompt": "p"}, extra=1), ["1:extra: not part of the OpenAI batch format"]),
    (batch_line({"prompt": "p"}) | {"body": "p"}, ["1:body: Input should be a valid dictionary"]),
    (batch_line({"messages": "Hi"}, url=CHAT), ["1:body.messages: Input should be a valid list"]),
    (batch_line({"messages": []}, url=CHAT),
     ["1:body.messages: List should have at least 1 item after validation, not 0"]),
    (batch_line({"messages": ["Hi"]}, url=CHAT), ["1:body.messages.0: Input should be a valid dictionary or instance of ChatMessage"]),
    (batch_line({"messages": [{"role": "tool", "content": "x"}]}, url=CHAT),
     ["1:body.messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'; got 'tool'"]),
    (batch_line({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, url=CHAT),
     ["1:body.messages.0.content: part 0 is 'image_url': only text parts are supported (the model reads text only)"]),
    (batch_line({"prompt": "p", "logprobs": True}), ["1:body.logprobs: not supported"]),
    (batch_line({"prompt": "p", "frequency_penalty": 0.5, "tools": []}),
     ["1:body.frequency_penalty: not supported", "1:body.tools: not supported"]),
    (batch_line({"prompt": "p", "stream": True}), ["1:body.stream: not supported"]),
    (batch_line({"messages": [{"role": "user", "content": "x"}]}), ["1:body.prompt: required",
                                                                  "1:body.messages: not supported"]),
    (batch_line({"prompt": ["one", "two"]}),
     ["1:body.prompt: a list of 2 prompts is not supported; put one prompt per line"]),
    (batch_line({"prompt": [1, 2, 3]}), ["1:body.prompt: must be a string (or a list of one string)"]),
    (batch_line({"prompt": "  "}), ["1:body.prompt: String should have at least 1 character"]),
    (batch_line({"prompt": "x" * 32_001}), ["1:body.prompt: String should have at most 32000 characters"]),
    (batch_line({"prompt": "p", "max_tokens": 5000}), ["1:body.max_tokens: Input should be less than or equal to 4096"]),
    (batch_line({"prompt": "p", "max_tokens": 5, "max_completion_tokens": 6}),
     ["1:body.max_completion_tokens: conflicts with body.max_tokens"]),
    (batch_line({"prompt": "p", "n": 11, "top_p": 0}),
     ["1:body.top_p: Input should be greater than 0", "1:body.n: Input should be less than or equal to 10"]),
    (batch_line({"prompt": "p", "stop": ["ok", ""]}), ["1:body.stop.1: String should have at least 1 character"]),
    (batch_line({"prompt": "p"}, custom_id=7), ["1:custom_id: Input should be a valid string"]),
    (["not", "an", "object"], ["1:-: expected a JSON object, got list"]),
])
def test_openai_problems_name_line_and_field(line, expected):
    items, problems = openai_check("article", [line])
    assert items == [] and problems == expected


def test_openai_problems_keep_their_lines_among_good_ones():
    items, problems = openai_check("article", [batch_line({"prompt": "a"}, custom_id="a")],
                                   raw=b"\n{broken\n" + json.dumps(batch_line({"prompt": "b"}, url="/x")).encode())
    assert [i.line for i in items] == [1]
    assert [p.split(": ")[0] for p in problems] == ["2:-", "3:url"]


def test_openai_format_is_for_text_kinds_only():
    items, problems = openai_check("image_set", [batch_line({"prompt": "a"}), batch_line({"prompt": "b"})])
    assert items == []
    assert problems == ["1:-: the openai format is for text kinds (article, ad_copy), not image_set",
                        "2:-: the openai format is for text kinds (article, ad_copy), not image_set"]


# --- detection and dispatch ------------------------------------------------------------------

@pytest.mark.parametrize("name,content,expected", [
    ("items.csv", b'{"url": "/v1/completions", "body": {}}\n', "csv"),
    ("ITEMS.CSV", b"topic\nbees\n", "csv"),
    ("items.jsonl", b'{"topic": "bees"}\n', "jsonl"),
    ("items.jsonl", b'\n  \n{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n', "openai"),
    ("items.json", b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}\n', "openai"),
    ("items.jsonl", b'{"url": "/v1/completions"}\n', "jsonl"),
    ("items.jsonl", b"", "jsonl"),
    ("items.jsonl", b"{broken\n", "jsonl"),
    ("items.jsonl", b'["url", "body"]\n', "jsonl"),
])
def test_detect_format(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    assert detect_format(str(path)) == expected
    assert detect_format(path) == expected


def test_reader_for_dispatches_and_refuses_unknown_formats():
    assert FORMATS == ("jsonl", "csv", "openai")
    assert reader_for("jsonl", "image_set") is read_jsonl
    assert list(reader_for("csv", "article")(io.BytesIO(b"topic\nbees\n"))) == [(2, {"topic": "bees"})]
    assert list(reader_for("openai", "article")(io.BytesIO(json.dumps(batch_line({"prompt": "p"})).encode()))) \
        == [(1, {"custom_id": "r1", "prompt": "p"})]
    with pytest.raises(ValueError, match="unknown input format 'xml'; expected one of: jsonl, csv, openai"):
        reader_for("xml", "article")
    with pytest.raises(ValueError):
        reader_for("csv", "poem")


def test_openai_whitespace_stop_strings_and_n_survive_validation():
    from aigc.schemas.specs import n_outputs

    line = batch_line({"prompt": "p", "stop": "\n", "n": 3})
    data = io.BytesIO(json.dumps(line).encode() + b"\n")
    (item,) = list(validate_records("ad_copy", read_openai_batch(data, "ad_copy")))
    assert item.input["params"]["stop"] == ["\n"]
    assert n_outputs(item.input) == 3  # n wins over ad copy's default n_variants=1
