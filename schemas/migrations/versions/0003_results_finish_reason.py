"""results.finish_reason

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

Why a text item's generation ended: ``stop`` (end of text or a stop string) or ``length``
(``max_new_tokens`` reached). OpenAI-format exports need it; readers use it to find truncated
outputs. Null for rows without generated text (errors, image sets) and rows written before it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("finish_reason", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("finish_reason")
