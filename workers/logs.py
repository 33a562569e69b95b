"""Worker logging: plain text for people, or one JSON object per line for log collectors.

``AIGC_LOG_FORMAT=json`` makes every log record one line of JSON on stderr with ``timestamp``
(UTC, ISO 8601), ``level``, ``logger``, ``message``, and the record's own fields: a chunk's
summary line carries ``job_id``, ``items``, ``done``, ``failed``, ``worker``, ``device`` and
``duration_ms``. Either way, the passwords of the configured URLs are replaced by ``***``
in whatever a record says, as a net under the redaction done where URLs are printed.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from sqlalchemy.engine import make_url

from aigc.schemas.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def secrets_of(settings: Settings) -> list[str]:
    """The passwords in the settings, as given, as written in URLs and URL-decoded; too short
    ones are skipped."""
    found = [urlsplit(part).password for part in settings.broker_url.split(";")]
    found += [urlsplit(settings.database_url).password, make_url(settings.database_url).password]
    for secret in (settings.flower_password, settings.broker_password, settings.database_password):
        if secret is not None:
            found += [secret.get_secret_value(), quote(secret.get_secret_value(), safe="")]
    values = {v for s in found if s for v in (s, unquote(s))}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


class _Redacting(logging.Formatter):
    secrets: list[str] = []

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class TextFormatter(_Redacting):
    def __init__(self, secrets: list[str]):
        super().__init__(TEXT_FORMAT)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(_Redacting):
    """One JSON object per record, on one line."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items()
                     if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return self.redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure(settings: Settings, level: str = "INFO") -> None:
    """Send every log record to stderr in the configured format (replacing other handlers)."""
    if settings.log_format == "json":  # progress bars are not log lines (read at transformers' import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler()
    secrets = secrets_of(settings)
    handler.setFormatter(JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def adopt_transformers() -> None:
    """Route transformers' warnings through our handler (it has its own, plain, by default).

    Call after the device is pinned: importing transformers may import torch.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def keep_for_celery(app: Any) -> None:
    """Stop the Celery worker from installing its own handlers; keep its stdout redirection."""
    from celery import signals

    def setup_logging(**_: Any) -> None:
        if app.conf.worker_redirect_stdouts:  # stray prints become log records, as by default
            app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)

    signals.setup_logging.connect(setup_logging, weak=False)
