"""``python -m aigc.workers``: start one worker process (``aigc worker`` runs this).

The device is pinned through ``CUDA_VISIBLE_DEVICES`` *before* torch is imported, and the
pool is a thread pool: no fork ever happens after torch has started its threads.
"""

from __future__ import annotations

import importlib
import logging
import socket
import sys
import threading
from typing import Annotated

import typer

from aigc.schemas.enums import Kind
from aigc.schemas.settings import Settings

from . import launcher

# Celery worker options that do not fit one process per device running one chunk at a time,
# and why; every other option of `celery worker` is passed through to it.
REFUSED = {
    "--pool": "the pool is always threads: forking after torch has started hangs",
    "--autoscale": "one chunk at a time per device; scale with more devices or hosts",
    "--max-tasks-per-child": "there are no child processes in a thread pool",
    "--max-memory-per-child": "there are no child processes in a thread pool (see AIGC_MODEL_CACHE_MB)",
    "--pool-start-method": "there are no child processes in a thread pool",
    "--prefetch-multiplier": "one message in flight per worker is what makes redelivery safe",
    "--disable-prefetch": "one message in flight per worker is already the setting",
    "--time-limit": "the thread pool cannot enforce time limits; leases and the heartbeat bound a chunk",
    "--soft-time-limit": "the thread pool cannot enforce time limits; leases and the heartbeat bound a chunk",
    "--detach": "a worker runs in the foreground, under the launcher or a process manager",
    "--uid": "run the process as that user instead",
    "--gid": "run the process as that group instead",
    "--executable": "only used with --detach",
    "--logfile": "logs go to stderr (AIGC_LOG_FORMAT=text|json)",
    "--beat": "aigc has no periodic tasks; run `aigc sweep --every 15` as its own service",
    "--schedule-filename": "aigc has no periodic tasks",
    "--scheduler": "aigc has no periodic tasks",
    "--include": "use AIGC_PLUGINS for modules every worker imports",
    "--purge": "queued messages only dispatch SQL rows; cancel jobs with `aigc cancel`",
}
OWN = {"--hostname", "--loglevel", "--queues", "--concurrency"}  # declared below


def _celery_options() -> dict[str, tuple[str, bool]]:
    """{option string: (its long name, whether it is a flag)} of Celery's worker command."""
    from celery.bin.worker import worker

    found = {}
    for param in worker.params:
        long = next(o for o in param.opts if o.startswith("--"))
        for opt in param.opts:
            found[opt] = (long, bool(getattr(param, "is_flag", False)))
    return found


def celery_passthrough(extra: list[str]) -> list[str]:
    """Check the options meant for Celery; raise :class:`typer.BadParameter` for those that do
    not exist or do not fit, saying why."""
    known = _celery_options()
    passed, rest = [], list(extra)
    while rest:
        arg = rest.pop(0)
        name = arg.split("=", 1)[0]
        if name not in known:
            raise typer.BadParameter(f"no such option: {arg} (see `aigc worker --help`)")
        long, flag = known[name]
        if long in REFUSED:
            raise typer.BadParameter(f"{name} is not supported: {REFUSED[long]}")
        passed.append(arg)
        if not flag and "=" not in arg and rest:
            passed.append(rest.pop(0))
    return passed


