"""A server reads the MLflow registry; it never changes the registry's schema.

MLflow's SQL store, opened by a newer MLflow than the one that made it, finds a table it
expects missing and runs every migration up to its own head on open ("Creating initial MLflow
database tables…"): one serving process with a newer `mlflow-skinny` than the trainer's
upgrades the shared store, and from then on every older tool (the trainer, `mlflow ui`, the
other servers) fails with "Detected out-of-date database schema". So before the server's first
registry call on a database URI, this module reads the store's Alembic revision and compares
it with the head of the installed MLflow's migrations: unequal, the server does not open the
store (the watcher reports `NotReady` with the reason, `GetModel.last_error`, and retries, so
an upgrade made by the operator is picked up). An empty database (a brand-new store) is left
to MLflow to create.

Nothing here writes: the check opens its own engine, reads two things, and disposes of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql")


def redacted(uri: str) -> str:
    """The URI without a password (`postgresql://user:***@host/db`), as SQLAlchemy renders it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: name the scheme only
        return uri.split(":", 1)[0] + ":…"


def expected_revision(uri: str) -> str:
    """The head revision of the installed MLflow's migrations."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return str(ScriptDirectory.from_config(_get_alembic_config(uri)).get_current_head())


def schema_problem(uri: str) -> str:
    """Why this server must not open the registry at `uri` ("" when it may): a database whose
    schema revision is not the installed MLflow's, or that cannot be read."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in DATABASE_SCHEMES:
        return ""  # a tracking server (http, https) or a file store: MLflow migrates nothing here
    import mlflow
    import sqlalchemy as sa

    if scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and path != ":memory:" and not Path(path.split("?", 1)[0]).exists():
            return ""  # a new store: MLflow creates it (nothing to migrate)
    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            if not tables:
                return ""  # an empty database: MLflow creates the schema
            found = None
            if "alembic_version" in tables:
                found = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as exc:  # unreachable, locked, not a database: say so, touch nothing
        return f"cannot read the schema of the registry store {redacted(uri)}: {str(exc)[:300]}"
    finally:
        engine.dispose()
    expected = expected_revision(uri)
    if found == expected:
        return ""
    what = f"schema revision {found}" if found else "no MLflow schema revision (alembic_version)"
    return (f"the registry store {redacted(uri)} has {what}, but this server's MLflow {mlflow.__version__} "
            f"expects {expected}; a server never migrates the registry, so it does not open it. Run the "
            f"server with the MLflow version the rest of the deployment runs (the lock file), or upgrade "
            f"the store deliberately with that deployment's MLflow: `mlflow db upgrade <uri>`")
