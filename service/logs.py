"""Logging set-up shared by the server, the gateway and the CLIs.

Structured fields go in `extra={...}` (e.g. `request_id`, `model`); the text format
appends them as `key=value`, the JSON format emits one object per line. The text format
escapes control and other non-printable characters in the message and the fields (a
newline becomes a backslash and `n`), so nothing a client sends can forge a log line; tracebacks keep
their lines.
"""

from __future__ import annotations

import json
import logging
import re

from service import tracing

# Not structured fields: the record's own attributes, and uvicorn's `color_message` (the
# message again, with terminal colour codes).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
# A message longer than this is cut (saying how much): a library that quotes what a client sent
# (a 30 kB `baggage` header, say) cannot write lines of any length.
MAX_MESSAGE = 4000


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}… ({len(message) - MAX_MESSAGE} more characters cut)"


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """Control and bidirectional-override characters written as escapes (backslash n, x1b …)."""
    def one(m: re.Match[str]) -> str:
        c = m.group()
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return _UNPRINTABLE.sub(one, text)


class TextFormatter(logging.Formatter):
    """`time level logger message key=value …`, one line per record (plus a traceback)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: D102, N802
        record.message = escape(_bounded(record.message))
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        head, sep, trace = line.partition("\n")  # the traceback, if any, stays below
        return head + "".join(f" {k}={escape(str(v))}" for k, v in extras.items()) + sep + trace


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the structured fields and,
    with tracing on (`service.tracing`), the trace and span ids of the span it was logged in."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        body = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": _bounded(record.getMessage()), **_extras(record)}
        ids = tracing.current_ids()
        if ids is not None:
            body["trace_id"], body["span_id"] = ids
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text", ort_severity: int = 3) -> None:
    """Configure the root logger (`fmt`: "text" or "json") and ONNX Runtime's default log
    severity (`ort_severity`: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal), which every
    session uses that sets none, e.g. those onnxruntime.quantization opens: its graph
    optimizer's notes ("Removing initializer …") are warnings, not news for a user."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler],
                        force=True)
    # MLflow's own INFO lines ("Registered model … already exists", creating tables) are
    # about its bookkeeping, not this program's work.
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Every library's lines through this one handler: uvicorn's loggers keep handlers of
    # their own (plain text) when anything set them up.
    for own in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(own).handlers.clear()
        logging.getLogger(own).propagate = True
    try:
        import onnxruntime
    except ImportError:  # a gateway-only install
        return
    onnxruntime.set_default_logger_severity(ort_severity)
