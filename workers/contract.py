"""The backend contract: what a generator backend is given, and what it gives back.

A backend (built in, or a plugin module named in ``AIGC_PLUGINS``) is a class registered for
one or more kinds with :func:`aigc.workers.registry.register`; everything it may read or must
return is defined here::

    from collections.abc import Iterator

    from aigc.schemas.enums import Kind
    from aigc.schemas.settings import Settings
    from aigc.workers.contract import ClaimedItem, JobInfo, ResultRow, result_row
    from aigc.workers.registry import register

    @register(Kind.article)  # a kind has one backend; registering it twice is an error
    class Shouting:
        def __init__(self, model: str, settings: Settings) -> None:
            self.memory_bytes = 0  # what the loaded model occupies (the warm cache's budget)

        def run(self, job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]:
            yield [result_row(job, item, output_text=item.input["prompt"].upper())
                   for item in items]

``run`` yields one list of rows per batch, as soon as they are final: the runner commits a
batch while the next one generates, and may close the generator between batches (the job was
cancelled, or the worker is stopping: the items without a row go back to the queue). A backend
that winds down by itself when the worker stops (``winds_down_on_shutdown = True``, as the
text backend: it starts no row and lets the rows in flight finish within the grace, see
:mod:`aigc.workers.shutdown`) is closed only when the grace is over. Each item gets exactly
one row; a failed item is a row with ``error_code`` set, not an exception. Raise
:class:`aigc.workers.errors.TransientError` when the world failed (out of memory, storage
away): the items without a row yet are retried later. Raise
:class:`aigc.workers.errors.PermanentError` when they can never succeed: they are recorded with
its code. An item that gets no row at all stays leased until its lease expires and is run again.

A backend may also define ``run_jobs(parts, more=None)`` (the text backend does): the items of
several jobs (``parts``, a list of ``(job, items)``) in shared batches, and ``more(rows free)``,
which returns more ``(job, items)`` that arrived since. The runner then lets waiting items of
other chunks and jobs on the same model join a running chunk (``AIGC_JOIN_JOBS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aigc.schemas.results import ResultRow
from aigc.schemas.settings import Settings

__all__ = ["ClaimedItem", "Generator", "JobInfo", "ResultRow", "as_result_rows", "result_row"]


@dataclass(frozen=True)
class JobInfo:
    """The job a chunk belongs to, as stored in ``jobs``."""

    id: str  # uuid text
    kind: str  # a ``aigc.schemas.enums.Kind`` value: ``article``, ``ad_copy``, ``image_set``
    model: str  # the model name every item of the job runs on, as submitted
    params: dict[str, Any]  # the job's parameters as given (``aigc.schemas.specs.JobParams``)
    status: str  # ``running`` while its items are generated
    priority: int = 0  # higher runs first; what the worker sends again goes at the same priority


@dataclass(frozen=True)
class ClaimedItem:
    """One item this worker holds a lease on, as stored in ``items``."""

    id: int  # items.id: the row's ``item_id``
    custom_id: str  # the submitter's id for it
    index: int  # 0-based submission order within the job
    input: dict[str, Any]  # the validated item spec of its kind (``aigc.schemas.specs``)
    attempts: int = 1  # times it has been claimed, this claim included


class Generator(Protocol):
    """A backend: built once per process for one model, then run on chunk after chunk."""

    memory_bytes: int  # what the loaded weights occupy; the warm-model cache counts it

    def __init__(self, model: str, settings: Settings) -> None: ...

    def run(self, job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]:
        """Yield the rows of ``items``, one list per batch, each item exactly once."""
        ...


def result_row(job: JobInfo, item: ClaimedItem, **fields: Any) -> ResultRow:
    """The row of ``item``: its ids, the job's kind and model, and ``fields`` (any column of
    :class:`ResultRow`; a misspelt one is an error)."""
    return ResultRow(job_id=job.id, item_id=item.id, custom_id=item.custom_id, kind=job.kind,
                     model=job.model, **fields)


def as_result_rows(rows: Iterable[ResultRow | Mapping[str, Any]]) -> list[ResultRow]:
    """What a backend yielded, as rows; a dict (backends written before :class:`ResultRow`)
    is validated into one, so a misspelt or mistyped column fails here, naming the field."""
    return [row if isinstance(row, ResultRow) else ResultRow.model_validate(row) for row in rows]
