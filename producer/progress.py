"""Terminal display: live progress bars while jobs run, and tables of jobs and results."""

from __future__ import annotations

import json
import time
from datetime import timezone
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from aigc.schemas.enums import JobStatus
from aigc.schemas.settings import Settings
from aigc.schemas.tables import Job, utcnow


class JobProgress:
    """A rich progress bar per job: items done and failed of total, items/s, tokens/s, ETA.

    Rates come from the ``job_throughput`` view when given (averages since the job started);
    otherwise items/s is rich's own estimate from successive updates. Use as a context manager.
    """

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[rate]} items/s"),
            TextColumn("{task.fields[tokens]} tok/s"), TextColumn("[dim]{task.fields[state]}"),
            TextColumn("{task.fields[elapsed]}"), TextColumn("eta {task.fields[eta]}"), console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "JobProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, job: Job, rates: dict[str, Any] | None = None) -> None:
        if job.id not in self.tasks:
            self.tasks[job.id] = self.progress.add_task(
                f"{job.kind} {job.id[:8]}", total=job.total, failed=0, rate="-", tokens="-",
                eta="-", state=job.status, elapsed="-")
        task_id = self.tasks[job.id]
        finished = job.done + job.failed
        self.progress.update(task_id, completed=finished, failed=job.failed, state=job.status)
        if rates is not None:
            speed, tokens = rates.get("items_per_s"), rates.get("tokens_per_s")
        else:
            speed, tokens = self.progress.tasks[task_id].speed, None
        final = JobStatus(job.status).is_terminal
        eta = "-" if final or not speed else _clock((job.total - finished) / speed)
        self.progress.update(task_id, rate=f"{speed:.1f}" if speed else "-",
                             tokens=f"{tokens:.0f}" if tokens else "-", eta=eta,
                             elapsed=_clock(_job_seconds(job, rates)) if job.started_at else "-")
        if final:
            self.progress.stop_task(task_id)


def _job_seconds(job: Job, rates: dict[str, Any] | None) -> float:
    """The job's own running time (since it started), not this display's: the database's
    clock when the view gives it, so a watcher's clock does not matter."""
    if rates and rates.get("wall_seconds") is not None:
        return rates["wall_seconds"]
    end = job.finished_at or utcnow()
    start = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=timezone.utc)
    end = end if end.tzinfo else end.replace(tzinfo=timezone.utc)
    return (end - start).total_seconds()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def watch(job_ids: list[str] | None, console: Console, *, interval: float = 1.0,
          settings: Settings | None = None, announce: str = "") -> list[Job]:
    """Show live bars until the jobs finish (Ctrl-C stops early); the jobs as last seen.

    Without ``job_ids``: every unfinished job, including those submitted while watching.
    ``announce`` is printed once the jobs were first read.
    """
    from . import api

    seen: dict[str, Job] = {}
    try:
        with JobProgress(console) as progress:
            while True:
                if job_ids:
                    jobs = [api.status(job_id, settings=settings) for job_id in job_ids]
                else:
                    unfinished = api.active_jobs(settings=settings)
                    fresh = [j.id for j in unfinished if j.id not in seen]
                    jobs = [api.status(j, settings=settings) for j in seen] + \
                        [j for j in unfinished if j.id in fresh]
                seen.update((job.id, job) for job in jobs)
                rates = api.throughput(seen, settings=settings)
                for job in jobs:
                    progress.update(job, rates.get(job.id))
                if announce:
                    console.print(announce, highlight=False)
                    announce = ""
                if all(JobStatus(job.status).is_terminal for job in seen.values()):
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return list(seen.values())


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
    if job.input_file_id:  # a batch of the OpenAI-compatible API (aigc serve)
        fields += [("batch", "batch_" + job.id.replace("-", "")), ("owner", job.owner or "-"),
                   ("endpoint", job.endpoint or "-"), ("input file", job.input_file_id),
                   ("expires", _stamp(job.expires_at)), ("expired", _stamp(job.expired_at))]
    if job.meta:
        fields.append(("metadata", json.dumps(job.meta)))
    if job.errors:
        fields.append(("errors", f"{len(job.errors)} (first: line {job.errors[0].get('line')}: "
                                 f"{job.errors[0].get('message')})"))
    for name, value in fields:
        table.add_row(f"[bold]{name}", value)
    return table


JOB_FIELDS = ("id", "kind", "model", "status", "total", "done", "failed", "priority", "params",
              "meta", "idempotency_key", "created_at", "started_at", "finished_at",
              "cancel_requested_at", "updated_at")


def job_document(job: Job) -> dict[str, Any]:
    """The job as plain JSON-ready data (``aigc status --json``): its columns, times in ISO 8601."""
    document = {name: getattr(job, name) for name in JOB_FIELDS}
    document["metadata"] = document.pop("meta")
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in document.items()}


def results_table(rows: Iterable[dict[str, Any]], *, title: str, width: int = 70) -> Table:
    """Result rows for the terminal: an article's title in bold over the start of its body, an
    ad's labelled lines (of each variant, up to three), free text as written while short and as
    one paragraph beyond, files for image kinds, errors in red."""
    table = Table("custom_id", "output", "tokens", "worker", title=title, show_lines=True)
    for row in rows:
        tokens = f"{row['prompt_tokens'] or 0}+{row['output_tokens'] or 0}"
        if row["error_code"]:
            text = f"[red]{escape(row['error_code'])}: {escape(row['error_message'] or '')}"
        elif row.get("artifact_uris"):  # image kinds: the files written
            text, tokens = escape("\n".join(row["artifact_uris"])), "-"
        else:
            text = _preview(row.get("output") or {}, row["output_text"] or "", width * 4)
        table.add_row(row["custom_id"], text, tokens, f"{row['worker']} ({row['device']})")
    return table


SHOWN_VARIANTS = 3  # an ad's variants in the terminal; `aigc results --json` has them all


def _preview(output: dict[str, Any], text: str, limit: int) -> str:
    def clip(value: str) -> str:
        value = " ".join(value.split())  # one paragraph for the terminal
        return escape(value if len(value) <= limit else value[:limit] + "…")

    def lines(value: str) -> str:  # as written while short (an ad's labelled lines), else clipped
        return escape(value.strip()) if len(value) <= limit else clip(value)

    if "title" in output:
        return f"[bold]{escape(output['title'])}[/bold]\n{clip(output.get('body') or '')}"
    variants = output.get("variants") or []
    if variants and all(isinstance(v, dict) and "text" in v for v in variants):
        shown = [lines(v["text"] or "") for v in variants[:SHOWN_VARIANTS]]
        more = len(variants) - len(shown)
        return "\n\n".join(shown + ([f"[dim]… {more} more variant(s)[/dim]"] if more else []))
    return lines(text)
