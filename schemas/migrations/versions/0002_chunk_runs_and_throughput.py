"""chunk_runs table; job_throughput and worker_throughput views

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

A worker writes one ``chunk_runs`` row per chunk it ran (items, tokens, files, duration).
The two views turn those rows and ``jobs`` into items/s, tokens/s and artifacts/s; they are
plain SQL, the same columns on SQLite and PostgreSQL (only the clock arithmetic differs).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

# Seconds from a job's start to its end, or to now while it runs.
WALL_SECONDS = {
    "sqlite": "(julianday(COALESCE(j.finished_at, 'now')) - julianday(j.started_at)) * 86400.0",
    "postgresql": "CAST(EXTRACT(EPOCH FROM (COALESCE(j.finished_at, now()) - j.started_at)) "
                  "AS DOUBLE PRECISION)",
}

JOB_THROUGHPUT = """
CREATE VIEW job_throughput AS
SELECT j.id AS job_id, j.kind, j.model, j.status, j.total, j.done, j.failed,
       j.started_at, j.finished_at,
       {wall} AS wall_seconds,
       COALESCE(c.busy_ms, 0) / 1000.0 AS busy_seconds,
       COALESCE(c.chunks, 0) AS chunks,
       COALESCE(c.prompt_tokens, 0) AS prompt_tokens,
       COALESCE(c.output_tokens, 0) AS output_tokens,
       COALESCE(c.artifacts, 0) AS artifacts,
       (j.done + j.failed) / NULLIF({wall}, 0) AS items_per_s,
       COALESCE(c.output_tokens, 0) / NULLIF({wall}, 0) AS tokens_per_s,
       COALESCE(c.artifacts, 0) / NULLIF({wall}, 0) AS artifacts_per_s
FROM jobs j
LEFT JOIN (
    SELECT job_id, COUNT(*) AS chunks, SUM(duration_ms) AS busy_ms,
           CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
           CAST(SUM(output_tokens) AS BIGINT) AS output_tokens,
           CAST(SUM(artifacts) AS BIGINT) AS artifacts
    FROM chunk_runs GROUP BY job_id
) c ON c.job_id = j.id
"""

# Rates over busy time: the summed durations of the worker's chunks, not wall-clock time.
WORKER_THROUGHPUT = """
CREATE VIEW worker_throughput AS
SELECT worker, MAX(device) AS device, COUNT(*) AS chunks, COUNT(DISTINCT job_id) AS jobs,
       CAST(SUM(done + failed) AS BIGINT) AS items,
       CAST(SUM(done) AS BIGINT) AS done, CAST(SUM(failed) AS BIGINT) AS failed,
       CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
       CAST(SUM(output_tokens) AS BIGINT) AS output_tokens,
       CAST(SUM(artifacts) AS BIGINT) AS artifacts,
       SUM(duration_ms) / 1000.0 AS busy_seconds,
       MIN(started_at) AS first_started_at, MAX(finished_at) AS last_finished_at,
       SUM(done + failed) / NULLIF(SUM(duration_ms) / 1000.0, 0) AS items_per_s,
       SUM(output_tokens) / NULLIF(SUM(duration_ms) / 1000.0, 0) AS tokens_per_s,
       SUM(artifacts) / NULLIF(SUM(duration_ms) / 1000.0, 0) AS artifacts_per_s
FROM chunk_runs
GROUP BY worker
"""


def upgrade() -> None:
    op.create_table(
        "chunk_runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("claimed", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("artifacts", sa.Integer(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_chunk_runs_job_id", "chunk_runs", ["job_id"])
    op.create_index("ix_chunk_runs_finished_at", "chunk_runs", ["finished_at"])
    wall = WALL_SECONDS[op.get_bind().dialect.name]
    op.execute(JOB_THROUGHPUT.format(wall=wall))
    op.execute(WORKER_THROUGHPUT)


def downgrade() -> None:
    op.execute("DROP VIEW worker_throughput")
    op.execute("DROP VIEW job_throughput")
    op.drop_index("ix_chunk_runs_finished_at", "chunk_runs")
    op.drop_index("ix_chunk_runs_job_id", "chunk_runs")
    op.drop_table("chunk_runs")
