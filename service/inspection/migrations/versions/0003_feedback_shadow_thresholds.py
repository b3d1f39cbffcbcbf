"""Operator feedback, shadow decisions and the threshold each decision used.

`inspections` gains `threshold_source` ("model" or the overriding tag), `role` ("serve",
or "shadow" for the challenger's decision on the same image) and `served_record_id` (a
shadow row's link to the answer it shadowed). A new table `feedback` holds operators'
verdicts on past request ids.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:  # noqa: D103
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("threshold_source", sa.String(160), nullable=False,
                                   server_default="model"))
        batch.add_column(sa.Column("role", sa.String(8), nullable=False, server_default="serve"))
        batch.add_column(sa.Column("served_record_id", sa.String(32), nullable=True))
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("record_id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("verdict", sa.String(2), nullable=False),
        sa.Column("defect_type", sa.String(128), nullable=False, server_default=""),
        sa.Column("operator", sa.String(128), nullable=False, server_default=""),
        sa.Column("comment", sa.String(2000), nullable=False, server_default=""),
        sa.Column("station", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ux_feedback_record_id", "feedback", ["record_id"], unique=True)
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])


def downgrade() -> None:  # noqa: D103
    op.drop_table("feedback")
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("served_record_id")
        batch.drop_column("role")
        batch.drop_column("threshold_source")
