"""Adaptive polling: the window's rules, and that it never holds up other work."""

from __future__ import annotations

import os
import socket
import time

import pytest

from nbdserve.server.polling import FIRST_WINDOW_NS, Census, Poller

MAX_NS = 50_000


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def poller(sock, transmitting=1, handshaking=0) -> Poller:
    census = Census()
    census.poll_max_ns = MAX_NS  # whatever this machine's CPU count
    census.transmitting = transmitting
    census.handshaking = handshaking
    return Poller(sock.fileno(), census)


def test_window_grows_while_waits_are_short_and_stops_after_a_long_one(pair):
    census = poller(pair[0]).census
    assert census.window_ns == 0
    census.adapt(10_000)  # a wait a window would have caught: start polling
    assert census.window_ns == FIRST_WINDOW_NS
    census.adapt(10_000)
    census.adapt(10_000)
    assert census.window_ns == 4 * FIRST_WINDOW_NS
    census.adapt(10_000)  # caught within the window: no change
    assert census.window_ns == 4 * FIRST_WINDOW_NS
    for _ in range(10):
        census.adapt(MAX_NS - 1)
    assert census.window_ns == MAX_NS  # never past the maximum
    census.adapt(MAX_NS + 1)  # an idle client: stop spinning at once
    assert census.window_ns == 0


def test_spin_returns_as_soon_as_bytes_arrive(pair):
    a, b = pair
    p = poller(a)
    p.census.window_ns = 10_000_000_000  # far longer than the test may take
    b.send(b"x")
    started = time.perf_counter_ns()
    p.spin(started)
    assert time.perf_counter_ns() - started < 1_000_000_000


def test_spin_gives_up_after_the_window(pair):
    p = poller(pair[0])
    p.census.window_ns = 2_000_000  # 2 ms, nothing arrives
    started = time.perf_counter_ns()
    p.spin(started)
    assert time.perf_counter_ns() - started >= 2_000_000


def test_no_polling_with_other_connections_or_work_in_flight(pair):
    assert poller(pair[0]).allowed(busy=False)
    assert not poller(pair[0]).allowed(busy=True)  # tasks or queued output need the loop
    assert not poller(pair[0], transmitting=2).allowed(busy=False)
    assert not poller(pair[0], handshaking=1).allowed(busy=False)
    assert poller(pair[0], transmitting=0, handshaking=1).allowed(busy=False)


def test_one_cpu_never_polls(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert Census(MAX_NS).poll_max_ns == 0
