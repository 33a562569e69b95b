"""``python -m workers``: start one worker process (``aigc worker`` runs this).

The device is pinned through ``CUDA_VISIBLE_DEVICES`` *before* torch is imported, and the
pool is a thread pool: no fork ever happens after torch has started its threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from schemas.enums import Kind


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aigc worker", description=__doc__)
    parser.add_argument("--devices", default="cpu",
                        help="'cpu', or one CUDA device index this process is pinned to")
    parser.add_argument("--queues", default=",".join(k.value for k in Kind if k.is_text),
                        help="comma-separated queues (kinds) to consume")
    parser.add_argument("--hostname", default=None, help="Celery node name (default DEVICE@host)")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--no-preload", action="store_true",
                        help="load the default text model on first use, not at start")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.devices == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        device = "cpu"
    elif args.devices.isdigit():
        os.environ["CUDA_VISIBLE_DEVICES"] = args.devices
        device = f"gpu{args.devices}"
    else:
        sys.exit(f"aigc worker: --devices must be 'cpu' or one device index, not {args.devices!r}")
    hostname = args.hostname or f"{device}@{socket.gethostname()}"
    logging.basicConfig(level=args.loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from schemas.db import ensure_schema
    from schemas.settings import get_settings, redact_url

    settings = get_settings()
    ensure_schema(settings.database_url)
    if not args.no_preload:
        from .registry import get_generator

        try:
            get_generator(Kind.article, settings.text_model, settings)
        except Exception as exc:  # jobs naming other models can still run
            logging.getLogger("aigc.worker").warning("default text model not loaded: %s", exc)
    from .app import app

    logging.getLogger("aigc.worker").info(
        "worker %s: broker %s, database %s", hostname, redact_url(settings.broker_url),
        redact_url(settings.database_url))
    app.worker_main(["worker", "--pool=threads", "--concurrency=1", f"--hostname={hostname}",
                     f"--queues={args.queues}", f"--loglevel={args.loglevel}",
                     "--without-gossip", "--without-mingle"])


if __name__ == "__main__":
    main()
