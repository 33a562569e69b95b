"""OpenAI's Batches API over aigc jobs: a batch is a job, with its file and endpoint kept on it.

Creating a batch validates every line of its input file (``schemas`` readers, the same as
``aigc submit``) and stores the job and its items in one transaction before anything is
enqueued, so it comes back ``in_progress``; a file with invalid lines makes a ``failed``
batch whose ``errors.data`` name each line, field, code and message, and stores no items.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, and_, func, or_, select
from sqlmodel import Session

from aigc.schemas.enums import JobStatus, Kind
from aigc.schemas.formats import read_openai_batch
from aigc.schemas.openai_images import IMAGES_URL, read_openai_images
from aigc.schemas.parsing import InputError
from aigc.schemas.tables import Job, Result, utcnow

from .. import api, control
from ..dispatch import DispatchError
from .auth import caller
from .errors import APIError, not_found
from .expiry import expire_if_overdue
from .files import ensure_output_files, get_file, unix

log = logging.getLogger("aigc.api")
router = APIRouter()
Caller = Annotated[str, Depends(caller)]

ENDPOINTS = {"/v1/chat/completions": Kind.article, "/v1/completions": Kind.article,
             IMAGES_URL: Kind.image_set}
# OpenAI takes "24h" only; aigc also takes other windows, from 1 s to 30 days ("90m", "7d").
WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
WINDOW_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = timedelta(days=30)
# Problem codes (schemas.parsing) as the error codes of a batch's errors.data.
ERROR_CODES = {"invalid_json": "invalid_json_line", "invalid_utf8": "invalid_json_line",
               "line_too_long": "line_too_long", "duplicate_custom_id": "duplicate_custom_id",
               "mismatched_endpoint": "mismatched_endpoint", "empty_file": "empty_file",
               "missing": "missing_required_parameter", "extra_forbidden": "unsupported_parameter",
               "unsupported": "unsupported_parameter"}


class BatchCreate(BaseModel):
    """The body of ``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = \
        Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = None  # accepted; aigc keeps output files


def batch_id(job_id: str) -> str:
    return "batch_" + job_id.replace("-", "")


def job_id_of(batch: str) -> str | None:
    digits = batch.removeprefix("batch_")
    if batch == digits or not re.fullmatch(r"[0-9a-f]{32}", digits):
        return None
    return str(uuid.UUID(digits))


def window_seconds(window: str) -> int:
    match = WINDOW.match(window)
    seconds = int(match.group(1)) * WINDOW_SECONDS[match.group(2)] if match else 0
    if not match or seconds > MAX_WINDOW.total_seconds():
        raise APIError(400, f"Invalid completion_window {window!r}: use '24h' (or a duration "
                       "such as '90m', '6h', '7d' up to 30 days).", param="completion_window")
    return seconds


def status_of(job: Job) -> str:
    """The OpenAI status of a job that is a batch."""
    status = JobStatus(job.status)
    if job.errors is not None:
        return "failed"
    if status.is_active:
        return "finalizing" if job.total and job.done + job.failed >= job.total else "in_progress"
    if status == JobStatus.cancelling:
        return "finalizing" if job.expired_at else "cancelling"  # in-flight items still land
    if status == JobStatus.cancelled:
        return "expired" if job.expired_at else "cancelled"
    return "completed"  # completed, completed_with_errors, and failed items (see the error file)


