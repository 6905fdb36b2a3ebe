"""Log lines: text or JSON on stderr, and, when stderr is the journal, with the
syslog priority of each line in front (sd-daemon's `<N>` prefixes), so that
`journalctl -p err` finds errors. systemd says stderr is the journal by setting
JOURNAL_STREAM to the device and inode of that stream (systemd.exec(5)).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

# Python's levels as syslog priorities (sd-daemon(3)).
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
              logging.DEBUG: 7}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors: the time in UTC with
    milliseconds and its offset (RFC 3339)."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry = {"time": when.isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name,
                 "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class JournalPrefix(logging.Formatter):
    """Another formatter's lines, each behind its priority: `<3>...`. A multi-line
    record (a traceback) keeps its priority on every line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def stderr_is_journal() -> bool:
    """JOURNAL_STREAM names stderr (it is inherited by children that may write
    elsewhere, so the device and inode must match)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(
        "nbdserve[%(process)d]: %(levelname)s: %(message)s")
    if stderr_is_journal():
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
