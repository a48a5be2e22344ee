"""Log set-up: one logfmt line per event (`ts=... level=info event=job.done job=x ms=12.3`) on stderr.

On a terminal the worker's tqdm progress bars share stderr with these lines: each line is then written through
tqdm (bars cleared, the line written whole, bars drawn again), so a line never lands on the end of a bar.
Without a terminal there are no bars, and lines go straight to the stream.
"""

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


class BarSafeHandler(logging.StreamHandler):
    """Writes each record with tqdm.write: the progress bars on the same terminal are cleared first, then redrawn."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:  # as logging.StreamHandler does
            raise
        except Exception:
            self.handleError(record)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def setup(level: str = "info") -> None:
    """Log records at `level` and above as logfmt lines on stderr, around the progress bars on a terminal."""
    handler = BarSafeHandler(sys.stderr) if _is_terminal(sys.stderr) else logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    for noisy in ("watchdog", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
