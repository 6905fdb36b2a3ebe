"""The target of a migration: an export held back until its image and bitmaps arrive.

``serve IMAGE --incoming ADDRESS`` makes one of these instead of opening the export.
It listens on ADDRESS (TCP, or unix:PATH; TLS when the server has certificates) for one
source at a time, and:

1. on HELLO, marks the QDB file "incoming" (a partial image is never served without
   --force), then empties the image to the source's size: a sparse file, so holes
   cost nothing to send;
2. writes DATA and punches ZERO as they come, and keeps the bitmaps (BITMAPS, BITS)
   in memory; SYNC (just before the pause) makes the data durable ahead of time;
3. on SWITCHOVER (the source is paused), makes the image durable, writes the QDB file
   with the bitmaps received and the image's identity (still marked "incoming"), and
   answers READY;
4. on GO, opens the export as ``serve`` would (saving its bitmaps in use clears the
   mark), hands it to the server, and answers DONE.

A source that vanishes before GO leaves a partial image that waits for the next
source. The conversation's messages are stream.py's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import replace

from bitarray import bitarray

from nbdserve.bitmaps.qdb import QdbContents, StoredBitmap, write_qdb
from nbdserve.bitmaps.store import StoreLocked, default_qdb_path, take_lock
from nbdserve.config import ExportConfig
from nbdserve.export import Export
from nbdserve.image import ImageIdentity, RawImage, path_identity
from nbdserve.migration import stream
from nbdserve.migration.channel import Channel
from nbdserve.migration.stream import BitmapMeta, ChannelError, Kind
from nbdserve.server.listener import describe
from nbdserve.tls import subject_allowed, subject_string

log = logging.getLogger("nbdserve.migration")

ACCEPT_POLL = 0.5  # seconds between looks at the stop flag while waiting for a source
IDLE_TIMEOUT = 120.0  # a source silent this long is gone
WRITEBACK_PERIOD = 0.1  # seconds between looks at how much arrived unsynced
WRITEBACK_BYTES = 32 << 20  # ...and how much makes it sync


class IncomingMigration:
    def __init__(self, settings: ExportConfig, sock: socket.socket,
                 ssl_context: ssl.SSLContext | None,
                 open_export: Callable[[ExportConfig], Export],
                 arrived: Callable[[Export], None],
                 listeners: Callable[[], list[str]] = list,
                 allow_subjects: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.sock = sock
        self.ssl_context = ssl_context
        self.open_export = open_export  # the service's: opens it as serve would
        self.arrived = arrived  # hands the export to the server (thread-safe)
        self.listeners = listeners  # where this server serves NBD (told to the source)
        self.allow_subjects = allow_subjects  # --tls-allow-subject: who may send a disk
        self.qdb_path = settings.qdb or default_qdb_path(settings.image)
        self.state = "waiting"
        self.source = ""
        self.received_bytes = 0
        self.failures = 0
        self.last_error = ""
        self._lock_fd = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"nbdserve-incoming-{settings.name}")

    @property
    def address(self) -> str:
        with contextlib.suppress(OSError):
            return describe(self.sock)  # the port chosen for :0, say
        return str(self.settings.incoming)

    def lock(self) -> None:
        """Hold the QDB file's lock while waiting and receiving, as a server holds it
        while serving: no other process serves this image meanwhile."""
        try:
            self._lock_fd = take_lock(self.qdb_path)
        except StoreLocked as exc:
            raise ChannelError(str(exc)) from None

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def start(self) -> None:
        log.info("export %r waits for an incoming migration on %s", self.settings.name,
                 self.address)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.unlock()
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.settings.incoming.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.settings.incoming.path)

    def describe(self) -> dict:
        return {"export": self.settings.name, "image": self.settings.image,
                "listen": self.address, "state": self.state, "source": self.source,
                "received-bytes": self.received_bytes, "failures": self.failures,
                "last-error": self.last_error}

    # -- accepting sources, one at a time -------------------------------------------------

    def _serve(self) -> None:
        self.sock.settimeout(ACCEPT_POLL)
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.source = str(peer) or "unix socket"
            try:
                channel = Channel(conn)  # closed at the end (the TLS one, if any)
                try:
                    conn.settimeout(IDLE_TIMEOUT)
                    if self.ssl_context is not None:
                        channel.sock = self.ssl_context.wrap_socket(conn, server_side=True)
                        subject = subject_string(channel.sock.getpeercert())
                        if not subject_allowed(subject, self.allow_subjects):
                            raise ChannelError(f"the source's certificate subject "
                                               f"{subject or '(none)'} is not allowed")
                        self.source += f" ({subject})" if subject else ""
                    if self._receive(channel):
                        break  # served now: no more sources
                finally:
                    channel.close()
            except Exception as exc:  # noqa: BLE001 (any failure: wait for another source)
                self.failures += 1
                self.last_error = str(exc) or type(exc).__name__
                self.state = "waiting"
                log.error("incoming migration of export %r from %s failed: %s; the image "
                          "stays partial and waits for another source", self.settings.name,
                          self.source, self.last_error)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _receive(self, channel: Channel) -> bool:
        """One source's conversation; True once the export serves."""
        hello = channel.expect(Kind.HELLO).meta()
        if not isinstance(hello, dict) or hello.get("protocol") != stream.PROTOCOL_VERSION:
            channel.abort(f"unsupported migration protocol {hello!r:.80}")
            raise ChannelError("the source speaks another migration protocol")
        size = hello.get("size")
        if not isinstance(size, int) or size <= 0 or size % 512:
            channel.abort("bad image size")
            raise ChannelError(f"the source announced a bad image size {size!r}")
        log.info("incoming migration of export %r from %s: %d bytes", self.settings.name,
                 self.source, size)
        self.state = "receiving"
        self.received_bytes = 0
        image = self._prepare(size, channel)
        writeback = Writeback(image)
        try:
            channel.send(stream.encode_meta(Kind.WELCOME, {
                "export": self.settings.name, "listen": self.listeners()}))
            with writeback:
                bitmaps = self._receive_image(channel, image, writeback)
            image.flush()
        finally:
            image.close()
        self._commit(bitmaps)
        channel.send(stream.encode(Kind.READY))
        channel.expect(Kind.GO)
        # Opening the bitmaps saves them in use, which clears the "incoming" mark; the
        # store takes the QDB file's lock over from here.
        self.unlock()
        export = self.open_export(replace(self.settings, incoming=None, force=True))
        self.arrived(export)
        self.state = "completed"
        channel.send(stream.encode(Kind.DONE))
        log.info("migration of export %r from %s completed: serving", self.settings.name,
                 self.source)
        return True

    def _prepare(self, size: int, channel: Channel) -> RawImage:
        """Say in the QDB file that the image is partial, then empty it; the image,
        open."""
        write_qdb(self.qdb_path, QdbContents(identity=ImageIdentity(0), migration="incoming"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qdb_path + ".journal")
        fd = os.open(self.settings.image, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not os.path.isfile(self.settings.image):
                channel.abort("the target image is not a regular file")
                raise ChannelError(f"{self.settings.image}: only a regular file can "
                                   "receive a migration")
            os.ftruncate(fd, 0)  # every hole the source has is a hole here already
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return RawImage(self.settings.image)

    def _receive_image(self, channel: Channel, image: RawImage,
                       writeback: Writeback) -> list[StoredBitmap]:
        """DATA, ZERO, BITMAPS and BITS until SWITCHOVER; the bitmaps received."""
        size = image.size
        metas: list[BitmapMeta] = []
        bits: list[bitarray] = []
        while True:
            message = channel.receive()
            kind = message.kind
            if kind in (Kind.DATA, Kind.ZERO):
                if message.offset + message.length > size:
                    channel.abort("a change past the end of the image")
                    raise ChannelError(f"{kind.name} at {message.offset}+{message.length} "
                                       f"is past the image's end ({size})")
                if kind == Kind.DATA:
                    image.pwrite(message.offset, message.payload)
                    writeback.received += message.length
                else:
                    # (as WRITE_ZEROES would: punched, else zeroed in place)
                    if not image.punch_hole(message.offset, message.length) and \
                            not image.zero_range(message.offset, message.length):
                        image.write_zeroes_slowly(message.offset, message.length)
                self.received_bytes += message.length
            elif kind == Kind.BITMAPS:
                listed = message.meta()
                if not isinstance(listed, list):
                    raise ChannelError("BITMAPS: expected a list")
                metas = [BitmapMeta.from_json(item, size) for item in listed]
                if len({meta.name for meta in metas}) != len(metas):
                    raise ChannelError("BITMAPS: two bitmaps with one name")
                bits = []
                for meta in metas:
                    blank = bitarray(meta.granules, endian="little")
                    blank.setall(1)  # until the source's bits arrive: all dirty (safe)
                    bits.append(blank)
            elif kind == Kind.BITS:
                if message.offset >= len(bits):
                    raise ChannelError(f"BITS for bitmap {message.offset}, which was not "
                                       "described")
                stream.apply_bits(bits[message.offset], message.length, message.payload)
            elif kind == Kind.SYNC:
                writeback.received = 0
                image.flush()
                channel.send(stream.encode(Kind.SYNCED))
            elif kind == Kind.SWITCHOVER:
                return [StoredBitmap(m.name, m.granularity_bits, m.generation, m.recording,
                                     m.inconsistent, b) for m, b in zip(metas, bits, strict=True)]
            elif kind == Kind.ABORT:
                reason = message.payload.decode(errors="replace")
                raise ChannelError(f"the source aborted: {reason}")
            else:
                raise ChannelError(f"unexpected {kind.name} while receiving")

    def _commit(self, bitmaps: list[StoredBitmap]) -> None:
        """The bitmaps, durable, with the identity the image has now (still marked
        "incoming" until GO): the export then opens them as a clean stop left them,
        exact."""
        write_qdb(self.qdb_path, QdbContents(identity=path_identity(self.settings.image),
                                             bitmaps=bitmaps, migration="incoming"))


class Writeback:
    """While data arrives, a thread makes it durable once WRITEBACK_BYTES came since
    the last sync, so the disk writes as the network copies (the bulk copy), and the
    source's SYNCs find little left to write. Small passes are left to those SYNCs:
    syncs racing each other would only slow them."""

    def __init__(self, image: RawImage) -> None:
        self.image = image
        self.received = 0  # bytes written since the last sync (the receiving thread's)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="nbdserve-incoming-writeback")

    def _run(self) -> None:
        while not self._stop.wait(WRITEBACK_PERIOD):
            if self.received >= WRITEBACK_BYTES:
                self.received = 0
                with contextlib.suppress(OSError):  # the final fdatasync reports errors
                    self.image.flush()

    def __enter__(self) -> Writeback:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
