"""The workers' retry policy, in one place: what is retried, how often, how far apart.

Three layers, from the inside out (docs/reliability.md says what they promise):

1. **One SQL call.** A database that cannot be reached is waited out: the call is repeated
   after 0.25 s, doubling to 5 s, for up to ``AIGC_DB_OUTAGE_SECONDS`` from its start
   (tenacity); then :class:`DatabaseUnavailable`. Every call of ``aigc.workers.store`` is safe to
   repeat. A mistake (a missing table, bad SQL) is raised at once.
2. **One chunk** (a Celery task). A :class:`TransientError` (the database still away, out of
   memory on a single row, the artifact store down) hands the chunk's unfinished items back
   and Celery sends the chunk again after 5, 10, 20, 40 s (``autoretry_for``,
   ``retry_backoff``). On the last try a generator's transient failure is recorded as its
   items' errors instead, so the job can finish; a database still away leaves them leased
   for the sweeper.
3. **One item.** Each claim counts an attempt. An item claimed more than
   ``AIGC_MAX_ATTEMPTS`` times is recorded as ``too_many_attempts``, never run again. A chunk
   holding an item claimed before (its worker died mid-chunk) runs one item at a time, so
   only the item running when a worker dies is charged, and a poison item reaches the cap
   alone.

The runner and the tasks are handed a :class:`RetryPolicy`; nothing here is a module global
that someone sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import tenacity
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from aigc.schemas.settings import Settings

from .errors import DatabaseUnavailable, TransientError

log = logging.getLogger("aigc.worker")
P = ParamSpec("P")
R = TypeVar("R")


class Attempted(Protocol):
    """An item as claimed: how many times it has been."""

    attempts: int


def is_outage(exc: BaseException) -> bool:
    """Whether a database error means "not reachable right now" rather than "wrong"."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    if "sqlite" in type(exc.orig).__module__:  # only a busy file is worth waiting for
        return any(word in str(exc.orig).lower() for word in ("locked", "busy"))
    return True


@dataclass(frozen=True)
class RetryPolicy:
    """How the workers retry; :meth:`from_settings` fills in what the operator sets."""

    max_attempts: int = 5  # claims of one item before it is recorded as too_many_attempts
    outage_seconds: float = 120.0  # how long one SQL call waits out an unreachable database
    outage_first_wait: float = 0.25  # its first pause, doubling...
    outage_max_wait: float = 5.0  # ...up to this
    chunk_retries: int = 4  # Celery retries of a chunk after a TransientError
    chunk_backoff: int = 5  # seconds before the first of them, doubling: 5, 10, 20, 40
    chunk_backoff_max: int = 600  # Celery's cap on one of those waits
    # Celery's jitter is "full" (a wait anywhere from 0 to the backoff): it could spend all
    # four retries of an out-of-memory chunk within seconds and record errors long before
    # the 75 s promised. Chunks of different workers are not synchronised anyway.
    chunk_jitter: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy with ``AIGC_MAX_ATTEMPTS`` and ``AIGC_DB_OUTAGE_SECONDS`` applied."""
        return cls(max_attempts=settings.max_attempts, outage_seconds=settings.db_outage_seconds)

    # -- one SQL call ------------------------------------------------------------------------

    def ride_out(self, function: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``function(*args, **kwargs)``, repeated with backoff while the database is
        unreachable, for up to :attr:`outage_seconds`; then :class:`DatabaseUnavailable`."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_outage),
            wait=tenacity.wait_exponential(multiplier=self.outage_first_wait, max=self.outage_max_wait),
            stop=tenacity.stop_after_delay(self.outage_seconds),
            before_sleep=_log_outage,
        )
        try:
            return retrying(function, *args, **kwargs)
        except tenacity.RetryError as error:
            exc = error.last_attempt.exception()
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
            raise DatabaseUnavailable(
                f"database unreachable for {self.outage_seconds:.0f} s in "
                f"{getattr(function, '__name__', function)}: {reason}") from exc

    # -- one chunk ---------------------------------------------------------------------------

    def task_options(self) -> dict[str, Any]:
        """Options for ``app.task``: Celery itself retries a chunk that raised a
        :class:`TransientError`, :attr:`chunk_backoff` s later, doubling, at most
        :attr:`chunk_retries` times (then the error is raised and the task fails)."""
        return {"autoretry_for": (TransientError,), "max_retries": self.chunk_retries,
                "retry_backoff": self.chunk_backoff, "retry_backoff_max": self.chunk_backoff_max,
                "retry_jitter": self.chunk_jitter}

    def chunk_waits(self) -> list[int]:
        """The seconds between a chunk's tries, as Celery computes them (without jitter)."""
        return [min(self.chunk_backoff_max, self.chunk_backoff * 2 ** n) for n in range(self.chunk_retries)]

    def is_last_try(self, retries: int) -> bool:
        """Whether a chunk already retried ``retries`` times gets no further retry: then a
        transient failure is recorded as its items' errors rather than raised."""
        return retries >= self.chunk_retries

    # -- one item ----------------------------------------------------------------------------

    def over_cap(self, item: Attempted) -> bool:
        """Whether this claim took the item past :attr:`max_attempts`: record, do not run."""
        return item.attempts > self.max_attempts

    def runs_singly(self, items: Sequence[Attempted]) -> bool:
        """Whether to run a chunk one item at a time: some item in it was claimed before, so
        an earlier run died mid-chunk, and one of these items may be what killed it."""
        return len(items) > 1 and any(item.attempts > 1 for item in items)


def _log_outage(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    name = getattr(state.fn, "__name__", state.fn)
    log.warning("database unreachable in %s (%s); retrying in %.1f s", name,
                type(getattr(exc, "orig", None) or exc).__name__,
                state.next_action.sleep if state.next_action else 0.0)
