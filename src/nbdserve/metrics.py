"""Per-export counters, and a Prometheus endpoint that reads them at scrape time.

The hot path only increments integers in preallocated lists; latency is timed only
when the endpoint is enabled. prometheus-client turns the numbers into the exposition
format in its own thread, so a scrape never runs on the event loop.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable

from nbdserve.protocol import constants as c

log = logging.getLogger("nbdserve.metrics")

COMMANDS = [c.COMMAND_NAMES[i] for i in range(8)] + ["OTHER"]
OTHER = 8
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ExportStats:
    """Counters of one export, shared by its connections."""

    __slots__ = ("requests", "errors", "bytes_read", "bytes_written", "timing",
                 "latency_counts", "latency_sum")

    def __init__(self) -> None:
        self.requests = [0] * len(COMMANDS)
        self.errors = [0] * len(COMMANDS)
        self.bytes_read = 0
        self.bytes_written = 0
        self.timing = False  # set when the metrics endpoint is on
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


def start_metrics_server(host: str, port: int, exports: Callable[[], Iterable],
                         accepted: Callable[[], int]):
    """Serve /metrics on host:port; returns the HTTP server (closed at shutdown)."""
    from prometheus_client import start_http_server
    from prometheus_client.core import (
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    class Collector:
        def collect(self):
            requests = CounterMetricFamily("nbdserve_requests", "NBD requests received",
                                           labels=["export", "command"])
            errors = CounterMetricFamily("nbdserve_request_errors",
                                         "NBD requests answered with an error",
                                         labels=["export", "command"])
            read = CounterMetricFamily("nbdserve_read_bytes", "Bytes read by clients",
                                       labels=["export"])
            written = CounterMetricFamily("nbdserve_written_bytes",
                                          "Bytes written by clients", labels=["export"])
            latency = HistogramMetricFamily("nbdserve_request_duration_seconds",
                                            "Time from request to reply", labels=["export"])
            connections = GaugeMetricFamily("nbdserve_connections",
                                            "Connections in transmission", labels=["export"])
            dirty = GaugeMetricFamily("nbdserve_bitmap_dirty_bytes",
                                      "Dirty bytes recorded in a bitmap",
                                      labels=["export", "bitmap"])
            preserved = GaugeMetricFamily(
                "nbdserve_snapshot_preserved_bytes",
                "Bytes of the live image a snapshot copied before they were overwritten",
                labels=["export", "snapshot"])
            scratch = GaugeMetricFamily("nbdserve_snapshot_scratch_bytes",
                                        "Disk space a snapshot's scratch file takes",
                                        labels=["export", "snapshot"])
            broken = GaugeMetricFamily("nbdserve_snapshot_broken",
                                       "1 when a snapshot broke (a copy-before-write "
                                       "failed), else 0", labels=["export", "snapshot"])
            for export in exports():
                stats = export.stats
                for index, name in enumerate(COMMANDS):
                    if stats.requests[index]:
                        requests.add_metric([export.name, name], stats.requests[index])
                    if stats.errors[index]:
                        errors.add_metric([export.name, name], stats.errors[index])
                read.add_metric([export.name], stats.bytes_read)
                written.add_metric([export.name], stats.bytes_written)
                cumulative, buckets = 0, []
                for bound, count in zip([*LATENCY_BUCKETS, float("inf")],
                                        stats.latency_counts, strict=True):
                    cumulative += count
                    buckets.append((repr(bound) if bound != float("inf") else "+Inf",
                                    cumulative))
                latency.add_metric([export.name], buckets, stats.latency_sum)
                connections.add_metric([export.name], export.connections)
                if export.tracker is not None:
                    for bitmap in export.tracker.query():
                        dirty.add_metric([export.name, bitmap["name"]], bitmap["count"])
                snapshot = getattr(export, "snapshot", None)
                if snapshot is not None:
                    labels = [export.parent.name, export.name]
                    preserved.add_metric(labels, snapshot.preserved_bytes)
                    scratch.add_metric(labels, snapshot.scratch_bytes())
                    broken.add_metric(labels, 1 if snapshot.broken else 0)
            accepted_total = CounterMetricFamily("nbdserve_connections_accepted",
                                                 "Connections accepted since start")
            accepted_total.add_metric([], accepted())
            yield from (requests, errors, read, written, latency, connections, dirty,
                        preserved, scratch, broken, accepted_total)

    registry = CollectorRegistry()
    registry.register(Collector())
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
