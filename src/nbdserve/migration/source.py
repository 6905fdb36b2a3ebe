"""The source of a migration: copy a served export, and its dirty bitmaps, to another
nbdserve while clients go on using it; then switch over in a short pause.

Phases (``Phase``), in a thread of their own:

- setup: connect (TLS when the server has certificates), HELLO, WELCOME; bitmap
  operations and snapshots are refused from here on; the tracker follows the export.
- bulk: every allocated run of the image goes as DATA; holes are not sent (the
  target starts empty). Then every bitmap, whole (BITMAPS, BITS).
- dirty: pass after pass, what changed meanwhile, until what is left would take no
  more than --max-downtime at the rate measured so far (or MAX_PASSES: then the
  migration fails and the source serves on, unchanged).
- switchover: the export's gate closes (changes under way finish, new ones wait);
  the last dirty regions, then the bitmaps' bits where writes landed since they were
  sent; SWITCHOVER, READY (the target made it durable). The source's QDB file is
  closed marked "moved" (the commit point), GO, DONE; the export's verbs now go to
  the target (remote.py) and the gate opens.
- completed, or failed / cancelled (before the commit point: nothing changed here).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable

from bitarray.util import intervals

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.bitmaps.qdb import QdbContents, write_qdb
from nbdserve.bitmaps.store import BitmapStore, default_qdb_path
from nbdserve.config import ConfigError, ListenAddress, parse_listen
from nbdserve.export import Export
from nbdserve.migration import stream
from nbdserve.migration.channel import Channel
from nbdserve.migration.remote import ForwardedTracker, LostTarget, RemoteImage
from nbdserve.migration.stream import BitmapMeta, ChannelError, Kind
from nbdserve.migration.tracking import MigrationTracker

log = logging.getLogger("nbdserve.migration")

CHUNK = 4 << 20  # bytes per DATA message
SMALL_REGION = 256 << 10  # dirty regions up to this are read whole, holes or not
_ZEROS = bytes(SMALL_REGION)
BITS_CHUNK = 8 << 20  # granules per BITS message of a whole bitmap
MAX_PASSES = 30  # dirty passes before giving up
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 60.0  # READY may wait for the target's fdatasync
FORWARD_RETRIES = 20  # attempts, 0.25 s apart, to reach the target's export after DONE
DEFAULT_MAX_DOWNTIME_MS = 300  # QEMU's downtime-limit default
RATE_GUESS = 20e6  # bytes/s of a pass, and of the target's sync, until one is measured
FIXED_STEPS_MS = 25  # the pause's other steps (bitmaps, QDB files, the target's start,
# a sync's own latency): 15-25 ms here


class Phase(enum.Enum):
    SETUP = "setup"
    BULK = "bulk"
    DIRTY = "dirty"
    SWITCHOVER = "switchover"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED)


class Cancelled(Exception):
    pass


class MigrationError(Exception):
    """The migration cannot start; the message is for the operator."""


class Migration:
    def __init__(self, export: Export, address: ListenAddress, *,
                 max_downtime_ms: int = DEFAULT_MAX_DOWNTIME_MS, bandwidth: int = 0,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 forward_tls: ssl.SSLContext | None = None,
                 moved: Callable[[Export, str], None] = lambda export, where: None) -> None:
        self.export = export
        self.address = address
        self.max_downtime_ms = max_downtime_ms
        self.bandwidth = bandwidth  # bytes/s, 0 for no limit
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.forward_tls = forward_tls  # for the forwarding NBD connection
        self.moved = moved  # the server takes the export out of its catalog
        self.phase = Phase.SETUP
        self.error = ""
        self.passes = 0
        self.data_bytes = 0  # image bytes sent as DATA
        self.zero_bytes = 0  # image bytes sent as ZERO (a few bytes each)
        self.remaining_bytes = export.size
        self.rate = 0.0  # bytes/s measured over the copy so far
        self.bitmap_bytes = 0  # bits sent before the pause
        self.pause_bitmap_bytes = 0  # bits sent in the pause
        self.pause_data_bytes = 0
        self.pause_ms = 0.0  # gate closed to gate open
        self.quiesce_ms = 0.0  # closing the gate: changes under way finishing
        self.pause_steps: dict[str, float] = {}
        self._step_started = 0.0
        self.started = time.time()
        self.finished = 0.0
        self.done = threading.Event()
        self._cancel = threading.Event()
        self._copy_started = 0.0
        self._copied = 0
        self._slept = 0.0  # seconds the copy slept to keep to --bandwidth
        self.pass_rate = 0.0  # bytes/s of the latest dirty pass
        self.sync_rate = RATE_GUESS  # bytes/s the target's latest SYNC made durable
        self._synced_at = 0  # _copied at the latest SYNC
        self.tracker = MigrationTracker(export.size)
        self.channel: Channel | None = None
        self.target_export = export.name
        self.target_listeners: list[ListenAddress] = []
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"nbdserve-migrate-{export.name}")

    # -- control -------------------------------------------------------------------------

    def start(self) -> None:
        export = self.export
        store = self._store()
        if store is not None and store.frozen:
            raise MigrationError(store.frozen)
        export.migrating = True
        if store is not None:
            store.frozen = "a migration of this export is under way; bitmap operations " \
                           "are refused until it ends"
        export.followers = export.followers + (self.tracker,)
        log.info("migrating export %r to %s", export.name, self.address)
        self._thread.start()

    def cancel(self) -> bool:
        """Ask the migration to stop; False when it is past the commit point."""
        if self.phase in FINISHED or self.phase == Phase.SWITCHOVER:
            return False
        self._cancel.set()
        return True

    def describe(self) -> dict:
        now = self.finished or time.time()
        rate = self.pass_rate or RATE_GUESS
        expected = (self.remaining_bytes / rate + self.remaining_bytes / self.sync_rate) \
            * 1000 + FIXED_STEPS_MS
        return {
            "export": self.export.name, "target": str(self.address),
            "phase": self.phase.value, "error": self.error,
            "size": self.export.size, "passes": self.passes,
            "data-bytes": self.data_bytes, "zero-bytes": self.zero_bytes,
            "channel-bytes": self.channel.sent_bytes if self.channel else 0,
            "remaining-bytes": self.remaining_bytes, "rate": round(self.rate),
            "expected-downtime-ms": round(expected, 1),
            "max-downtime-ms": self.max_downtime_ms, "bandwidth": self.bandwidth,
            "bitmap-bytes": self.bitmap_bytes,
            "pause-data-bytes": self.pause_data_bytes,
            "pause-bitmap-bytes": self.pause_bitmap_bytes,
            "pause-ms": round(self.pause_ms, 2), "quiesce-ms": round(self.quiesce_ms, 2),
            "pause-steps": self.pause_steps,
            "elapsed-s": round(now - self.started, 3),
        }

    def _store(self) -> BitmapStore | None:
        tracker = self.export.tracker
        return tracker if isinstance(tracker, BitmapStore) else None

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connect()
            self._copy()
            self._switchover()
            self.phase = Phase.COMPLETED
            log.info("migration of export %r to %s completed: %d passes, %.1f ms pause",
                     self.export.name, self.address, self.passes, self.pause_ms)
        except Cancelled:
            self._give_up(Phase.CANCELLED, "cancelled")
        except Exception as exc:  # any failure before the commit point: serve on
            self._give_up(Phase.FAILED, _describe_error(exc))
        finally:
            if self.channel is not None:
                self.channel.close()
            self.finished = time.time()
            self.done.set()

    def _give_up(self, phase: Phase, reason: str) -> None:
        export = self.export
        export.followers = tuple(f for f in export.followers if f is not self.tracker)
        export.migrating = False
        store = self._store()
        if store is not None:
            store.frozen = ""
        if self.channel is not None:
            self.channel.abort(reason)
        self.error = reason
        self.phase = phase
        log.error("migration of export %r to %s %s: %s; the export is served here as "
                  "before", export.name, self.address,
                  "cancelled" if phase == Phase.CANCELLED else "failed", reason)

    def _connect(self) -> None:
        address = self.address
        try:
            if address.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(address.path)
            else:
                sock = socket.create_connection((address.host, address.port),
                                                timeout=CONNECT_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise MigrationError(f"cannot reach the target at {address}: "
                                 f"{_describe_error(exc)}") from None
        sock.settimeout(REPLY_TIMEOUT)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_hostname=self.server_hostname or address.host)
        self.channel = Channel(sock)
        self.channel.send(stream.encode_meta(Kind.HELLO, {
            "protocol": stream.PROTOCOL_VERSION, "export": self.export.name,
            "size": self.export.size}))
        welcome = self.channel.expect(Kind.WELCOME).meta()
        welcome = welcome if isinstance(welcome, dict) else {}
        self.target_export = str(welcome.get("export", self.export.name))
        self.target_listeners = nbd_addresses(welcome.get("listen"), self.address)

    def _copy(self) -> None:
        """Bulk copy, the bitmaps, then dirty passes until the rest fits the pause."""
        self.phase = Phase.BULK
        self._copy_started = time.monotonic()
        self.tracker.take()  # everything is copied now: earlier marks are moot
        self._send_allocated(0, self.export.size, holes=False)
        self._send_bitmaps()
        self.phase = Phase.DIRTY
        self._sync(measure=False)  # the bulk's writeback drains here, not in the pause
        while True:
            self.remaining_bytes = self.tracker.dirty_bytes()
            if self.remaining_bytes <= self._pause_budget():
                return
            if self.passes >= MAX_PASSES:
                raise MigrationError(
                    f"did not converge in {MAX_PASSES} passes: {self.remaining_bytes} bytes "
                    f"still dirty at {(self.pass_rate or RATE_GUESS) / 1e6:.1f} MB/s, and "
                    f"the target's disk syncing {self.sync_rate / 1e6:.1f} MB/s, would "
                    f"pause longer than {self.max_downtime_ms} ms (raise --max-downtime, "
                    "or migrate when the disk is quieter)")
            self.passes += 1
            self._send_dirty(self.tracker.take(), throttle=True)
            self._sync()

    def _sync(self, measure: bool = True) -> None:
        """The target makes what it has durable now (SYNC), so the pause syncs only
        what the pause sends; how fast that went after a pass sizes the pause (after
        the bulk copy, sequential writes would promise too much)."""
        started = time.monotonic()
        self.channel.send(stream.encode(Kind.SYNC))
        self.channel.expect(Kind.SYNCED)
        took = time.monotonic() - started
        synced = self._copied - self._synced_at
        self._synced_at = self._copied
        if measure and synced >= 256 << 10 and took > 0:
            self.sync_rate = synced / took  # (its fixed cost included: conservative)

    def _pause_budget(self) -> float:
        """Dirty bytes the pause may send: it sends them at the latest pass's rate,
        the target then writes them to disk at the latest SYNC's rate, and the other
        steps (bitmaps, QDB files, the target's start) take about FIXED_STEPS_MS."""
        left = (self.max_downtime_ms - FIXED_STEPS_MS) / 1000
        seconds_per_byte = 1 / (self.pass_rate or RATE_GUESS) + 1 / self.sync_rate
        return max(left, 0.0) / seconds_per_byte

    def _send_dirty(self, dirty, *, throttle: bool) -> int:
        """A pass: the regions marked in dirty. Its rate (scattered small regions cost
        more per byte than the bulk copy's large runs) sizes the pause from now on."""
        started, slept = time.monotonic(), self._slept
        sent = 0
        for offset, length in dirty.set_ranges():
            sent += self._send_allocated(offset, length, holes=True, throttle=throttle)
        self.channel.flush()
        busy = time.monotonic() - started - (self._slept - slept)
        if sent >= 1 << 20 and busy > 0:
            self.pass_rate = sent / busy
        return sent

    def _send_allocated(self, offset: int, length: int, *, holes: bool,
                        throttle: bool = True) -> int:
        """[offset, offset+length) as DATA where the image has data, and as ZERO where
        it has holes (``holes``: the target may have data there by now)."""
        image = self.export.image
        channel = self.channel
        if holes and length <= SMALL_REGION:
            # A pass's typical region (a few KiB): reading it costs less than asking
            # where its holes are; all zeros go as ZERO, which the target punches.
            self._check_cancel()
            data = image.pread(offset, length)
            if _ZEROS.startswith(data):
                channel.queue(stream.encode(Kind.ZERO, offset, length))
                self.zero_bytes += length
                return 0
            channel.queue_data(offset, data)
            self.data_bytes += length
            self._measured(length, throttle)
            return length
        end = offset + length
        sent = 0
        while offset < end:
            runs = list(image.allocation(offset, end - offset, 1024)) or [(end - offset, True)]
            for run, is_data in runs:
                if not is_data:
                    if holes:
                        channel.queue(stream.encode(Kind.ZERO, offset, run))
                        self.zero_bytes += run
                    offset += run
                    continue
                stop = offset + run
                while offset < stop:
                    self._check_cancel()
                    count = min(CHUNK, stop - offset)
                    channel.queue_data(offset, image.pread(offset, count))
                    offset += count
                    sent += count
                    self.data_bytes += count
                    self._measured(count, throttle)
        return sent

    def _measured(self, count: int, throttle: bool) -> None:
        """Count a chunk sent; sleep if ahead of --bandwidth. The rate is what the
        copy reaches when it does not sleep (what the pause, never limited, gets)."""
        self._copied += count
        now = time.monotonic()
        busy = now - self._copy_started - self._slept
        if busy > 0:
            self.rate = self._copied / busy
        if throttle and self.bandwidth:
            ahead = self._copied / self.bandwidth - (now - self._copy_started)
            if ahead > 0:
                time.sleep(ahead)
                self._slept += ahead

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled

    # -- bitmaps ---------------------------------------------------------------------------

    def _send_bitmaps(self) -> None:
        """Every bitmap, whole. Marks after this are tracked for the pause."""
        store = self._store()
        if store is None:
            self.channel.send(stream.encode_meta(Kind.BITMAPS, []))
            return
        self.tracker.bitmaps_sent()
        stored = store.stored(copy=True)
        before = self.channel.sent_bytes
        self.channel.send(stream.encode_meta(Kind.BITMAPS, [
            BitmapMeta(b.name, b.granularity_bits, b.generation, b.recording,
                       b.inconsistent, len(b.bits)).as_json() for b in stored]))
        for index, bitmap in enumerate(stored):
            for first in range(0, len(bitmap.bits), BITS_CHUNK):
                self._check_cancel()
                self.channel.send(stream.bits_message(index, bitmap.bits, first,
                                                      first + BITS_CHUNK))
        self.bitmap_bytes = self.channel.sent_bytes - before

    def _send_bitmap_changes(self) -> int:
        """In the pause: each bitmap's bits where writes landed since it was sent."""
        store = self._store()
        if store is None:
            return 0
        changed = self.tracker.since_bitmaps
        by_shift: dict[int, list[tuple[int, int]]] = {}
        messages = []
        with store.lock:
            for index, bitmap in enumerate(store.bitmaps.values()):
                shift = bitmap.granularity_bits
                if shift not in by_shift:
                    by_shift[shift] = changed_bytes(changed, shift)
                bits = bitmap.bitmap.bits
                for start, stop in by_shift[shift]:
                    messages.append(stream.bits_message(index, bits, start * 8, stop * 8))
        data = b"".join(messages)
        self.channel.send(data)
        return len(data)

    # -- switchover ------------------------------------------------------------------------

    def _switchover(self) -> None:
        """The pause. The source's QDB file is marked "moved" in a thread while the
        last data goes and the target makes it durable (the two fsyncs overlap); GO
        waits for both. If the target fails before READY, the mark is taken back."""
        export = self.export
        closing = time.monotonic()
        with export.gate.paused():
            paused = self._step_started = time.monotonic()
            self.quiesce_ms = (paused - closing) * 1000
            self.phase = Phase.SWITCHOVER
            step = self._pause_step
            contexts = list(export.meta_contexts())
            marking = _Background(self._mark_moved)
            try:
                self.pause_data_bytes = self._send_dirty(self.tracker.take(), throttle=False)
                step("data")
                self.pause_bitmap_bytes = self._send_bitmap_changes()
                step("bitmaps")
                self.remaining_bytes = 0
                self.channel.send(stream.encode(Kind.SWITCHOVER))
                self.channel.expect(Kind.READY)
                step("target durable")
                marking.result()  # the commit point: this copy is marked stale
                step("source marked moved")
            except BaseException:
                self.phase = Phase.DIRTY  # not committed: _give_up restores the rest
                self._unmark_moved(marking)
                raise
            self._commit(contexts)
            self.pause_ms = (time.monotonic() - closing) * 1000

    def _pause_step(self, name: str) -> None:
        """How long each step of the pause took (ms; migrate status --json)."""
        now = time.monotonic()
        self.pause_steps[name] = round((now - self._step_started) * 1000, 2)
        self._step_started = now

    def _mark_moved(self) -> None:
        """This side stops recording, and its QDB file says the image moved. (In the
        pause: no change is under way, and none starts.)"""
        export = self.export
        export.followers = ()
        export.recorder = None
        export.watch = None
        store = self._store()
        if export.read_only:
            if store is not None:
                store.close()  # nothing was written here: this copy is not stale
        elif store is not None:
            store.close(moved=True)
        else:
            image = export.image
            write_qdb(default_qdb_path(image.path),
                      QdbContents(identity=image.identity(), migration="moved"))

    def _unmark_moved(self, marking: _Background) -> None:
        """The target failed before READY: the export records here again, as before
        (its bitmaps reopened from the file just saved, the mark cleared)."""
        try:
            marking.result()
        except Exception as exc:  # noqa: BLE001 (the mark may not have been written)
            log.warning("migration of export %r: marking it moved failed: %s",
                        self.export.name, _describe_error(exc))
        export = self.export
        store = self._store()
        if store is not None and store.closed:
            reopened = BitmapStore.open(store.qdb_path, store.image_size, store.identity,
                                        read_only=store.read_only)
            reopened.frozen = store.frozen
            export.tracker = reopened
            export.recorder = reopened.recorder
            export.watch = reopened.watch_image(export.image.fd)
            if export.watch is not None:
                export.watch.under_way = export.gate.active
        elif store is None and not export.read_only:  # the "moved" file written here
            with contextlib.suppress(FileNotFoundError):
                os.unlink(default_qdb_path(export.image.path))
        else:
            export.recorder = store.recorder
        export.followers = (self.tracker,)

    def _commit(self, contexts: list[str]) -> None:
        """Past the commit point: the target serves, and the export's verbs go there."""
        export = self.export
        where = str(self.address)
        try:
            self.channel.send(stream.encode(Kind.GO))
            self.channel.expect(Kind.DONE)
        except (OSError, ChannelError) as exc:
            log.error("migration of export %r: the target did not confirm it serves (%s); "
                      "trying to reach it anyway", export.name, _describe_error(exc))
        self._pause_step("target serving")
        remote = self._reach_target()
        self._pause_step("forwarding connected")
        if remote is None:
            export.move_to(LostTarget(where, export.size), ForwardedTracker(None, contexts))
        else:
            export.move_to(remote, ForwardedTracker(remote, contexts))
        self.moved(export, where)

    def _reach_target(self) -> RemoteImage | None:
        """The target's NBD export, for the connections still open here: at the
        first of its listeners (from WELCOME) that answers."""
        export = self.export
        last: Exception | None = None
        for _ in range(FORWARD_RETRIES):
            for address in self.target_listeners:
                try:
                    return RemoteImage(address, self.target_export, export.size,
                                       self.forward_tls, self.server_hostname)
                except Exception as exc:  # noqa: BLE001 (any reason: try on, then report)
                    last = exc
            time.sleep(0.25)
        log.error("export %r moved to %s, but its NBD export cannot be reached there (%s): "
                  "requests on the connections still open here fail with EIO",
                  export.name, self.address, last or "no listener announced")
        return None


class _Background:
    """A function run in a thread of its own; result() waits and raises its error."""

    def __init__(self, function) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True,
                                        name="nbdserve-migrate-mark")
        self._thread.start()

    def _run(self, function) -> None:
        try:
            function()
        except BaseException as exc:  # noqa: BLE001 (handed to result())
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def changed_bytes(changed: Bitmap, granularity_bits: int) -> list[tuple[int, int]]:
    """Which bytes of a bitmap's bits (of that granularity) cover the regions set in
    changed, as [start, stop) runs. A byte of bits covers 8 granules: changed is
    resampled to that, in bitarray's C loops, not per region in Python. Runs closer
    than a message header are merged: one message costs less than two then."""
    runs: list[tuple[int, int]] = []
    for value, start, stop in intervals(changed.resample(granularity_bits + 3)):
        if not value:
            continue
        if runs and start - runs[-1][1] < stream.HEADER.size:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return runs


def nbd_addresses(announced, channel_address: ListenAddress) -> list[ListenAddress]:
    """Where the target serves NBD, from its WELCOME: Unix sockets first when the
    channel is a Unix socket (the same host), and a wildcard TCP host replaced by the
    host the channel reached."""
    addresses = []
    for text in announced if isinstance(announced, list) else []:
        try:
            address = parse_listen(str(text))
        except ConfigError:
            continue
        if address.path is not None:
            if channel_address.path is not None:
                addresses.insert(0, address)
            continue
        if address.host in ("0.0.0.0", "::", "") and channel_address.host:
            address = ListenAddress(channel_address.host, address.port)
        addresses.append(address)
    return addresses


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc) or type(exc).__name__
