"""Terminal display: live progress bars while jobs run, and tables of jobs and results."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from schemas.tables import Job


class JobProgress:
    """A rich progress bar per job, showing items/s and the ETA; use as a context manager."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} items/s"), TextColumn("[dim]{task.fields[state]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "JobProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, job: Job) -> None:
        if job.id not in self.tasks:
            self.tasks[job.id] = self.progress.add_task(f"{job.kind} {job.id[:8]}",
                                                        total=job.total, rate="-", state=job.status)
        task_id = self.tasks[job.id]
        self.progress.update(task_id, completed=job.done + job.failed, state=job.status)
        speed = self.progress.tasks[task_id].speed
        self.progress.update(task_id, rate=f"{speed:.1f}" if speed else "-")


def _stamp(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def jobs_table(jobs: Iterable[Job]) -> Table:
    """One line per job, newest first; ``aigc status JOB`` shows every field of one."""
    table = Table("job", "kind", "status", "done", "failed", "total", "created", title="jobs")
    table.columns[0].no_wrap = True
    for job in jobs:
        table.add_row(job.id, job.kind, job.status, str(job.done), str(job.failed),
                      str(job.total), _stamp(job.created_at))
    return table


def job_details(job: Job) -> Table:
    """Every field of one job, one per line."""
    table = Table.grid(padding=(0, 2))
    fields = [("job", job.id), ("kind", job.kind), ("model", job.model), ("status", job.status),
              ("items", f"{job.done} done, {job.failed} failed, {job.total} total"),
              ("params", json.dumps(job.params)), ("priority", str(job.priority)),
              ("created", _stamp(job.created_at)), ("started", _stamp(job.started_at)),
              ("finished", _stamp(job.finished_at)),
              ("cancel requested", _stamp(job.cancel_requested_at))]
    for name, value in fields:
        table.add_row(f"[bold]{name}", value)
    return table


def results_table(rows: Iterable[dict[str, Any]], *, title: str, width: int = 70) -> Table:
    table = Table("custom_id", "output", "tokens", "worker", title=title, show_lines=True)
    for row in rows:
        text = " ".join((row["output_text"] or "").split())  # one paragraph for the terminal
        text = text if len(text) <= width * 3 else text[: width * 3] + "…"
        tokens = f"{row['prompt_tokens'] or 0}+{row['output_tokens'] or 0}"
        if row.get("artifact_uris"):  # image kinds: the files written
            text, tokens = "\n".join(row["artifact_uris"]), "-"
        if row["error_code"]:
            text = f"[red]{row['error_code']}: {row['error_message']}"
        table.add_row(row["custom_id"], text, tokens, f"{row['worker']} ({row['device']})")
    return table
