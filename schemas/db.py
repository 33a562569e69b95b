"""Database engines and schema migrations (Alembic), shared by the producer and the workers."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from . import tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from .settings import redact_url

MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaError(RuntimeError):
    """The database's schema is missing or older than this code expects."""


@functools.cache
def get_engine(url: str) -> Engine:
    """One pooled engine per database URL per process."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the producer read progress while a worker writes; foreign keys are off by default.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@functools.cache
def head_revision() -> str:
    """The newest revision among the migration scripts (read from disk once per process)."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database behind ``engine`` is at; ``None`` when it has none."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(url), revision)


# Engines whose database was found at the newest revision: checked once, not on every call
# (a producer's wait() polls status() every half second). A failed check is not remembered.
_current: set[Engine] = set()
_checking = threading.Lock()


def ensure_schema(url: str) -> Engine:
    """The engine for ``url``, after checking its schema is current (once per engine).

    A fresh SQLite file is migrated on first use; any other database that is not at the newest
    revision raises :class:`SchemaError` telling the operator to run ``aigc db upgrade``, at
    every call until it is.
    """
    engine = get_engine(url)
    if engine in _current:
        return engine
    with _checking:  # threads of one server: one check, and one migration of a fresh file
        if engine not in _current:
            _check_schema(url, engine)
            _current.add(engine)
    return engine


def _check_schema(url: str, engine: Engine) -> None:
    current = current_revision(engine)
    if current == head_revision():
        return
    if current is None and engine.dialect.name == "sqlite":
        upgrade(url)
        return
    raise SchemaError(
        f"database {redact_url(url)} is at schema revision {current or 'none'}, "
        f"this aigc needs {head_revision()}: run `aigc db upgrade`"
    )
