"""A worker plugin for the fault-injection tests, loaded with ``AIGC_PLUGINS=fault_plugin``.

It wraps the text backend of a real worker process (``run_jobs``, which ``run`` goes through):
- ``AIGC_FAULT_CRASH_TOPIC=T``: the process SIGKILLs itself whenever it is handed an item whose
  topic is T (its chunk's, or joining one), before generating it (what a segfault or the
  kernel's OOM killer does);
- ``AIGC_FAULT_SECONDS_PER_BATCH=S``: each batch takes S seconds longer (a long-running task):
  rows are handed on as they finish, so S per ``AIGC_MAX_BATCH_ROWS`` rows handed on.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence

from aigc.workers import text
from aigc.workers.contract import ClaimedItem, JobInfo, ResultRow

_run_jobs = text.TextBackend.run_jobs
CRASH_TOPIC = os.environ.get("AIGC_FAULT_CRASH_TOPIC")
SECONDS_PER_BATCH = float(os.environ.get("AIGC_FAULT_SECONDS_PER_BATCH", "0"))


def run_jobs(self: text.TextBackend, parts: Sequence[tuple[JobInfo, list[ClaimedItem]]],
             more: Callable | None = None) -> Iterator[list[ResultRow]]:
    def crash_on(parts: Sequence[tuple[JobInfo, list[ClaimedItem]]]) -> Sequence[tuple[JobInfo, list[ClaimedItem]]]:
        if CRASH_TOPIC and any(item.input.get("topic") == CRASH_TOPIC for _, items in parts for item in items):
            os.kill(os.getpid(), signal.SIGKILL)
        return parts

    joined = None if more is None else (lambda room: crash_on(more(room)))
    for rows in _run_jobs(self, crash_on(parts), joined):
        time.sleep(SECONDS_PER_BATCH * math.ceil(len(rows) / self.settings.max_batch_rows))
        yield rows


text.TextBackend.run_jobs = run_jobs
