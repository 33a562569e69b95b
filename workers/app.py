"""The Celery app of the workers (``celery -A aigc.workers.app`` finds it here).

Configuration comes from ``aigc.schemas.dispatch.celery_config`` so that the producer and the
workers can never disagree on serializer, acks or queues.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down
from celery.worker.control import inspect_command

from aigc.schemas.dispatch import celery_config
from aigc.schemas.enums import Kind
from aigc.schemas.settings import get_settings

STARTED = int(time.time())


def create_app() -> Celery:
    app = Celery("aigc", include=["aigc.workers.tasks"])
    app.conf.update(celery_config(get_settings()))
    app.conf.update(
        worker_send_task_events=True,  # Flower sees tasks without `-E`
        task_track_started=True,
    )
    return app


app = create_app()


@worker_shutting_down.connect
def _stop_generating(how: str = "Warm", **_: Any) -> None:
    """Celery's warm shutdown waits for the running chunk: make that short (workers/shutdown.py)."""
    from .shutdown import SHUTDOWN

    SHUTDOWN.begin(get_settings().shutdown_grace_seconds if how == "Warm" else 0.0)


@inspect_command()
def aigc_models(state: Any) -> dict[str, Any]:
    """What this worker serves (``GET /v1/models`` of ``aigc serve`` asks every worker):
    the default model of each kind whose queue it consumes, and any other model it holds warm."""
    from .registry import warm_models

    settings = get_settings()
    queues = {queue.name for queue in state.consumer.task_consumer.queues}
    models: dict[str, list[str]] = {}
    for kind in Kind:
        if kind.value in queues:
            models.setdefault(settings.default_model(kind), []).append(kind.value)
    for _backend, model, _bytes in warm_models():
        models.setdefault(model, [])
    return {"started": STARTED, "models": models}
