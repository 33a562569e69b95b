"""The Python API: submit a batch, follow it, read its results.

>>> job_id = submit("article", [{"topic": "tides"}, {"topic": "bees"}])
>>> wait(job_id).status
'completed'
>>> for row in results(job_id): print(row["custom_id"], row["output_text"])
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine, column, insert, select, table
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from aigc.schemas.db import ensure_schema
from aigc.schemas.dispatch import MAX_PRIORITY
from aigc.schemas.enums import UNFINISHED_JOB_STATUSES, ItemStatus, JobStatus, Kind
from aigc.schemas.formats import FORMATS, OPENAI_KIND, detect_format, reader_for
from aigc.schemas.parsing import (
    MAX_REPORTED_PROBLEMS, InputError, ParsedItem, Problem, problems_from, validate_items,
    validate_records,
)
from aigc.schemas.results import EXPORT_COLUMNS
from aigc.schemas.settings import Settings, get_settings
from aigc.schemas.specs import JobParams
from aigc.schemas.tables import Item, Job, Result, utcnow

from .dispatch import enqueue

INSERT_BATCH = 5_000


class IdempotencyConflictError(ValueError):
    """An idempotency key was reused with different input; the message names what differs."""


def submit(
    kind: Kind | str,
    items: Iterable[Any],
    *,
    model: str | None = None,
    params: dict[str, Any] | None = None,
    priority: int = 0,
    idempotency_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    on_invalid: Callable[[Problem], None] | None = None,
    settings: Settings | None = None,
) -> str:
    """Validate ``items`` (dicts or spec models), store them as one job, enqueue it; its id.

    Raises :class:`InputError` listing every problem (``LINE:FIELD: message``, the line being
    the item's 1-based position) and stores nothing if any item is invalid; unless
    ``on_invalid`` is given: then invalid items are handed to it and the valid ones submitted.
    """
    kind = _kind(kind)
    return _submit(kind, validate_items(kind, items), model=model, params=params,
                   priority=priority, idempotency_key=idempotency_key, metadata=metadata,
                   on_invalid=on_invalid, settings=settings or get_settings())


def submit_file(
    path: str | Path,
    kind: Kind | str | None = None,
    *,
    format: str = "auto",
    model: str | None = None,
    params: dict[str, Any] | None = None,
    priority: int = 0,
    idempotency_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    on_invalid: Callable[[Problem], None] | None = None,
    settings: Settings | None = None,
) -> str:
    """Like :func:`submit`, for a file; problems name its lines.

    ``format``: ``jsonl`` (one item per line), ``csv`` (header = fields), ``openai`` (OpenAI
    Batch API input lines), or ``auto`` (by extension, then by the first line). ``kind`` may be
    left out for an OpenAI Batch file (it runs as ``article``: its prompts and messages bypass
    the article template); the other formats need it.
    """
    if format == "auto":
        format = detect_format(path)
    if format not in FORMATS:
        raise InputError([Problem(0, "format", f"unknown format {format!r}; one of {', '.join(FORMATS)}")])
    if kind is None and format != "openai":
        raise InputError([Problem(0, "kind", f"a {format} file needs a kind (one of "
                                  f"{', '.join(k.value for k in Kind)}); only OpenAI Batch files "
                                  "can do without")])
    kind = _kind(kind or OPENAI_KIND)
    reader = reader_for(format, kind)
    with open(path, "rb") as stream:
        return _submit(kind, validate_records(kind, reader(stream)), settings=settings or get_settings(),
                       model=model, params=params, priority=priority, idempotency_key=idempotency_key,
                       metadata=metadata, on_invalid=on_invalid)


def submit_records(
    kind: Kind | str,
    records: Iterable[tuple[int, Any]],
    *,
    model: str | None = None,
    params: dict[str, Any] | None = None,
    priority: int = 0,
    idempotency_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    job_fields: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> str:
    """Like :func:`submit_file`, for ``(line, record_or_Problem)`` pairs from one of the readers
    of ``aigc.schemas.formats`` over any stream (the API server reads from the artifact store).

    ``job_fields`` sets further columns of the job row (an API batch's owner, input file,
    endpoint, completion window).
    """
    kind = _kind(kind)
    return _submit(kind, validate_records(kind, records), settings=settings or get_settings(),
                   model=model, params=params, priority=priority, idempotency_key=idempotency_key,
                   metadata=metadata, job_fields=job_fields)


def _kind(kind: Kind | str) -> Kind:
    try:
        return Kind(kind)
    except ValueError:
        raise InputError([Problem(0, "kind", f"unknown kind {kind!r}; one of "
                                  f"{', '.join(k.value for k in Kind)}")]) from None


def _submit(kind: Kind, parsed: Iterable[ParsedItem | Problem], *, settings: Settings,
            model: str | None = None, params: dict[str, Any] | None = None, priority: int = 0,
            idempotency_key: str | None = None, metadata: dict[str, Any] | None = None,
            on_invalid: Callable[[Problem], None] | None = None,
            job_fields: dict[str, Any] | None = None) -> str:
    try:
        job_params = JobParams.model_validate(params or {})
    except ValidationError as exc:
        raise InputError(list(problems_from(0, exc, prefix="params"))) from None
    if not 0 <= priority <= MAX_PRIORITY:
        raise InputError([Problem(0, "priority", f"must be 0 to {MAX_PRIORITY} (higher runs sooner)")])
    engine = ensure_schema(settings.database_url)
    job = Job(id=str(uuid.uuid4()), idempotency_key=idempotency_key, kind=kind,
              model=model or settings.default_model(kind),
              params=job_params.model_dump(mode="json", exclude_none=True),
              status=JobStatus.queued, priority=priority, meta=metadata or {}, **(job_fields or {}))
    if idempotency_key and (existing := _job_by_key(engine, idempotency_key)):
        return _same_as(existing, job, _store_items(None, job.id, parsed, on_invalid, job))
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            session.add(job)
            session.flush()
            job.total = _store_items(session, job.id, parsed, on_invalid, job)
    except IntegrityError:
        if idempotency_key and (existing := _job_by_key(engine, idempotency_key)):
            # A concurrent submit with the same key won the race.
            return _same_as(existing, job, _store_items(None, job.id, parsed, on_invalid, job))
        raise
    enqueue(settings, engine, job.id, kind, priority)
    return job.id


def _same_as(existing: Job, job: Job, _count: int) -> str:
    """``existing``'s id if ``job`` asks for the same thing; else IdempotencyConflictError."""
    fields = [("kind", "kind"), ("model", "model"), ("params", "params"), ("priority", "priority"),
              ("metadata", "meta"), ("items", "input_sha256")]
    differ = [name for name, attr in fields if getattr(existing, attr) != getattr(job, attr)
              and not (attr == "input_sha256" and existing.input_sha256 is None)]
    if differ:
        raise IdempotencyConflictError(
            f"idempotency key {existing.idempotency_key!r} belongs to job {existing.id}, submitted "
            f"with a different {', '.join(differ)}; use another key for a different batch")
    return existing.id


def _store_items(session: Session | None, job_id: str, parsed: Iterable[ParsedItem | Problem],
                 on_invalid: Callable[[Problem], None] | None = None, job: Job | None = None) -> int:
    """Insert valid items in bulk; on any problem raise InputError (the caller rolls back).

    With ``on_invalid``, problems go to it instead and only the valid items are stored.
    Without a ``session`` nothing is stored: the items are only validated and hashed. The hash
    of what is stored (custom_id and input, in order) goes to ``job.input_sha256``.
    """
    digest = hashlib.sha256()
    problems: list[Problem] = []
    n_problems = 0
    rows: list[dict[str, Any]] = []
    count = 0
    for entry in parsed:
        if isinstance(entry, Problem) and on_invalid is not None:
            on_invalid(entry)
            continue
        if isinstance(entry, Problem):
            n_problems += 1
            if len(problems) < MAX_REPORTED_PROBLEMS:
                problems.append(entry)
            continue
        if n_problems:
            continue  # keep validating to report everything, but stop writing
        digest.update(json.dumps([entry.custom_id, entry.input], sort_keys=True).encode() + b"\n")
        rows.append({"job_id": job_id, "custom_id": entry.custom_id, "index": count,
                     "input": entry.input, "status": ItemStatus.pending, "attempts": 0,
                     "updated_at": utcnow()})
        count += 1
        if len(rows) >= INSERT_BATCH:
            if session is not None:
                _insert_items(session, rows)
            rows = []
    if n_problems:
        raise InputError(problems, n_problems)
    if count == 0 and not rows:
        raise InputError([Problem(0, "-", "the input has no items", "empty_file")])
    if rows and session is not None:
        _insert_items(session, rows)
    if job is not None:
        job.input_sha256 = digest.hexdigest()
    return count


ITEM_COLUMNS = ("job_id", "custom_id", "index", "input", "status", "attempts", "updated_at")


def _insert_items(session: Session, rows: list[dict[str, Any]]) -> None:
    """Bulk insert in the session's transaction: COPY on PostgreSQL, executemany elsewhere."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        connection.execute(insert(Item), rows)
        return
    # COPY is several times faster than even batched INSERTs for large submissions.
    columns = ", ".join(f'"{name}"' for name in ITEM_COLUMNS)
    cursor = connection.connection.driver_connection.cursor()
    with cursor.copy(f"COPY items ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([json.dumps(row["input"]) if name == "input" else row[name]
                            for name in ITEM_COLUMNS])


def _job_by_key(engine: Engine, key: str) -> Job | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.exec(select(Job).where(Job.idempotency_key == key)).scalars().first()


def status(job_id: str, *, settings: Settings | None = None) -> Job:
    """The job's row as it is now (counts, status, timestamps)."""
    engine = ensure_schema((settings or get_settings()).database_url)
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    return job


def list_jobs(*, limit: int = 20, settings: Settings | None = None) -> list[Job]:
    """The newest jobs first."""
    engine = ensure_schema((settings or get_settings()).database_url)
    with Session(engine, expire_on_commit=False) as session:
        return list(session.exec(select(Job).order_by(Job.created_at.desc()).limit(limit)).scalars())


def active_jobs(*, settings: Settings | None = None) -> list[Job]:
    """Jobs not yet finished (queued, running, cancelling), oldest first."""
    engine = ensure_schema((settings or get_settings()).database_url)
    with Session(engine, expire_on_commit=False) as session:
        return list(session.exec(select(Job).where(Job.status.in_(UNFINISHED_JOB_STATUSES))
                                 .order_by(Job.created_at)).scalars())


# The view built by migration 0002 (docs/results-table.md); rates are over wall-clock time.
JOB_THROUGHPUT = table("job_throughput", *map(column, (
    "job_id", "wall_seconds", "busy_seconds", "chunks", "prompt_tokens", "output_tokens",
    "artifacts", "items_per_s", "tokens_per_s", "artifacts_per_s")))


def throughput(job_ids: Iterable[str], *, settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """{job id: its ``job_throughput`` row} for those of ``job_ids`` that exist."""
    engine = ensure_schema((settings or get_settings()).database_url)
    query = select(JOB_THROUGHPUT).where(JOB_THROUGHPUT.c.job_id.in_(list(job_ids)))
    with engine.connect() as connection:
        return {row.job_id: dict(row._mapping) for row in connection.execute(query)}


def wait(job_id: str, *, timeout: float | None = None, poll: float = 0.5,
         settings: Settings | None = None, on_progress: Any = None) -> Job:
    """Block until the job reaches a final state; ``on_progress(job)`` is called at each poll."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = status(job_id, settings=settings)
        if on_progress:
            on_progress(job)
        if JobStatus(job.status).is_terminal:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s "
                               f"({job.done + job.failed}/{job.total} items finished)")
        time.sleep(poll)


def results(job_id: str, *, errors_only: bool = False, with_input: bool = False,
            settings: Settings | None = None) -> Iterator[dict[str, Any]]:
    """The job's result rows as dicts, in submission order, streamed.

    ``with_input``: each row also carries ``job_id`` and its item's ``input`` (what OpenAI-format
    exports need to tell chat lines from completions). Raises LookupError at once for an unknown
    job (like :func:`status` and :func:`wait`).
    """
    status(job_id, settings=settings)
    return _results(job_id, errors_only, with_input, settings)


def _results(job_id: str, errors_only: bool, with_input: bool,
             settings: Settings | None) -> Iterator[dict[str, Any]]:
    engine = ensure_schema((settings or get_settings()).database_url)
    columns = [getattr(Result, name) for name in EXPORT_COLUMNS]
    if with_input:
        columns += [Result.job_id, Item.input]
    query = (select(*columns).join(Item, Item.id == Result.item_id)
             .where(Result.job_id == job_id).order_by(Item.index)
             .execution_options(yield_per=2_000))
    if errors_only:
        query = query.where(Result.error_code.is_not(None))
    with engine.connect() as connection:
        for row in connection.execute(query):
            yield dict(row._mapping)
