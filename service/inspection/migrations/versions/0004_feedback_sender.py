"""Who sent each operator verdict: `feedback.sender`, the name of the caller's API key (or
`anonymous@<address>` on a server without keys); "" for verdicts recorded before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:  # noqa: D103
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("sender", sa.String(128), nullable=False, server_default=""))


def downgrade() -> None:  # noqa: D103
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("sender")
