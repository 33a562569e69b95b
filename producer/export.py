"""Writing result rows out: JSONL, CSV, Parquet, and OpenAI Batch output lines.

Each writer streams: rows are consumed once and memory stays flat for any job size.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from itertools import islice
from typing import Any, BinaryIO, TextIO

JSON_FIELDS = ("output", "artifact_uris", "params")


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

    schema = pa.schema([
        ("custom_id", pa.string()), ("kind", pa.string()), ("output_text", pa.string()),
        ("output", pa.string()), ("artifact_uris", pa.string()), ("error_code", pa.string()),
        ("error_message", pa.string()), ("model", pa.string()), ("seed", pa.int64()),
        ("params", pa.string()), ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()),
        ("latency_ms", pa.float64()), ("worker", pa.string()), ("device", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ])
    count = 0
    rows = iter(rows)
    with pq.ParquetWriter(out, schema) as writer:
        while batch := list(islice(rows, batch_rows)):
            columns = {name: [_parquet_value(name, row.get(name)) for row in batch] for name in schema.names}
            writer.write_table(pa.table(columns, schema=schema))
            count += len(batch)
    return count


def _parquet_value(name: str, value: Any) -> Any:
    if name in JSON_FIELDS and value is not None:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # SQLite gives naive UTC
    return value


def openai_lines(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """OpenAI Batch output objects: ``{id, custom_id, response, error}`` keyed by custom_id."""
    for number, row in enumerate(rows, start=1):
        if row["error_code"]:
            yield {"id": f"batch_req_{number}", "custom_id": row["custom_id"], "response": None,
                   "error": {"code": row["error_code"], "message": row["error_message"]}}
            continue
        texts = _choice_texts(row)
        usage = {"prompt_tokens": row["prompt_tokens"] or 0,
                 "completion_tokens": row["output_tokens"] or 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        body = {"object": "text_completion", "model": row["model"], "usage": usage,
                "created": int(row["created_at"].timestamp()) if row.get("created_at") else None,
                "choices": [{"index": i, "text": text, "finish_reason": "stop"}
                            for i, text in enumerate(texts)]}
        yield {"id": f"batch_req_{number}", "custom_id": row["custom_id"], "error": None,
               "response": {"status_code": 200, "request_id": f"{row['custom_id']}", "body": body}}


def _choice_texts(row: dict[str, Any]) -> list[str]:
    output = row.get("output") or {}
    if "variants" in output:
        return [v.get("text") or "\n".join(filter(None, (v.get("headline"), v.get("body"), v.get("cta"))))
                for v in output["variants"]]
    return [row["output_text"] or ""]


def write_openai(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    return write_jsonl(openai_lines(rows), out)


def write_files(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """The URI of every file the items wrote (image kinds), one a line; how many."""
    count = 0
    for row in rows:
        for uri in row.get("artifact_uris") or ():
            out.write(f"{uri}\n")
            count += 1
    return count


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "openai": write_openai,
           "files": write_files}
BINARY_FORMATS = ("parquet",)
