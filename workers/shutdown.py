"""A worker's shutdown as its generation loops see it.

SIGTERM starts Celery's warm shutdown, which waits for the running task; ``app`` then calls
:meth:`Shutdown.begin`. From that moment no new row starts (no item of the chunk, nothing
joined), the rows already generating may finish for ``AIGC_SHUTDOWN_GRACE_SECONDS``, and what
is still generating then is abandoned. The runner hands every unfinished item back: pending
again, its claim not charged as an attempt, and sent as a chunk of its own, so another worker
(or this one, restarted) takes it at once rather than after its lease runs out. A cold shutdown
(SIGQUIT, or Ctrl-C twice) ends the grace at once.
"""

from __future__ import annotations

import threading
import time


class Shutdown:
    """Whether shutdown has begun, and whether its grace for the rows in flight is over."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # begun from signal handlers, which may nest
        self._began: float | None = None
        self._grace = 0.0

    def begin(self, grace_seconds: float) -> None:
        """Begin (or, if begun already, shorten the grace to ``grace_seconds`` from now)."""
        with self._lock:
            now = time.monotonic()
            if self._began is None:
                self._began, self._grace = now, grace_seconds
            else:
                self._grace = min(self._grace, now - self._began + grace_seconds)

    @property
    def requested(self) -> bool:
        """No new row may start."""
        return self._began is not None

    @property
    def overdue(self) -> bool:
        """The rows still generating are to be abandoned."""
        began = self._began
        return began is not None and time.monotonic() - began >= self._grace


SHUTDOWN = Shutdown()  # this worker process's
