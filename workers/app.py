"""The Celery app of the workers (``celery -A workers.app`` finds it here).

Configuration comes from ``schemas.dispatch.celery_config`` so that the producer and the
workers can never disagree on serializer, acks or queues.
"""

from __future__ import annotations

from celery import Celery

from schemas.dispatch import celery_config
from schemas.settings import get_settings


def create_app() -> Celery:
    app = Celery("aigc", include=["workers.tasks"])
    app.conf.update(celery_config(get_settings()))
    app.conf.update(
        worker_send_task_events=True,  # Flower sees tasks without `-E`
        task_track_started=True,
    )
    return app


app = create_app()
