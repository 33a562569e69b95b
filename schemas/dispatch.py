"""The queue contract between producer and workers: task name, queues, message shape, config.

A message is ``aigc.<kind>(job_id, item_ids, items=n)``: ids only, never payloads. The SQL rows are
the truth; a lost or repeated message costs nothing but a re-enqueue or a skipped item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .enums import Kind
from .settings import Settings

# Messages sent before task names were per kind; workers still run them.
LEGACY_TASK = "aigc.generate_chunk"
MAX_PRIORITY = 9  # job priority 0..9, higher runs sooner


def broker_priority(priority: int) -> int:
    """Kombu's Redis transport serves priority 0 first; our users say 9 for most urgent."""
    return MAX_PRIORITY - priority


def task_name(kind: Kind | str) -> str:
    """One fixed task name per kind (``aigc.article``): what Flower and Prometheus label
    tasks with, so their series do not grow with every job (the job id is an argument)."""
    return f"aigc.{Kind(kind).value}"


def queue_name(kind: Kind | str) -> str:
    """Each kind has its own queue, named like the kind."""
    return Kind(kind).value


def chunk_message(kind: Kind | str, job_id: str, item_ids: list[int], priority: int = 0) -> dict[str, Any]:
    """``send_task`` arguments for one chunk of a job: the message shape above, on its kind's
    queue at the job's priority (the producer's chunks, and items a worker hands back)."""
    return {"name": task_name(kind), "args": [job_id, item_ids],
            "kwargs": {"items": len(item_ids)},  # the chunk's size, readable in Flower
            "queue": queue_name(kind), "priority": broker_priority(priority)}


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the broker URL; ``filesystem:///DIR`` keeps its folders in DIR."""
    parts = urlsplit(settings.broker_url)
    if parts.scheme != "filesystem":
        # Redis: a message unacknowledged this long is redelivered; longer than any chunk takes.
        # One list per priority level (kombu's default merges them into 4 steps).
        visibility = settings.visibility_timeout or max(3600, 2 * settings.lease_seconds)
        # Messages of a worker that died come back after the visibility timeout; look for them
        # every 10 s rather than kombu's default of every 100 s (one ZRANGE each time), and at
        # least twice per timeout where it is shorter.
        return {"visibility_timeout": visibility, "unacked_restore_throttle": 1,
                "unacked_restore_interval": min(10, max(1, visibility // 2)),
                "priority_steps": list(range(MAX_PRIORITY + 1))}
    root = Path(parts.path or settings.data_dir / "broker")
    folders = {"data_folder_in": root / "queue", "data_folder_out": root / "queue",
               "control_folder": root / "control", "processed_folder": root / "processed"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {name: str(path) for name, path in folders.items()} | {"store_processed": False}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings both sides share: JSON only, late acks, one message in flight."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_send_sent_event": True,  # Flower sees chunks while they wait in the queue
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": queue_name(Kind.article),
        "worker_hijack_root_logger": False,
    }
