"""One end of a migration channel: stream.py's messages over a blocking socket (TCP,
Unix or TLS). Both ends run in threads of their own, never on the event loop."""

from __future__ import annotations

import contextlib
import socket

from nbdserve.migration import stream
from nbdserve.migration.stream import ChannelError, Kind, Message


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent_bytes = 0

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)
        self.sent_bytes += len(data)

    def send_data(self, offset: int, data: bytes) -> None:
        """DATA without copying the payload into the header's buffer."""
        self.send(stream.HEADER.pack(Kind.DATA, len(data), offset, len(data)))
        self.send(data)

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