EPILOG = ("Other `celery worker` options are passed through to Celery (--heartbeat-interval, "
          "--without-heartbeat, --statedb, --pidfile, --exclude-queues, -O, ...). Refused, "
          "because they do not fit one process per device: " + ", ".join(sorted(REFUSED)) + ".")

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog=EPILOG)
def worker(
    ctx: typer.Context,
    devices: Annotated[str, typer.Option(
        help="'cpu'; 'all' (one supervised process per GPU); or GPU indices like 0,1. "
        "A GPU that does not exist is an error.")] = "cpu",
    queues: Annotated[str, typer.Option(
        "--queues", "-Q", help="comma-separated queues (job kinds) to consume")] = ",".join(k.value for k in Kind),
    hostname: Annotated[str, typer.Option(
        "--hostname", "-n", help="Celery node name; {device} becomes cpu or gpuN, %h the host name")] = "{device}@%h",
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-c", help="chunks at once per process: only 1 (more processes, not threads, "
        "scale a host: one per device)")] = 1,
    no_preload: Annotated[bool, typer.Option(
        "--no-preload", help="load the default models on first use, not at start")] = False,
) -> None:
    """Start a worker: one process per device, consuming the queues of the job kinds."""
    if concurrency != 1:
        raise typer.BadParameter("one chunk at a time per process; run one process per device "
                                 "(--devices) or more hosts", param_hint="--concurrency")
    unknown = [q for q in queues.split(",") if q not in Kind.__members__]
    if unknown:
        raise typer.BadParameter(f"unknown queue(s) {', '.join(unknown)}; the queues are "
                                 f"{', '.join(k.value for k in Kind)}", param_hint="--queues")
    passthrough = celery_passthrough(ctx.args)
    try:
        pinned = launcher.parse_devices(devices)
        if len(pinned) > 1:  # one device is checked once torch is imported, pinned to it
            launcher.check_devices(pinned)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--devices") from None
    from aigc.schemas.settings import get_settings, redact_url

    from . import logs

    settings = get_settings()
    logs.configure(settings, loglevel)
    if devices.strip().lower() == "all" or "," in devices:
        rest = ["--queues", queues, "--hostname", hostname, "--loglevel", loglevel,
                *(["--no-preload"] if no_preload else []), *passthrough]
        raise typer.Exit(launcher.supervise(pinned, rest))
    device = launcher.pin(pinned[0])
    node = hostname.replace("{device}", device).replace("%h", socket.gethostname())

    from aigc.schemas.db import ensure_schema

    ensure_schema(settings.database_url)
    for module in settings.plugins:  # the user's own backends register themselves on import
        try:
            importlib.import_module(module)
        except Exception as exc:
            sys.exit(f"aigc worker: plugin {module!r} (AIGC_PLUGINS) failed to import: {exc}")
    import torch

    logs.adopt_transformers()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if device != "cpu" and not torch.cuda.is_available():
        sys.exit(f"aigc worker: --devices {pinned[0]}: GPU {pinned[0]} is not available here "
                 f"(torch {torch.__version__} sees no CUDA device)")
    if not no_preload:
        # Loaded on a thread that then ends, so the main thread never starts an OpenMP pool:
        # with two live pools (main + the task thread) libgomp counts more threads than cores
        # and stops spin-waiting between parallel regions, which made CPU decoding in the task
        # thread about 40% slower (docs/benchmarks.md, issue #16).
        loader = threading.Thread(target=_preload, args=(queues, settings), name="aigc-preload")
        loader.start()
        loader.join()
    from .app import app

    logs.keep_for_celery(app)
    logging.getLogger("aigc.worker").info(
        "worker %s: broker %s, database %s", node, redact_url(settings.broker_url),
        redact_url(settings.database_url))
    quiet = ["--quiet"] if settings.log_format == "json" else []  # no banner among JSON lines
    app.worker_main([*quiet, "worker", "--pool=threads", "--concurrency=1", f"--hostname={node}",
                     f"--queues={queues}", f"--loglevel={loglevel}",
                     "--without-gossip", "--without-mingle", *passthrough])


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line) and run the worker."""
    cli(args=argv, prog_name="aigc worker")


def _preload(queues: str, settings: Settings) -> None:
    """Load the default model of each consumed kind (article and ad_copy share one)."""
    from .registry import get_generator

    for kind in [Kind(q) for q in queues.split(",") if q in Kind.__members__]:
        try:
            get_generator(kind, settings.default_model(kind), settings)
        except Exception as exc:  # jobs naming other models can still run
            logging.getLogger("aigc.worker").warning("default %s model not loaded: %s", kind, exc)


if __name__ == "__main__":
    main()
