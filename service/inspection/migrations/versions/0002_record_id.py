"""Add `record_id`: the spool's identity of a row, so a batch shipped twice is inserted once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:  # noqa: D103
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("record_id", sa.String(32), nullable=True))
    op.create_index("ux_inspections_record_id", "inspections", ["record_id"], unique=True)


def downgrade() -> None:  # noqa: D103
    op.drop_index("ux_inspections_record_id", table_name="inspections")
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("record_id")
