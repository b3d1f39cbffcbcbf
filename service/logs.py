"""Logging set-up shared by the server, the gateway and the CLIs."""

from __future__ import annotations

import logging


def configure_logging(level: str = "INFO") -> None:
    """One line per record: time, level, logger, message (key=value pairs in messages)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )
    for noisy in ("alembic", "mlflow.store.db.utils", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
