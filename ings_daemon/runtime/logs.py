"""Structured logs: one JSON object per line, one line per event of note.

Secrets never reach a log line: settings hold them as `SecretStr`, and nothing here
formats settings wholesale.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("ings")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter (aiokafka's coordinator, chroma's telemetry) is not events of note.
    for noisy in ("aiokafka", "kafka", "chromadb", "httpx", "urllib3", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def event(name: str, level: int = logging.INFO, exc: BaseException | None = None, **fields: Any) -> None:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


def describe(exc: BaseException | None, limit: int = 300) -> str:
    """`ExcType: message`, cut to `limit` characters, for a log field or a reason."""
    return f"{type(exc).__name__}: {exc}"[:limit] if exc is not None else "unknown"
