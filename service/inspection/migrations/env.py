"""Alembic environment for the inspection log: the URL comes from the Config that
`service.inspection.schema.upgrade` builds (or `alembic -x url=…` on the command line)."""

from __future__ import annotations

from alembic import context

from service.inspection.schema import Base, engine_for

config = context.config
url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = engine_for(url, statement_timeout_ms=0)  # bounded connect and lock waits; DDL may take long
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=Base.metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
