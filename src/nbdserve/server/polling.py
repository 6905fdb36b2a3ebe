"""Adaptive busy-polling of a connection before it sleeps, as QEMU's event loop does
(poll-max-ns).

A client with one request in flight sends the next one a few tens of microseconds
after its reply. Sleeping in epoll in between costs a context switch and, in a VM, an
exit from idle for every request: at queue depth 1 that was most of the latency. So
the connection first watches its socket for a short window. The window adapts:

- a wait that ended within the window needs no change;
- a wait longer than the maximum window means polling would only burn CPU: stop;
- a wait that a longer window (up to the maximum) would have caught: double it.

An idle connection polls at most once (one window), then sleeps as usual. Polling
happens only while a single connection is in transmission and has nothing in flight:
the spin holds the event loop, and any other work must not wait behind it.
"""

from __future__ import annotations

import os
import select
import time

FIRST_WINDOW_NS = 4_000


class Census:
    """Server-wide: how many connections are in the transmission phase, and the
    largest polling window allowed (0: never poll)."""

    def __init__(self, poll_max_ns: int = 0) -> None:
        self.transmitting = 0
        self.poll_max_ns = 0
        self.set_poll_max(poll_max_ns)

    def set_poll_max(self, poll_max_ns: int) -> None:
        """For connections from now on. With one CPU the client cannot run while we
        spin, so polling would only delay it: it stays off."""
        self.poll_max_ns = poll_max_ns if len(os.sched_getaffinity(0)) > 1 else 0


class Poller:
    """The polling window of one connection's socket."""

    def __init__(self, fd: int, census: Census) -> None:
        self.census = census
        self.max_ns = census.poll_max_ns
        self.window_ns = 0
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def allowed(self, busy: bool) -> bool:
        return not busy and self.census.transmitting == 1

    def spin(self, started_ns: int) -> None:
        """Watch the socket for up to the window; return early once it is readable
        (or closed). The event loop then finds it ready and does not sleep."""
        if not self.window_ns:
            return
        clock = time.perf_counter_ns
        deadline = started_ns + self.window_ns
        poll = self._poll.poll
        while clock() < deadline:
            if poll(0):
                return

    def adapt(self, waited_ns: int) -> None:
        """Resize the window after a wait of waited_ns (polling included)."""
        if waited_ns <= self.window_ns:
            return
        if waited_ns > self.max_ns:
            self.window_ns = 0
        elif self.window_ns < self.max_ns:
            self.window_ns = min(self.window_ns * 2 or FIRST_WINDOW_NS, self.max_ns)
