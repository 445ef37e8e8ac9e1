"""Logging: JSON lines (one object per event) or human-readable text, always redacted."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from proxy.redact import redact


class RedactingFormatter(logging.Formatter):
    """Second line of defence: whatever a message holds, secrets are masked on the way out."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), limit=8000)


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker  # --workers: which process wrote the line

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage(), limit=4000),
        }
        if self.worker is not None:
            event["worker"] = self.worker
        if record.exc_info:
            event["error"] = redact(self.formatException(record.exc_info), limit=4000)
        return json.dumps(event, ensure_ascii=False)


def setup_logging(level: str, log_format: str, worker: str | None = None) -> None:
    """`worker`: under --workers, each line says which process wrote it (a worker's
    number, or "supervisor")."""
    handler = logging.StreamHandler(sys.stderr)
    text_format = "%(asctime)s %(levelname)s %(name)s: %(message)s" if worker is None \
        else f"%(asctime)s %(levelname)s worker={worker} %(name)s: %(message)s"
    handler.setFormatter(JsonFormatter(worker) if log_format == "json"
                         else RedactingFormatter(text_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level != "debug":
        # mitmproxy narrates every connection at info level, azure-identity every token call.
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
        logging.getLogger("azure").setLevel(logging.WARNING)
