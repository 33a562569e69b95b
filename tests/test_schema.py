"""The tables are a contract: the migrations build exactly what the models describe."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

from aigc.schemas.db import SchemaError, current_revision, ensure_schema, get_engine, head_revision, upgrade


def test_migrations_match_the_models(database_url):
    upgrade(database_url)
    engine = get_engine(database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []
    assert current_revision(engine) == head_revision()
    columns = {c["name"] for c in inspect(engine).get_columns("results")}
    assert {"job_id", "custom_id", "output_text", "error_code", "model", "seed", "prompt_tokens",
            "output_tokens", "latency_ms", "worker", "device", "created_at"} <= columns


def test_a_fresh_sqlite_file_is_migrated_on_first_use(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    engine = ensure_schema(url)
    assert current_revision(engine) == head_revision()
    assert {"jobs", "items", "results"} <= set(inspect(engine).get_table_names())


def test_an_unmigrated_postgres_database_is_refused(postgres_url):
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    server = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = make_url(postgres_url).database + "_empty"
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    try:
        with pytest.raises(SchemaError, match="run `aigc db upgrade`"):
            ensure_schema(url)
    finally:
        get_engine(url).dispose()
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        server.dispose()


def test_the_schema_is_checked_once_per_engine(tmp_path, monkeypatch):
    from aigc import api
    from aigc.schemas import db
    from aigc.schemas.settings import Settings

    checks = []
    real = db.current_revision
    monkeypatch.setattr(db, "current_revision", lambda engine: checks.append(engine) or real(engine))
    url = f"sqlite:///{tmp_path / 'once.db'}"

    engine = ensure_schema(url)
    assert [ensure_schema(url) for _ in range(3)] == [engine] * 3
    for _ in range(3):  # as wait() polls
        api.list_jobs(settings=Settings(database_url=url))
    assert checks == [engine]


def test_a_stale_schema_is_refused_at_every_call_until_upgraded(tmp_path, monkeypatch):
    from aigc.schemas import db

    url = f"sqlite:///{tmp_path / 'stale.db'}"
    upgrade(url, "0004")
    checks = []
    real = db.current_revision
    monkeypatch.setattr(db, "current_revision", lambda engine: checks.append(engine) or real(engine))

    for _ in range(2):
        with pytest.raises(SchemaError, match="is at schema revision 0004, .* run `aigc db upgrade`"):
            ensure_schema(url)
    assert len(checks) == 2  # a failed check is not remembered

    upgrade(url)
    assert current_revision(ensure_schema(url)) == head_revision()
    ensure_schema(url)
    assert len(checks) == 3  # the check that passed, then none


def test_each_set_of_job_states_is_defined_once_and_used_everywhere():
    import re
    from pathlib import Path

    from aigc.schemas.enums import ACTIVE_JOB_STATUSES, TERMINAL_JOB_STATUSES, UNFINISHED_JOB_STATUSES, JobStatus

    assert set(UNFINISHED_JOB_STATUSES) == set(ACTIVE_JOB_STATUSES) | {JobStatus.cancelling}
    assert set(UNFINISHED_JOB_STATUSES) | set(TERMINAL_JOB_STATUSES) == set(JobStatus)
    assert not set(UNFINISHED_JOB_STATUSES) & set(TERMINAL_JOB_STATUSES)
    assert [s for s in JobStatus if s.is_active] == list(ACTIVE_JOB_STATUSES)
    root = Path(__file__).parent.parent
    spelled = re.compile(r"JobStatus\.(queued|running),\s*JobStatus\.(queued|running)|not s\.is_terminal")
    offenders = [str(path.relative_to(root)) for folder in ("producer", "schemas", "workers")
                 for path in (root / folder).rglob("*.py")
                 if path.name != "enums.py" and spelled.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
