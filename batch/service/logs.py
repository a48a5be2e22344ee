"""Log set-up: one logfmt line per event (`ts=... level=info event=job.done job=x ms=12.3`) on stderr."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        fields: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
        event = getattr(record, "event", None)
        if event:
            fields["event"] = event
            fields.update(getattr(record, "fields", {}))
        else:
            fields["msg"] = record.getMessage()
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def _quote(value: Any) -> str:
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    logger.log(level, name, extra={"event": name, "fields": fields})


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    for noisy in ("watchdog", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
