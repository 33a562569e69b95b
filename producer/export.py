"""Writing result rows out: JSONL, CSV, Parquet, and OpenAI Batch output and error files.

Each writer streams: rows are consumed once and memory stays flat for any job size. A row is a
dict with the columns of :data:`aigc.schemas.results.EXPORT_COLUMNS` (what ``aigc.results``
yields), whose types (:class:`aigc.schemas.results.ResultRow`) give the Parquet schema.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from itertools import islice
from typing import Any, BinaryIO, TextIO

from aigc.schemas.results import EXPORT_COLUMNS, JSON_COLUMNS, column_type


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def write_jsonl(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """CSV with a header; nested fields (output, params, artifact_uris) as JSON text."""
    writer = None
    count = 0
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(row))
            writer.writeheader()
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list))
                         else _plain(v) for k, v in row.items()})
        count += 1
    return count


def write_parquet(rows: Iterable[dict[str, Any]], out: BinaryIO, batch_rows: int = 10_000) -> int:
    """Parquet with typed columns; nested fields as JSON strings (every reader can parse them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    count = 0
    rows = iter(rows)
    with pq.ParquetWriter(out, schema) as writer:
        while batch := list(islice(rows, batch_rows)):
            columns = {name: [_parquet_value(name, row.get(name)) for row in batch] for name in schema.names}
            writer.write_table(pa.table(columns, schema=schema))
            count += len(batch)
    return count


def parquet_schema() -> Any:
    """The ``pyarrow.Schema`` of an export: one column per export column, typed from
    :class:`aigc.schemas.results.ResultRow` (JSON columns as strings)."""
    import pyarrow as pa

    types = {str: pa.string(), int: pa.int64(), float: pa.float64(), dict: pa.string(),
             list: pa.string(), datetime: pa.timestamp("us", tz="UTC")}
    return pa.schema([(name, types[column_type(name)]) for name in EXPORT_COLUMNS])


def _parquet_value(name: str, value: Any) -> Any:
    if name in JSON_COLUMNS and value is not None:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # SQLite gives naive UTC
    return value


def openai_line(row: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI Batch output line for a result ``row`` read with ``with_input=True``.

    A success is ``{id, custom_id, response: {status_code: 200, request_id, body}, error: null}``
    whose body is a ``chat.completion`` (chat messages and the templated kinds, which are
    prompted as chat) or a ``text_completion`` (free-form ``prompt`` items), with one choice per
    output, or for an image set OpenAI's images response (``data[].url``: the files); a failure
    is ``{id, custom_id, response: null, error: {code, message}}``. Ids are derived from the
    job id and custom_id, so exporting twice gives the same lines.
    """
    digest = hashlib.sha256(f"{row.get('job_id', '')}\0{row['custom_id']}".encode()).hexdigest()
    line = {"id": f"batch_req_{digest[:32]}", "custom_id": row["custom_id"]}
    if row["error_code"]:
        return line | {"response": None,
                       "error": {"code": row["error_code"], "message": row["error_message"] or ""}}
    created = row.get("created_at")
    created = int(created.timestamp()) if isinstance(created, datetime) else 0
    if row.get("kind") == "image_set":
        return line | {"response": {"status_code": 200, "request_id": f"req_{digest[:32]}",
                                    "body": _images_body(row, created)}, "error": None}
    chat = "prompt" not in (row.get("input") or {})
    usage = {"prompt_tokens": row["prompt_tokens"] or 0, "completion_tokens": row["output_tokens"] or 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    choices = []
    for index, (text, reason) in enumerate(_choices(row)):
        if chat:
            choices.append({"index": index, "finish_reason": reason, "logprobs": None,
                            "message": {"role": "assistant", "content": text, "refusal": None}})
        else:
            choices.append({"index": index, "finish_reason": reason, "logprobs": None, "text": text})
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{digest[32:56]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": row["model"], "choices": choices, "usage": usage,
            "system_fingerprint": None}
    return line | {"response": {"status_code": 200, "request_id": f"req_{digest[:32]}", "body": body},
                   "error": None}


def _images_body(row: dict[str, Any], created: int) -> dict[str, Any]:
    """An image set as OpenAI's images response: one URL (the artifact URI) per image."""
    output = row.get("output") or {}
    body: dict[str, Any] = {"created": created, "output_format": "png",
                            "data": [{"url": image["uri"]} for image in output.get("images", ())]}
    if output.get("width"):
        body["size"] = f"{output['width']}x{output['height']}"
    return body


def _choices(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(text, finish_reason) per output of a row."""
    output = row.get("output") or {}
    reason = row.get("finish_reason") or "stop"
    if "variants" in output:
        return [(v.get("text") or "", v.get("finish_reason") or reason) for v in output["variants"]]
    return [(row["output_text"] or "", reason)]


def write_openai(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """OpenAI's Batch output file: one line per successful row (failures go to the error file)."""
    return write_jsonl((openai_line(row) for row in rows if not row["error_code"]), out)


def write_openai_errors(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """OpenAI's Batch error file: one line per failed row."""
    return write_jsonl((openai_line(row) for row in rows if row["error_code"]), out)


def write_files(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """The URI of every file the items wrote (image kinds), one a line; how many."""
    count = 0
    for row in rows:
        for uri in row.get("artifact_uris") or ():
            out.write(f"{uri}\n")
            count += 1
    return count


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "openai": write_openai,
           "openai_errors": write_openai_errors,
           "files": write_files}
BINARY_FORMATS = ("parquet",)
EXPORT_FORMATS = ("jsonl", "csv", "parquet", "openai", "files")  # what --format takes