def batch_object(job: Job, files: dict[str, str], usage: tuple[int, int] | None) -> dict[str, Any]:
    """A job as OpenAI's batch object."""
    status = status_of(job)
    final = status in ("completed", "failed", "cancelled", "expired")
    prompt_tokens, output_tokens = usage or (0, 0)
    errors = None
    if job.errors is not None:
        errors = {"object": "list", "data": job.errors}
    return {
        "id": batch_id(job.id), "object": "batch", "endpoint": job.endpoint,
        "model": job.model, "errors": errors, "input_file_id": job.input_file_id,
        "completion_window": job.completion_window, "status": status,
        "output_file_id": files.get("output") if final else None,
        "error_file_id": files.get("error") if final else None,
        "created_at": unix(job.created_at),
        "in_progress_at": unix(job.created_at) if job.errors is None else None,
        "expires_at": unix(job.expires_at),
        "finalizing_at": unix(job.finished_at) if final and status != "failed" else None,
        "completed_at": unix(job.finished_at) if status == "completed" else None,
        "failed_at": unix(job.finished_at) if status == "failed" else None,
        "expired_at": unix(job.expired_at) if status == "expired" else None,
        "cancelling_at": unix(job.cancel_requested_at) if not job.expired_at else None,
        "cancelled_at": unix(job.finished_at) if status == "cancelled" else None,
        "request_counts": {"total": job.total, "completed": job.done, "failed": job.failed},
        "metadata": job.meta or None,
        "usage": {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": prompt_tokens + output_tokens},
    }


def _usage(engine: Engine, job_ids: list[str]) -> dict[str, tuple[int, int]]:
    query = (select(Result.job_id, func.coalesce(func.sum(Result.prompt_tokens), 0),
                    func.coalesce(func.sum(Result.output_tokens), 0))
             .where(Result.job_id.in_(job_ids)).group_by(Result.job_id))
    with engine.connect() as connection:
        return {job_id: (int(p), int(o)) for job_id, p, o in connection.execute(query)}


def _render(request: Request, jobs: list[Job]) -> list[dict[str, Any]]:
    state = request.app.state
    jobs = [expire_if_overdue(state.engine, job) for job in jobs]
    usage = _usage(state.engine, [job.id for job in jobs])
    rendered = []
    for job in jobs:
        final = status_of(job) in ("completed", "cancelled", "expired")
        files = ensure_output_files(state.engine, job) if final else {}
        rendered.append(batch_object(job, files, usage.get(job.id)))
    return rendered


def get_job(engine: Engine, owner: str, batch: str) -> Job:
    """The caller's batch ``batch`` as its job; 404 for anyone else's, or a plain job."""
    job_id = job_id_of(batch)
    job = None
    if job_id:
        with Session(engine, expire_on_commit=False) as session:
            job = session.get(Job, job_id)
    if job is None or job.owner != owner or job.input_file_id is None:
        raise not_found("batch", batch)
    return job


@router.post("/v1/batches")
def create_batch(request: Request, spec: BatchCreate, owner: Caller,
                 idempotency_key: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """Validate the input file's lines, store them as one job and enqueue it."""
    state = request.app.state
    kind = ENDPOINTS.get(spec.endpoint)
    if kind is None:
        raise APIError(400, f"Invalid endpoint {spec.endpoint!r}: one of {', '.join(ENDPOINTS)}.",
                       param="endpoint")
    window = window_seconds(spec.completion_window)
    source = get_file(state.engine, owner, spec.input_file_id)
    if source.purpose != "batch" or not source.uri:
        raise APIError(400, f"File {source.id} has purpose {source.purpose!r}; a batch's input "
                       "file must be uploaded with purpose 'batch'.", param="input_file_id")
    now = utcnow()
    fields = {"owner": owner, "input_file_id": source.id, "endpoint": spec.endpoint,
              "completion_window": spec.completion_window, "expires_at": now + timedelta(seconds=window)}
    key = None
    if idempotency_key:  # the same key from the same owner returns the batch it made
        key = "api:" + hashlib.sha256(f"{owner}\0{idempotency_key}".encode()).hexdigest()[:40]
    reader = read_openai_images if kind is Kind.image_set else read_openai_batch
    try:
        with state.store.open(source.uri) as stream:
            job_id = api.submit_records(kind, reader(stream, kind, endpoint=spec.endpoint),
                                        metadata=spec.metadata, idempotency_key=key,
                                        job_fields=fields, settings=state.settings)
    except api.IdempotencyConflictError as exc:  # the key made another batch (not a retry)
        raise APIError(400, str(exc), code="idempotency_key_reused") from None
    except InputError as exc:
        job_id = _failed_batch(state, kind, exc, fields, spec.metadata)
    except DispatchError as exc:  # stored: the sweeper (or `aigc resume`) sends it later
        log.warning("%s", exc)
        job_id = exc.job_id
    return _render(request, [get_job(state.engine, owner, batch_id(job_id))])[0]


def _failed_batch(state: Any, kind: Kind, exc: InputError, fields: dict[str, Any],
                  metadata: dict[str, str] | None) -> str:
    """Store a batch whose input was refused: a failed job with no items and its errors."""
    errors = [{"code": ERROR_CODES.get(p.code or "", "invalid_value"), "line": p.line or None,
               "param": None if p.field == "-" else p.field, "message": p.message}
              for p in exc.problems]
    if exc.total > len(exc.problems):
        errors.append({"code": "too_many_errors", "line": None, "param": None,
                       "message": f"{exc.total - len(exc.problems)} more problem(s) not listed"})
    now = utcnow()
    job = Job(id=str(uuid.uuid4()), kind=kind, model=state.settings.default_model(kind),
              status=JobStatus.failed, meta=metadata or {}, errors=errors, finished_at=now,
              created_at=now, updated_at=now, **fields)
    with Session(state.engine, expire_on_commit=False) as session, session.begin():
        session.add(job)
    return job.id


@router.get("/v1/batches/{batch}")
def retrieve_batch(request: Request, batch: str, owner: Caller) -> dict[str, Any]:
    return _render(request, [get_job(request.app.state.engine, owner, batch)])[0]


@router.post("/v1/batches/{batch}/cancel")
def cancel_batch(request: Request, batch: str, owner: Caller) -> dict[str, Any]:
    """Cancel: items not started never run; finished results stay (the output file has them)."""
    state = request.app.state
    job = get_job(state.engine, owner, batch)
    status = status_of(job)
    if status in ("completed", "failed", "expired"):
        raise APIError(400, f"Cannot cancel a batch with status {status!r}.", code="invalid_state")
    control.cancel(job.id, settings=state.settings)
    return _render(request, [get_job(state.engine, owner, batch)])[0]


@router.get("/v1/batches")
def list_batches(request: Request, owner: Caller, after: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    """The caller's batches, newest first; ``after`` is the last batch id of the previous page."""
    state = request.app.state
    query = select(Job).where(Job.owner == owner, Job.input_file_id.is_not(None))
    if after:
        mark = get_job(state.engine, owner, after)
        query = query.where(or_(Job.created_at < mark.created_at,
                                and_(Job.created_at == mark.created_at, Job.id < mark.id)))
    with Session(state.engine, expire_on_commit=False) as session:
        jobs = list(session.exec(query.order_by(Job.created_at.desc(), Job.id.desc())
                                 .limit(limit + 1)).scalars())
    page = _render(request, jobs[:limit])
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(jobs) > limit}

