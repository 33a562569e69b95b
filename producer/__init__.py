"""aigc: submit bulk generation jobs, follow them, read their results.

    from aigc import submit, wait, results

    job_id = submit("article", [{"topic": "tide pools", "length": "short"}])
    wait(job_id)
    for row in results(job_id):
        print(row["custom_id"], row["output_text"])

This package is the producer side (the Python API here, the ``aigc`` command line in
``aigc.cli``, the HTTP API in ``aigc.server``); ``aigc.schemas`` is the contract both sides share
and ``aigc.workers`` the worker processes. The names below load on first use, so a worker,
which imports ``aigc.workers`` and ``aigc.schemas`` only, never loads the producer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import IdempotencyConflictError, list_jobs, results, status, submit, submit_file, wait
    from .control import cancel, resume
    from .dispatch import DispatchError

_PUBLIC = {
    "submit": "api", "submit_file": "api", "wait": "api", "status": "api", "results": "api",
    "list_jobs": "api", "IdempotencyConflictError": "api",
    "cancel": "control", "resume": "control", "DispatchError": "dispatch",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'aigc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
