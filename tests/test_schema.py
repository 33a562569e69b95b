"""The tables are a contract: the migrations build exactly what the models describe."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

from schemas.db import SchemaError, current_revision, ensure_schema, get_engine, head_revision, upgrade


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
