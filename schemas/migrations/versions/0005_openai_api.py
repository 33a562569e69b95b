"""The OpenAI-compatible API: batch columns on jobs, and the files table

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

A batch made through ``aigc serve`` is a job: these columns say who made it (the API key's
name), from which uploaded file, for which endpoint, within which completion window, and why
it failed when its input was refused. ``files`` holds uploaded batch inputs (their bytes live
in the artifact store) and the ids of batches' output and error files (made from ``results``).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT = sa.BigInteger()


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("input_file_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("endpoint", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("completion_window", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("errors", JSON, nullable=True))
        batch.create_index("ix_jobs_owner", ["owner"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", BIGINT, nullable=True),
        sa.Column("uri", sa.Text(), nullable=True),
        sa.Column("job_id", sa.String(length=36), sa.ForeignKey("jobs.id"), nullable=True),
        sa.Column("content", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("job_id", "content", name="uq_files_job_content"),
    )
    op.create_index("ix_files_owner", "files", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_files_owner", table_name="files")
    op.drop_table("files")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner")
        for name in ("errors", "expired_at", "expires_at", "completion_window", "endpoint",
                     "input_file_id", "owner"):
            batch.drop_column(name)
