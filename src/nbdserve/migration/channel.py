"""One end of a migration channel: stream.py's messages over a blocking socket (TCP,
Unix or TLS). Both ends run in threads of their own, never on the event loop."""

from __future__ import annotations

import contextlib
import socket

from nbdserve.migration import stream
from nbdserve.migration.stream import ChannelError, Kind, Message

QUEUE_MAX = 1 << 20  # queued bytes sent in one call (many small DATA in the pause)
SOCKET_BUFFER = 4 << 20  # so a sender keeps filling while its peer writes to disk


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):  # the kernel caps it (wmem_max, rmem_max)
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.sock = sock
        self.sent_bytes = 0
        self._queued: list[bytes] = []
        self._queued_bytes = 0

    def send(self, data: bytes | memoryview) -> None:
        """Send now (after whatever was queued)."""
        self.queue(data)
        self.flush()

    def queue(self, data: bytes | memoryview) -> None:
        """Send soon: small messages go out together, in order."""
        self._queued.append(data)
        self._queued_bytes += len(data)
        if self._queued_bytes >= QUEUE_MAX:
            self.flush()

    def flush(self) -> None:
        if not self._queued:
            return
        data = self._queued[0] if len(self._queued) == 1 else b"".join(self._queued)
        self._queued.clear()
        self._queued_bytes = 0
        self.sock.sendall(data)
        self.sent_bytes += len(data)

    def queue_data(self, offset: int, data: bytes) -> None:
        self.queue(stream.HEADER.pack(Kind.DATA, len(data), offset, len(data)))
        self.queue(data)

    def _exactly(self, count: int) -> bytes:
        buffer = bytearray(count)
        view = memoryview(buffer)
        while view:
            received = self.sock.recv_into(view)
            if not received:
                raise ChannelError("the peer closed the migration channel")
            view = view[received:]
        return bytes(buffer)

    def receive(self) -> Message:
        self.flush()
        kind, payload_length, offset, length = stream.decode_header(
            self._exactly(stream.HEADER.size))
        payload = self._exactly(payload_length) if payload_length else b""
        return Message(kind, offset, length, payload)

    def expect(self, kind: Kind) -> Message:
        message = self.receive()
        if message.kind == Kind.ABORT:
            raise ChannelError(f"the peer aborted: {message.payload.decode(errors='replace')}")
        if message.kind != kind:
            raise ChannelError(f"expected {kind.name}, received {message.kind.name}")
        return message

    def abort(self, reason: str) -> None:
        """Tell the peer why (best effort: it may be gone)."""
        with contextlib.suppress(OSError):
            self.send(stream.encode(Kind.ABORT, payload=reason.encode()[:4096]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
