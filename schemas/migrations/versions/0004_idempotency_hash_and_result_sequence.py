"""jobs.input_sha256; results.seq in commit order; counters; an index on chunk_runs.worker

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

- ``jobs.input_sha256``: a hash of the submitted items, so reusing an idempotency key with
  different input is refused rather than silently answered with the old job.
- ``results.seq``: a number taken from ``counters`` ('results') in the transaction that writes
  the row, which holds the counter's row lock until it commits; so rows become visible in
  ``seq`` order and ``WHERE seq > :last`` never skips a row committed late by another worker
  (``created_at`` and ``id`` can). Existing rows get their ``id``.
- ``ix_chunk_runs_worker``: ``worker_throughput WHERE worker = ...`` reads one worker's rows.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("input_sha256", sa.String(length=64), nullable=True))
    op.create_table(
        "counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
    op.execute("UPDATE results SET seq = id")
    op.execute("INSERT INTO counters (name, value) SELECT 'results', COALESCE(MAX(id), 0) FROM results")
    with op.batch_alter_table("results") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch.create_index("ix_results_seq", ["seq"], unique=True)
    op.create_index("ix_chunk_runs_worker", "chunk_runs", ["worker"])


def downgrade() -> None:
    op.drop_index("ix_chunk_runs_worker", "chunk_runs")
    with op.batch_alter_table("results") as batch:
        batch.drop_index("ix_results_seq")
        batch.drop_column("seq")
    op.drop_table("counters")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("input_sha256")
