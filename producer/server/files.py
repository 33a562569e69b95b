"""OpenAI's Files API: uploads for batches, and batches' output and error files.

An upload is a row in ``files`` plus its bytes in the artifact store. A batch's output and
error files are rows too (made when the batch reaches a final state), but their content is
made from the ``results`` table each time it is read, streamed line by line exactly as
``aigc results --format openai [--errors]`` writes it; their size is counted once, on first need.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from aigc.schemas.tables import File, Job, utcnow

from .. import api
from ..export import openai_line
from .auth import caller
from .errors import APIError, not_found
from .uploads import DRAIN_BYTES, receive

router = APIRouter()
Caller = Annotated[str, Depends(caller)]
LINES_PER_CHUNK = 256  # output lines joined per chunk sent: fewer, larger writes


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def unix(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())


def file_object(row: File) -> dict[str, Any]:
    """A ``files`` row as OpenAI's file object."""
    return {"id": row.id, "object": "file", "bytes": row.bytes or 0, "created_at": unix(row.created_at),
            "filename": row.filename, "purpose": row.purpose, "status": "processed",
            "expires_at": None, "status_details": None}


def get_file(engine: Engine, owner: str, file_id: str) -> File:
    """The caller's live file ``file_id``; 404 for anyone else's, or a deleted one."""
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(File, file_id)
    if row is None or row.owner != owner or row.deleted_at is not None:
        raise not_found("file", file_id)
    return row


def output_lines(job_id: str, content: str, settings: Any) -> Iterator[bytes]:
    """A batch's output (``content="output"``) or error file, in chunks of JSONL bytes."""
    rows = api.results(job_id, errors_only=content == "error", with_input=True, settings=settings)
    lines: list[str] = []
    for row in rows:
        if (row["error_code"] is None) != (content == "output"):
            continue
        lines.append(json.dumps(openai_line(row), ensure_ascii=False))
        if len(lines) == LINES_PER_CHUNK:
            yield ("\n".join(lines) + "\n").encode("utf-8")
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode("utf-8")


def ensure_output_files(engine: Engine, job: Job) -> dict[str, str]:
    """{"output"|"error": file id} of a finished batch, making the rows the first time."""
    wanted = {"output": job.done > 0, "error": job.failed > 0}
    with engine.connect() as connection:
        have = dict(connection.execute(select(File.content, File.id).where(File.job_id == job.id)).all())
    for content, needed in wanted.items():
        if needed and content not in have:
            row = {"id": new_file_id(), "owner": job.owner, "purpose": "batch_output",
                   "filename": f"batch_{job.id.replace('-', '')}_{content}.jsonl", "job_id": job.id,
                   "content": content, "created_at": utcnow()}
            try:
                with engine.begin() as connection:
                    connection.execute(File.__table__.insert(), [row])
                have[content] = row["id"]
            except IntegrityError:  # another request made it first
                with engine.connect() as connection:
                    have[content] = connection.execute(select(File.id).where(
                        File.job_id == job.id, File.content == content)).scalar_one()
    return have


def _count_bytes(engine: Engine, row: File, settings: Any) -> File:
    if row.bytes is None and row.job_id:
        size = sum(len(chunk) for chunk in output_lines(row.job_id, row.content, settings))
        with engine.begin() as connection:
            connection.execute(update(File).where(File.id == row.id).values(bytes=size))
        row.bytes = size
    return row


@router.post("/v1/files")
async def upload_file(request: Request, owner: Caller) -> dict[str, Any]:
    """Store one file (``purpose=batch``), streamed to the artifact store; 413 past the limit."""
    state = request.app.state
    limit = state.settings.api_max_upload_bytes
    declared = request.headers.get("content-length")
    # Far too large: answer at once (reading it all to be polite would cost more than it helps).
    if declared and declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        raise APIError(413, f"The file is larger than this server's limit of {limit} bytes "
                       "(AIGC_API_MAX_UPLOAD_BYTES).", param="file", code="file_too_large")
    file_id = new_file_id()
    upload = await receive(request.stream(), request.headers.get("content-type", ""), state.store,
                           file_id, limit)
    if upload.too_large:
        raise APIError(413, f"The file is larger than this server's limit of {limit} bytes "
                       "(AIGC_API_MAX_UPLOAD_BYTES).", param="file", code="file_too_large")
    purpose = upload.fields.get("purpose")
    if upload.filename is None or purpose != "batch":
        state.store.discard(file_id)
        if upload.filename is None:
            raise APIError(400, "Missing the 'file' part of the upload.", param="file")
        raise APIError(400, f"Invalid purpose {purpose!r}: this server takes files for batches "
                       "(purpose 'batch').", param="purpose")
    row = File(id=file_id, owner=owner, purpose=purpose, filename=upload.filename,
               bytes=upload.bytes, uri=state.store.uri(file_id), created_at=utcnow())
    try:
        with state.engine.begin() as connection:
            connection.execute(File.__table__.insert(), [row.model_dump()])
    except BaseException:
        state.store.discard(file_id)
        raise
    return file_object(row)



@router.get("/v1/files")
def list_files(request: Request, owner: Caller, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
               purpose: str | None = None) -> dict[str, Any]:
    """The caller's files, newest first (``order=asc``: oldest first), ``after`` a file id."""
    state = request.app.state
    query = select(File).where(File.owner == owner, File.deleted_at.is_(None))
    if purpose:
        query = query.where(File.purpose == purpose)
    newest_first = order == "desc"
    if after:
        mark = get_file(state.engine, owner, after)
        before, same = (File.created_at < mark.created_at) if newest_first else (File.created_at > mark.created_at), \
            File.created_at == mark.created_at
        query = query.where(or_(before, and_(same, File.id < mark.id if newest_first else File.id > mark.id)))
    keys = (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at, File.id)
    with Session(state.engine, expire_on_commit=False) as session:
        rows = list(session.exec(query.order_by(*keys).limit(limit + 1)).scalars())
    page = [file_object(_count_bytes(state.engine, row, state.settings)) for row in rows[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(rows) > limit}


@router.get("/v1/files/{file_id}")
def retrieve_file(request: Request, file_id: str, owner: Caller) -> dict[str, Any]:
    state = request.app.state
    return file_object(_count_bytes(state.engine, get_file(state.engine, owner, file_id), state.settings))


@router.get("/v1/files/{file_id}/content")
def file_content(request: Request, file_id: str, owner: Caller) -> StreamingResponse:
    """The file's bytes: an upload as stored, or a batch's output or error file made from
    ``results`` as it streams."""
    state = request.app.state
    row = get_file(state.engine, owner, file_id)
    if row.job_id:
        chunks = output_lines(row.job_id, row.content, state.settings)
    else:
        chunks = state.store.chunks(row.uri)
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Disposition": f'attachment; filename="{row.id}.jsonl"'})


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, file_id: str, owner: Caller) -> dict[str, Any]:
    """Delete the file: an upload's bytes are removed; batches made from it keep their items."""
    state = request.app.state
    row = get_file(state.engine, owner, file_id)
    with state.engine.begin() as connection:
        connection.execute(update(File).where(File.id == row.id).values(deleted_at=utcnow()))
    if row.uri:
        state.store.discard(row.id)
    return {"id": row.id, "object": "file", "deleted": True}
