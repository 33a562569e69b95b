"""The producer: the Python API and the ``aigc`` command line. Imports only ``schemas``."""

from .api import IdempotencyConflictError, list_jobs, results, status, submit, submit_file, wait
from .control import cancel, resume
from .dispatch import DispatchError

__all__ = ["DispatchError", "IdempotencyConflictError", "cancel", "list_jobs", "results", "resume", "status", "submit",
           "submit_file", "wait"]
