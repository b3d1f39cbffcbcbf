"""Logging set-up shared by the server, the gateway and the CLIs.

Structured fields go in `extra={...}` (e.g. `request_id`, `model`); the text format
appends them as `key=value`, the JSON format emits one object per line.
"""

from __future__ import annotations

import json
import logging

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """`time level logger message key=value …`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        line = super().format(record)
        extras = _extras(record)
        return line + "".join(f" {k}={v}" for k, v in extras.items()) if extras else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        body = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), **_extras(record)}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger (`fmt`: "text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler],
                        force=True)
    for noisy in ("alembic", "mlflow.store.db.utils", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
