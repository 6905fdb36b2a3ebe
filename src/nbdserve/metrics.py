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
        # Per command (COMMANDS' order): a count per bucket, and the sum.
        self.latency_counts = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in COMMANDS]
        self.latency_sum = [0.0] * len(COMMANDS)

    def observe(self, command: int, seconds: float) -> None:
        index = command if command < OTHER else OTHER
        self.latency_counts[index][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum[index] += seconds


BITMAP_FLAGS = (  # (key in the bitmap's info, help): gauges nbdserve_bitmap_KEY, 1 or 0
    ("inconsistent", "1 when a bitmap is inconsistent (all dirty, not exported), else 0"),
    ("busy", "1 while a connection exports the bitmap, else 0"),
    ("recording", "1 when a bitmap records writes, else 0"),
)
MIGRATION_GAUGES = (  # (key, name, help) of the per-export migration gauges
    ("remaining", "nbdserve_migration_remaining_bytes",
     "Dirty bytes a migration has still to send"),
    ("sent", "nbdserve_migration_sent_bytes",
     "Image bytes a migration sent (data, passes included)"),
    ("pause", "nbdserve_migration_pause_seconds", "The pause of a migration's switchover"),
    ("waiting", "nbdserve_incoming_migration_waiting",
     "1 while an export waits for (or receives) a migration"),
    ("received", "nbdserve_incoming_migration_received_bytes",
     "Image bytes received by an incoming migration"),
)


class HandshakeFailures:
    """Handshakes that did not reach transmission, by reason (counted off the hot
    path, once per connection)."""

    REASONS = ("timeout", "refused", "aborted", "closed", "tls-handshake", "tls-subject",
               "error")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.REASONS, 0)

    def count(self, reason: str) -> None:
        self.counts[reason] += 1


HANDSHAKE_FAILURES = HandshakeFailures()


def start_metrics_server(host: str, port: int, exports: Callable[[], Iterable],
                         accepted: Callable[[], int],
                         migrations: Callable[[], tuple] = lambda: (None, []),
                         replayed: Callable[[], int] = lambda: 0):
    """Serve /metrics on host:port; returns the HTTP server (closed at shutdown).
    ``migrations`` gives the latest outgoing migration's describe() (or None) and the
    incoming ones'; ``replayed``, the handshakes answered from the table of earlier
    ones (protocol/replay.py)."""
    from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR, start_http_server
    from prometheus_client.core import (
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    from nbdserve import __version__

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
                                            "Time from request to reply",
                                            labels=["export", "command"])
            size = GaugeMetricFamily("nbdserve_export_size_bytes", "Size of the export",
                                     labels=["export"])
            connections = GaugeMetricFamily("nbdserve_connections",
                                            "Connections in transmission", labels=["export"])
            dirty = GaugeMetricFamily("nbdserve_bitmap_dirty_bytes",
                                      "Dirty bytes recorded in a bitmap",
                                      labels=["export", "bitmap"])
            flags = {key: GaugeMetricFamily(f"nbdserve_bitmap_{key}", text,
                                            labels=["export", "bitmap"])
                     for key, text in BITMAP_FLAGS}
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
                for index, name in enumerate(COMMANDS):
                    counts = stats.latency_counts[index]
                    if not any(counts):
                        continue
                    cumulative, buckets = 0, []
                    for bound, count in zip([*LATENCY_BUCKETS, float("inf")], counts,
                                            strict=True):
                        cumulative += count
                        buckets.append((repr(bound) if bound != float("inf") else "+Inf",
                                        cumulative))
                    latency.add_metric([export.name, name], buckets, stats.latency_sum[index])
                size.add_metric([export.name], export.size)
                connections.add_metric([export.name], export.connections)
                if export.tracker is not None:
                    for bitmap in export.tracker.query():
                        labels = [export.name, bitmap["name"]]
                        dirty.add_metric(labels, bitmap["count"])
                        for key, gauge in flags.items():
                            gauge.add_metric(labels, int(bitmap[key]))
                snapshot = getattr(export, "snapshot", None)
                if snapshot is not None:
                    labels = [export.parent.name, export.name]
                    preserved.add_metric(labels, snapshot.preserved_bytes)
                    scratch.add_metric(labels, snapshot.scratch_bytes())
                    broken.add_metric(labels, 1 if snapshot.broken else 0)
            accepted_total = CounterMetricFamily("nbdserve_connections_accepted",
                                                 "Connections accepted since start")
            accepted_total.add_metric([], accepted())
            replayed_total = CounterMetricFamily(
                "nbdserve_handshakes_replayed",
                "Handshakes answered from the table of earlier ones (docs/protocol.md)")
            replayed_total.add_metric([], replayed())
            failed = CounterMetricFamily("nbdserve_handshake_failures",
                                         "Handshakes that did not reach transmission",
                                         labels=["reason"])
            for reason, count in HANDSHAKE_FAILURES.counts.items():
                failed.add_metric([reason], count)
            build = InfoMetricFamily("nbdserve_build", "The running nbdserve")
            build.add_metric([], {"version": __version__})
            yield from (requests, errors, read, written, latency, size, connections, dirty,
                        *flags.values(), preserved, scratch, broken,
                        accepted_total, replayed_total, failed, build,
                        *migration_metrics(*migrations()))

    def migration_metrics(outgoing: dict | None, incoming: list[dict]):
        phase = GaugeMetricFamily(
            "nbdserve_migration_phase",
            "1 for the phase the latest migration from here is in (or ended in)",
            labels=["export", "target", "phase"])
        gauges = {key: GaugeMetricFamily(name, text, labels=["export"])
                  for key, name, text in MIGRATION_GAUGES}
        if outgoing is not None:
            export = [outgoing["export"]]
            phase.add_metric([*export, outgoing["target"], outgoing["phase"]], 1)
            gauges["remaining"].add_metric(export, outgoing["remaining-bytes"])
            gauges["sent"].add_metric(export, outgoing["data-bytes"])
            gauges["pause"].add_metric(export, outgoing["pause-ms"] / 1000)
        for entry in incoming:
            gauges["waiting"].add_metric([entry["export"]], int(entry["state"] != "completed"))
            gauges["received"].add_metric([entry["export"]], entry["received-bytes"])
        return phase, *gauges.values()

    registry = CollectorRegistry()
    registry.register(Collector())
    # RSS, open fds, start time, CPU (process_*), and the Python version (python_info).
    registry.register(PROCESS_COLLECTOR)
    registry.register(PLATFORM_COLLECTOR)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
