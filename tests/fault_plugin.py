"""A worker plugin for the fault-injection tests, loaded with ``AIGC_PLUGINS=fault_plugin``.

It wraps the text backend of a real worker process:
- ``AIGC_FAULT_CRASH_TOPIC=T``: the process SIGKILLs itself whenever it is handed an item whose
  topic is T, before generating anything (what a segfault or the kernel's OOM killer does);
- ``AIGC_FAULT_SECONDS_PER_BATCH=S``: each batch takes S seconds longer (a long-running task).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

from aigc.workers import text
from aigc.workers.contract import ClaimedItem, JobInfo, ResultRow

_run = text.TextBackend.run
CRASH_TOPIC = os.environ.get("AIGC_FAULT_CRASH_TOPIC")
SECONDS_PER_BATCH = float(os.environ.get("AIGC_FAULT_SECONDS_PER_BATCH", "0"))


def run(self: text.TextBackend, job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]:
    if CRASH_TOPIC and any(item.input.get("topic") == CRASH_TOPIC for item in items):
        os.kill(os.getpid(), signal.SIGKILL)
    for rows in _run(self, job, items):
        time.sleep(SECONDS_PER_BATCH)
        yield rows


text.TextBackend.run = run
