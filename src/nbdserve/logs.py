"""Log lines: text or JSON on stderr, and, when stderr is the journal, with the
syslog priority of each line in front (sd-daemon's `<N>` prefixes), so that
`journalctl -p err` finds errors. systemd says stderr is the journal by setting
JOURNAL_STREAM to the device and inode of that stream (systemd.exec(5)).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import sys
import time

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


class Sampler:
    """Events of one kind (a client connecting) logged one by one at INFO, at most
    ``per_second`` a second; beyond that they are counted, and one line at the end
    of the second says how many were not logged. At DEBUG every one is logged.

    A client that connects thousands of times a second (a monitoring loop, a
    handshake benchmark) would otherwise cost the server a fifth of its time in log
    lines, and make journald drop lines, errors included, once its own rate limit
    (10,000 lines in 30 s by default) is reached.
    """

    def __init__(self, logger: logging.Logger, what: str, per_second: int = 20) -> None:
        self.logger = logger
        self.what = what  # "connections"
        self.per_second = per_second
        self.window_end = 0.0
        self.admitted = 0
        self.skipped = 0

    def admit(self) -> bool:
        """Whether this event is to be logged on its own."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return False
        if logger.isEnabledFor(logging.DEBUG):
            return True
        now = time.monotonic()
        if now >= self.window_end:
            self.window_end = now + 1.0
            self.admitted = 0
        if self.admitted < self.per_second:
            self.admitted += 1
            return True
        if not self.skipped:
            asyncio.get_running_loop().call_later(self.window_end - now, self.report)
        self.skipped += 1
        return False

    def report(self) -> None:
        if self.skipped:
            self.logger.info("%d more %s in the last second, not logged one by one "
                             "(--log-level debug logs each)", self.skipped, self.what)
            self.skipped = 0


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
    # No record needs its caller's file and line, or its thread's and process's
    # names: skipping them is a third of a record's cost (the logging HOWTO's
    # "Optimization" list).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
