"""Adaptive batch size: run a batch; on out-of-memory halve it, retry, and remember the cap.

Both GPU backends use it (``workers/lm.py`` for rows of text, whose continuous batches call
:meth:`AdaptiveBatch.shrink` themselves, ``workers/images.py`` for images), so a device that cannot hold ``AIGC_MAX_BATCH_ROWS`` / ``AIGC_MAX_BATCH_IMAGES``
settles on the largest size that fit, once, and later batches start there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from .errors import TransientError

log = logging.getLogger("aigc.worker")
R = TypeVar("R")


class AdaptiveBatch:
    """The batch size a device has shown it can hold: unknown (``cap`` None) until a batch
    runs out of memory, then the half that was retried, and lower if that failed too."""

    def __init__(self, device: torch.device, unit: str) -> None:
        self.device = device
        self.unit = unit  # what a batch is made of, for messages: "row", "image"
        self.cap: int | None = None

    def limit(self, wanted: int) -> int:
        """``wanted``, or less where a batch of that size has run out of memory before."""
        return min(wanted, self.cap or wanted)

    def run(self, size: int, forward: Callable[[slice], R]) -> Iterator[R]:
        """``forward(slice(0, size))``; if that runs out of memory, the halves of the slice in
        order (recursively), each result yielded as it is computed. A single one that does not
        fit raises :class:`TransientError`: another attempt (later, or on a larger device) may
        succeed."""
        yield from self._run(0, size, forward)

    def _run(self, start: int, stop: int, forward: Callable[[slice], R]) -> Iterator[R]:
        try:
            result = forward(slice(start, stop))
        except torch.OutOfMemoryError:
            # Only the cache is freed in here; the retry runs once the exception (and the
            # tensors its frames hold) is gone.
            half = self.shrink(stop - start)
        else:
            yield result
            return
        yield from self._run(start, start + half, forward)
        yield from self._run(start + half, stop, forward)

    def shrink(self, size: int) -> int:
        """``size`` ran out of memory: the cap becomes its half, returned. A single one that
        does not fit raises :class:`TransientError`."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if size <= 1:
            raise TransientError(f"out of memory generating a single {self.unit}",
                                 code="out_of_memory") from None
        self.cap = (size + 1) // 2
        log.warning("out of memory at %d %ss; retrying as batches of at most %d",
                    size, self.unit, self.cap)
        return self.cap
