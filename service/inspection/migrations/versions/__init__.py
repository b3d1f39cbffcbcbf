"""Alembic revisions of the inspection log."""
