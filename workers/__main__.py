"""``python -m workers``: start one worker process (``aigc worker`` runs this).

The device is pinned through ``CUDA_VISIBLE_DEVICES`` *before* torch is imported, and the
pool is a thread pool: no fork ever happens after torch has started its threads.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys
import threading

from schemas.enums import Kind

from . import launcher


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aigc worker", description=__doc__)
    parser.add_argument("--devices", default="cpu",
                        help="'cpu', 'all' (one process per GPU, supervised), or indices like 0,1")
    parser.add_argument("--queues", default=",".join(k.value for k in Kind),
                        help="comma-separated queues (kinds) to consume")
    parser.add_argument("--hostname", default="{device}@%h",
                        help="Celery node name; {device} becomes cpu or gpuN, %%h the host name")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--no-preload", action="store_true",
                        help="load the default models on first use, not at start")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        devices = launcher.parse_devices(args.devices)
    except ValueError as exc:
        sys.exit(f"aigc worker: {exc}")
    from schemas.settings import get_settings, redact_url

    from . import logs

    settings = get_settings()
    logs.configure(settings, args.loglevel)
    if args.devices.strip().lower() == "all" or "," in args.devices:
        rest = [a for i, a in enumerate(argv) if not _is_devices_arg(argv, i)]
        sys.exit(launcher.supervise(devices, rest))
    device = launcher.pin(devices[0])
    hostname = args.hostname.replace("{device}", device).replace("%h", socket.gethostname())

    from schemas.db import ensure_schema

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
    if device != "cpu":
        if not torch.cuda.is_available():
            logging.getLogger("aigc.worker").warning(
                "pinned to GPU %s but CUDA is not available here: running on the CPU", devices[0])
    if not args.no_preload:
        # Loaded on a thread that then ends, so the main thread never starts an OpenMP pool:
        # with two live pools (main + the task thread) libgomp counts more threads than cores
        # and stops spin-waiting between parallel regions, which made CPU decoding in the task
        # thread about 40% slower (docs/benchmarks.md, issue #16).
        loader = threading.Thread(target=_preload, args=(args.queues, settings), name="aigc-preload")
        loader.start()
        loader.join()
    from .app import app

    logs.keep_for_celery(app)
    logging.getLogger("aigc.worker").info(
        "worker %s: broker %s, database %s", hostname, redact_url(settings.broker_url),
        redact_url(settings.database_url))
    quiet = ["--quiet"] if settings.log_format == "json" else []  # no banner among JSON lines
    app.worker_main([*quiet, "worker", "--pool=threads", "--concurrency=1", f"--hostname={hostname}",
                     f"--queues={args.queues}", f"--loglevel={args.loglevel}",
                     "--without-gossip", "--without-mingle"])


def _preload(queues: str, settings) -> None:
    """Load the default model of each consumed kind (article and ad_copy share one)."""
    from .registry import get_generator

    for kind in [Kind(q) for q in queues.split(",") if q in Kind.__members__]:
        try:
            get_generator(kind, settings.default_model(kind), settings)
        except Exception as exc:  # jobs naming other models can still run
            logging.getLogger("aigc.worker").warning("default %s model not loaded: %s", kind, exc)


def _is_devices_arg(argv: list[str], i: int) -> bool:
    """Whether argv[i] is --devices, its value, or --devices=VALUE (the launcher sets its own)."""
    return (argv[i] == "--devices" or argv[i].startswith("--devices=")
            or (i > 0 and argv[i - 1] == "--devices"))


if __name__ == "__main__":
    main()
