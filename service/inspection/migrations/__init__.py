"""Alembic migrations of the inspection log (`service.inspection.schema`)."""
