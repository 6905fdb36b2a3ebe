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
happens only in the request loop, while a single connection is busy (in
transmission with nothing in flight, and no other connection in its handshake): the
spin holds the event loop, and any other work must not wait behind it. The option
phase does not poll (server/handshake.py says why). When the spin sees the next
request arrive on a plain socket, the requests served from the stream's callbacks
read it at once (NbdStream.receive_now) and go on, without a turn of the event loop
(its wait and its read callback) in between.
"""

from __future__ import annotations

import os
import select
import time

FIRST_WINDOW_NS = 4_000


class Census:
    """Server-wide: how many connections are in the handshake and in transmission,
    and the polling window. The window is the server's, not a connection's: polling
    only ever happens while a single connection is busy, and a short-lived connection
    (a handshake is three round trips) would never grow a window of its own."""

    def __init__(self, poll_max_ns: int = 0) -> None:
        self.handshaking = 0
        self.transmitting = 0
        self.poll_max_ns = 0
        self.window_ns = 0
        self.set_poll_max(poll_max_ns)

    def set_poll_max(self, poll_max_ns: int) -> None:
        """With one CPU the client cannot run while we spin, so polling would only
        delay it: it stays off."""
        self.poll_max_ns = poll_max_ns if len(os.sched_getaffinity(0)) > 1 else 0
        self.window_ns = min(self.window_ns, self.poll_max_ns)

    def alone(self) -> bool:
        """Exactly one connection is busy: nothing else could be held up by a spin."""
        return self.handshaking + self.transmitting == 1

    def adapt(self, waited_ns: int) -> None:
        """Resize the window after a wait of waited_ns (polling included)."""
        if waited_ns <= self.window_ns:
            return
        if waited_ns > self.poll_max_ns:
            self.window_ns = 0
        elif self.window_ns < self.poll_max_ns:
            self.window_ns = min(self.window_ns * 2 or FIRST_WINDOW_NS, self.poll_max_ns)


class Poller:
    """Polls one connection's socket for the server's current window."""

    def __init__(self, fd: int, census: Census) -> None:
        self.census = census
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def allowed(self, busy: bool) -> bool:
        return not busy and self.census.alone()

    def spin(self, started_ns: int) -> bool:
        """Watch the socket for up to the window; return early, True, once it is
        readable (or closed). The caller may then read it at once; if it does not, the
        event loop finds it ready and does not sleep."""
        window = self.census.window_ns
        if not window:
            return False
        clock = time.perf_counter_ns
        deadline = started_ns + window
        poll = self._poll.poll
        while clock() < deadline:
            if poll(0):
                return True
        return False

    def adapt(self, waited_ns: int) -> None:
        self.census.adapt(waited_ns)
