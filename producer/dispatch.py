"""Sending chunks of item ids to the workers' queues (the producer side of Celery)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from celery import Celery
from sqlalchemy import Engine, select

from aigc.schemas.dispatch import celery_config, chunk_message
from aigc.schemas.enums import ItemStatus
from aigc.schemas.settings import Settings, redact_url
from aigc.schemas.tables import Item


class DispatchError(RuntimeError):
    """The job is safe in SQL but its messages could not be sent; ``aigc resume`` sends them."""

    def __init__(self, message: str, job_id: str):
        super().__init__(message)
        self.job_id = job_id


_clients: dict[tuple[str, str], Celery] = {}


def _client(settings: Settings) -> Celery:
    """One Celery client per broker per process (its connection pool is reused)."""
    key = (settings.broker_url, str(settings.data_dir))
    if key not in _clients:
        app = Celery("aigc-producer", set_as_current=False)
        app.conf.update(celery_config(settings))
        _clients[key] = app
    return _clients[key]


def item_ids(engine: Engine, job_id: str, where: Any = None) -> Iterator[int]:
    """Ids of the job's items matching ``where`` (default: pending), in order, streamed."""
    query = (
        select(Item.id)
        .where(Item.job_id == job_id, Item.status == ItemStatus.pending if where is None else where)
        .order_by(Item.id)
        .execution_options(yield_per=10_000)
    )
    with engine.connect() as connection:
        yield from connection.execute(query).scalars()


def chunked(ids: Iterable[int], size: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    for item_id in ids:
        chunk.append(item_id)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def enqueue(settings: Settings, engine: Engine, job_id: str, kind: str, priority: int = 0,
            where: Any = None) -> int:
    """Send the job's items (pending ones, or those matching ``where``) as chunks of ids.

    Returns the number of items sent.
    """
    app = _client(settings)
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for chunk in chunked(item_ids(engine, job_id, where), settings.chunk_size):
                app.send_task(
                    **chunk_message(kind, job_id, chunk, priority),
                    producer=producer,
                    retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
                )
                sent += len(chunk)
    except Exception as exc:  # kombu raises OperationalError and socket errors alike
        raise DispatchError(
            f"job {job_id} is saved, but the broker {redact_url(settings.broker_url)} did not take "
            f"its messages ({exc}); run `aigc resume {job_id}` once the broker is back", job_id
        ) from exc
    return sent


def ping(settings: Settings, nodes: list[str], timeout: float = 2.0) -> dict[str, bool]:
    """{worker node name: whether it answered} over the broker; without ``nodes``, every node
    that answered. Raises kombu's ``OperationalError`` when the broker cannot be reached."""
    replies = _client(settings).control.ping(destination=nodes or None, timeout=timeout)
    answered = {name for reply in replies for name in reply}
    return {node: node in answered for node in nodes} if nodes else dict.fromkeys(sorted(answered), True)
