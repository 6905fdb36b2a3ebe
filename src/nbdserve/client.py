"""An asyncio NBD client: fixed newstyle, GO, structured replies, meta contexts,
block status, and pipelined requests answered in any order.

    async with await NbdClient.connect(unix="/run/nbd.sock",
                                       meta_contexts=["base:allocation"]) as nbd:
        data = await nbd.read(0, 4096)
        extents = await nbd.block_status(0, nbd.size)

It talks to any conforming server (tested against nbdserve, qemu-nbd and nbdkit).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nbdserve.protocol import constants as c
from nbdserve.protocol.options import INFO_EXPORT, OPTION_HEADER, OPTION_REPLY_HEADER
from nbdserve.protocol.transmission import (
    CHUNK_HEADER,
    EXTENDED_CHUNK_HEADER,
    EXTENDED_REQUEST_HEADER,
    REQUEST_HEADER,
    SIMPLE_REPLY,
)


class NbdError(Exception):
    """The server answered a request with an error."""

    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(f"NBD error {error}" + (f": {message}" if message else ""))
        self.error = error
        self.message = message


class OptionRefused(Exception):
    """The server refused an option with an NBD_REP_ERR_* reply."""

    def __init__(self, option: int, reply_type: int, message: str) -> None:
        name = c.OPTION_NAMES.get(option, str(option))
        super().__init__(f"option {name} refused (0x{reply_type:x}): {message}")
        self.option = option
        self.reply_type = reply_type
        self.message = message


@dataclass(slots=True)
class ExportInfo:
    name: str
    size: int = 0
    flags: int = 0
    description: str = ""
    block_sizes: tuple[int, int, int] | None = None


@dataclass(slots=True)
class _Pending:
    command: int
    offset: int
    length: int
    future: asyncio.Future
    buffer: bytearray | None = None  # a READ's data, made when a second piece comes
    whole: bytes | None = None  # a READ answered by one data chunk: its payload as is
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error: NbdError | None = None

    def read_buffer(self) -> bytearray:
        if self.buffer is None:
            self.buffer = bytearray(self.length)
            if self.whole is not None:
                self.buffer[:len(self.whole)] = self.whole
                self.whole = None
        return self.buffer

    def read_result(self) -> bytes:
        if self.whole is not None and len(self.whole) == self.length:
            return self.whole
        return bytes(self.read_buffer())


def _meta_payload(export: str, queries: Sequence[str]) -> bytes:
    name = export.encode()
    parts = [struct.pack(">I", len(name)), name, struct.pack(">I", len(queries))]
    for query in queries:
        raw = query.encode()
        parts += [struct.pack(">I", len(raw)), raw]
    return b"".join(parts)


class NbdClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.extended = False  # extended headers: 32-byte requests and reply chunks
        self.export = ExportInfo("")
        self.contexts: dict[int, str] = {}
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._receiver: asyncio.Task | None = None
        self._closed_error: BaseException | None = None
        self._server_shutting_down = False

    # -- connecting ---------------------------------------------------------------------

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 10809, *,
                      unix: str | None = None, export: str = "", structured: bool = True,
                      extended: bool = True, meta_contexts: Sequence[str] = (),
                      use_export_name: bool = False, tls: ssl.SSLContext | None = None,
                      tls_hostname: str | None = None) -> NbdClient:
        """Connect, negotiate (STARTTLS first when `tls` is given) and enter
        transmission. Extended headers are asked for first (as libnbd does) when
        `extended` and `structured`; a server without them gets structured replies."""
        if unix is not None:
            reader, writer = await asyncio.open_unix_connection(unix, limit=4 << 20)
        else:
            reader, writer = await asyncio.open_connection(host, port, limit=4 << 20)
        client = cls(reader, writer)
        try:
            await client._greeting()
            if tls is not None:
                await client.starttls(tls, tls_hostname or (host if unix is None else None))
            if use_export_name:
                await client._export_name(export)
            else:
                if structured and extended:
                    await client.extended_headers()
                if structured and not client.extended:
                    await client.structured_reply()
                if meta_contexts:
                    await client.set_meta_context(export, meta_contexts)
                await client._go(export)
        except BaseException:
            writer.close()
            raise
        client._receiver = asyncio.get_running_loop().create_task(client._receive())
        return client

    @classmethod
    async def open_handshake(cls, host: str = "127.0.0.1", port: int = 10809, *,
                             unix: str | None = None) -> NbdClient:
        """Connect and stop in option haggling (for LIST, INFO and the like)."""
        if unix is not None:
            reader, writer = await asyncio.open_unix_connection(unix)
        else:
            reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        await client._greeting()
        return client

    async def go(self, export: str = "") -> None:
        """Finish haggling started with open_handshake and enter transmission."""
        await self._go(export)
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    async def _greeting(self) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", await self.reader.readexactly(18))
        if magic != c.NBDMAGIC or opt_magic != c.IHAVEOPT:
            raise ConnectionError("not a newstyle NBD server")
        if not flags & c.NBD_FLAG_FIXED_NEWSTYLE:
            raise ConnectionError("server does not speak fixed newstyle")
        client_flags = c.NBD_FLAG_C_FIXED_NEWSTYLE
        self._no_zeroes = bool(flags & c.NBD_FLAG_NO_ZEROES)
        if self._no_zeroes:
            client_flags |= c.NBD_FLAG_C_NO_ZEROES
        self.writer.write(struct.pack(">I", client_flags))

    async def option(self, option: int, payload: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; return its replies up to and including the final one."""
        self.writer.write(OPTION_HEADER.pack(c.IHAVEOPT, option, len(payload)) + payload)
        await self.writer.drain()
        replies = []
        while True:
            magic, echoed, reply_type, length = OPTION_REPLY_HEADER.unpack(
                await self.reader.readexactly(20))
            if magic != c.NBD_REP_MAGIC or echoed != option:
                raise ConnectionError("malformed option reply")
            data = await self.reader.readexactly(length) if length else b""
            if reply_type & c.NBD_REP_FLAG_ERROR:
                raise OptionRefused(option, reply_type, data.decode(errors="replace"))
            replies.append((reply_type, data))
            if reply_type == c.NBD_REP_ACK:
                return replies

    async def starttls(self, context: ssl.SSLContext, hostname: str | None = None) -> None:
        """STARTTLS, then the TLS handshake over the same connection."""
        await self.option(c.NBD_OPT_STARTTLS)
        await self.writer.start_tls(context, server_hostname=hostname)
        # Forgotten by the server on STARTTLS, as everything else.
        self.structured = self.extended = False
        self.contexts = {}

    async def structured_reply(self) -> None:
        await self.option(c.NBD_OPT_STRUCTURED_REPLY)
        self.structured = True

    async def extended_headers(self) -> bool:
        """Ask for extended headers; False (and nothing changed) if the server refuses
        them, for whatever reason: haggling goes on either way."""
        try:
            await self.option(c.NBD_OPT_EXTENDED_HEADERS)
        except OptionRefused:
            return False
        self.structured = self.extended = True
        return True

    async def list_exports(self) -> list[tuple[str, str]]:
        exports = []
        for reply_type, data in await self.option(c.NBD_OPT_LIST):
            if reply_type == c.NBD_REP_SERVER:
                (length,) = struct.unpack_from(">I", data)
                exports.append((data[4 : 4 + length].decode(), data[4 + length :].decode()))
        return exports

    async def list_meta_contexts(self, export: str = "",
                                 queries: Sequence[str] = ()) -> list[str]:
        replies = await self.option(c.NBD_OPT_LIST_META_CONTEXT,
                                    _meta_payload(export, queries))
        return [data[4:].decode() for kind, data in replies if kind == c.NBD_REP_META_CONTEXT]

    async def set_meta_context(self, export: str, queries: Sequence[str]) -> dict[int, str]:
        replies = await self.option(c.NBD_OPT_SET_META_CONTEXT, _meta_payload(export, queries))
        self.contexts = {
            struct.unpack_from(">I", data)[0]: data[4:].decode()
            for kind, data in replies if kind == c.NBD_REP_META_CONTEXT
        }
        return self.contexts

    async def info(self, export: str = "", requests: Iterable[int] = (
            c.NBD_INFO_NAME, c.NBD_INFO_DESCRIPTION, c.NBD_INFO_BLOCK_SIZE)) -> ExportInfo:
        return self._parse_info(export, await self.option(c.NBD_OPT_INFO,
                                                          self._info_payload(export, requests)))

    async def _go(self, export: str) -> None:
        replies = await self.option(c.NBD_OPT_GO, self._info_payload(
            export, (c.NBD_INFO_NAME, c.NBD_INFO_DESCRIPTION, c.NBD_INFO_BLOCK_SIZE)))
        self.export = self._parse_info(export, replies)

    async def _export_name(self, export: str) -> None:
        raw = export.encode()
        self.writer.write(OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_EXPORT_NAME, len(raw)) + raw)
        reply = await self.reader.readexactly(10 if self._no_zeroes else 134)
        size, flags = struct.unpack_from(">QH", reply)
        self.export = ExportInfo(export, size, flags)

    @staticmethod
    def _info_payload(export: str, requests: Iterable[int]) -> bytes:
        name = export.encode()
        requested = list(requests)
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requested))
                + struct.pack(f">{len(requested)}H", *requested))

    @staticmethod
    def _parse_info(export: str, replies: list[tuple[int, bytes]]) -> ExportInfo:
        info = ExportInfo(export)
        for kind, data in replies:
            if kind != c.NBD_REP_INFO:
                continue
            (info_type,) = struct.unpack_from(">H", data)
            if info_type == c.NBD_INFO_EXPORT:
                _, info.size, info.flags = INFO_EXPORT.unpack(data)
            elif info_type == c.NBD_INFO_NAME:
                info.name = data[2:].decode()
            elif info_type == c.NBD_INFO_DESCRIPTION:
                info.description = data[2:].decode()
            elif info_type == c.NBD_INFO_BLOCK_SIZE:
                info.block_sizes = struct.unpack_from(">III", data, 2)
        return info

    async def abort(self) -> None:
        await self.option(c.NBD_OPT_ABORT)
        self.writer.close()

    # -- transmission -------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def flags(self) -> int:
        return self.export.flags

    def submit(self, command: int, offset: int, length: int, flags: int = 0,
               payload: bytes | None = None) -> asyncio.Future:
        """Send a request now, without waiting: requests go out in the order submitted
        (pipelining); the future completes with the reply, in whatever order the
        server answers."""
        if self._closed_error is not None:
            raise ConnectionError("connection closed") from self._closed_error
        cookie = next(self._cookies)
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(command, offset, length, future)
        self._pending[cookie] = pending
        if self.extended:
            if payload is not None:  # the length is the payload's (WRITE, status filter)
                flags |= c.NBD_CMD_FLAG_PAYLOAD_LEN
                length = len(payload)
            header = EXTENDED_REQUEST_HEADER.pack(c.NBD_EXTENDED_REQUEST_MAGIC, flags, command,
                                                  cookie, offset, length)
        else:
            header = REQUEST_HEADER.pack(c.NBD_REQUEST_MAGIC, flags, command, cookie, offset,
                                         length)
        if payload is None:
            self.writer.write(header)
        else:
            self.writer.writelines((header, payload))
        return future

    async def _request(self, command, offset, length, flags=0, payload=None):
        future = self.submit(command, offset, length, flags, payload)
        await self.writer.drain()
        return await future

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        return await self._request(c.NBD_CMD_READ, offset, length, flags)

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        await self._request(c.NBD_CMD_WRITE, offset, len(data), flags, data)

    async def flush(self) -> None:
        await self._request(c.NBD_CMD_FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, flags: int = 0) -> None:
        await self._request(c.NBD_CMD_TRIM, offset, length, flags)

    async def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        await self._request(c.NBD_CMD_WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        await self._request(c.NBD_CMD_CACHE, offset, length)

    async def block_status(self, offset: int, length: int,
                           flags: int = 0) -> dict[str, list[tuple[int, int]]]:
        """Extents per context name, as (length, flags) pairs."""
        by_id = await self._request(c.NBD_CMD_BLOCK_STATUS, offset, length, flags)
        return {self.contexts.get(context_id, str(context_id)): extents
                for context_id, extents in by_id.items()}

    async def walk_extents(self, context: str,
                           span: int | None = None) -> list[tuple[int, int, int]]:
        """(offset, length, flags) of one negotiated context over the whole export,
        neighbours with the same flags merged; BLOCK_STATUS asks up to span bytes at a
        time (by default 1 GiB, or the whole export with extended headers). Raises
        ConnectionError if the server answers no extents for it."""
        out: list[tuple[int, int, int]] = []
        offset, size = 0, self.size
        if span is None:
            span = size if self.extended else 1 << 30
        while offset < size:
            extents = (await self.block_status(offset, min(size - offset, span))).get(context)
            if not extents:
                raise ConnectionError(f"the server answered no extents for {context}")
            for length, flags in extents:
                length = min(length, size - offset)
                if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
                    out[-1] = (out[-1][0], out[-1][1] + length, flags)
                else:
                    out.append((offset, length, flags))
                offset += length
                if offset >= size:
                    break
        return out

    async def raw_request(self, command: int, offset: int, length: int, flags: int = 0,
                          payload: bytes | None = None):
        """Send any request, even an invalid one (for tests of the server)."""
        return await self._request(command, offset, length, flags, payload)

    async def disconnect(self) -> None:
        if self._pending:
            await asyncio.gather(*(p.future for p in list(self._pending.values())),
                                 return_exceptions=True)
        if self._closed_error is None:
            self._send_disc()
            try:
                await self.writer.drain()
            except ConnectionError:
                pass
        if self._receiver is not None:
            self._receiver.cancel()
        self.writer.close()

    def _send_disc(self) -> None:
        if self.extended:
            self.writer.write(EXTENDED_REQUEST_HEADER.pack(c.NBD_EXTENDED_REQUEST_MAGIC, 0,
                                                           c.NBD_CMD_DISC, 0, 0, 0))
        else:
            self.writer.write(REQUEST_HEADER.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0,
                                                  0, 0))

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.disconnect()

    # -- replies ------------------------------------------------------------------------

    async def _receive(self) -> None:
        readexactly = self.reader.readexactly
        try:
            while True:
                (magic,) = struct.unpack(">I", await readexactly(4))
                if magic == c.NBD_SIMPLE_REPLY_MAGIC:
                    _, error, cookie = SIMPLE_REPLY.unpack(
                        struct.pack(">I", magic) + await readexactly(12))
                    pending = self._pending.pop(cookie)
                    if error:
                        self._server_shutting_down |= error == c.NBD_ESHUTDOWN
                        pending.future.set_exception(NbdError(error))
                    elif pending.command == c.NBD_CMD_READ:
                        pending.future.set_result(await readexactly(pending.length))
                    else:
                        pending.future.set_result(None)
                elif magic in (c.NBD_STRUCTURED_REPLY_MAGIC, c.NBD_EXTENDED_REPLY_MAGIC):
                    if magic == c.NBD_EXTENDED_REPLY_MAGIC:
                        _, flags, kind, cookie, _offset, length = EXTENDED_CHUNK_HEADER.unpack(
                            struct.pack(">I", magic) + await readexactly(28))
                    else:
                        _, flags, kind, cookie, length = CHUNK_HEADER.unpack(
                            struct.pack(">I", magic) + await readexactly(16))
                    if kind == c.NBD_REPLY_TYPE_OFFSET_DATA and length >= 8:
                        # The data apart from its offset: a whole READ in one chunk
                        # is then the result as it arrived, with no copy.
                        (offset,) = struct.unpack(">Q", await readexactly(8))
                        self._data(cookie, offset, await readexactly(length - 8))
                        payload = b""
                        kind = c.NBD_REPLY_TYPE_NONE
                    else:
                        payload = await readexactly(length) if length else b""
                    self._chunk(cookie, flags, kind, payload)
                else:
                    raise ConnectionError(f"bad reply magic 0x{magic:x}")
                if self._server_shutting_down and not self._pending:
                    # Spec: after ESHUTDOWN the client MUST disconnect (softly).
                    self._send_disc()
                    self._fail_all(ConnectionError("server is shutting down"))
                    return
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._fail_all(exc)
        except Exception as exc:
            self._fail_all(exc)
            raise

    def _data(self, cookie: int, offset: int, data: bytes) -> None:
        pending = self._pending[cookie]
        start = offset - pending.offset
        if start == 0 and pending.buffer is None and pending.whole is None:
            pending.whole = data
        else:
            pending.read_buffer()[start : start + len(data)] = data

    def _chunk(self, cookie: int, flags: int, kind: int, payload: bytes) -> None:
        pending = self._pending[cookie]
        if kind == c.NBD_REPLY_TYPE_OFFSET_DATA:
            (offset,) = struct.unpack_from(">Q", payload)
            self._data(cookie, offset, payload[8:])
        elif kind == c.NBD_REPLY_TYPE_OFFSET_HOLE:
            pass  # the buffer starts zeroed
        elif kind == c.NBD_REPLY_TYPE_BLOCK_STATUS:
            (context_id,) = struct.unpack_from(">I", payload)
            words = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
            pending.extents[context_id] = list(zip(words[0::2], words[1::2], strict=True))
        elif kind == c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT:
            context_id, count = struct.unpack_from(">II", payload)
            words = struct.unpack_from(f">{2 * count}Q", payload, 8)
            pending.extents[context_id] = list(zip(words[0::2], words[1::2], strict=True))
        elif kind & 0x8000:
            error, length = struct.unpack_from(">IH", payload)
            pending.error = NbdError(error, payload[6 : 6 + length].decode(errors="replace"))
            self._server_shutting_down |= error == c.NBD_ESHUTDOWN
        elif kind != c.NBD_REPLY_TYPE_NONE:
            raise ConnectionError(f"unknown chunk type {kind}")
        if flags & c.NBD_REPLY_FLAG_DONE:
            del self._pending[cookie]
            if pending.error is not None:
                pending.future.set_exception(pending.error)
            elif pending.command == c.NBD_CMD_READ:
                pending.future.set_result(pending.read_result())
            elif pending.command == c.NBD_CMD_BLOCK_STATUS:
                pending.future.set_result(pending.extents)
            else:
                pending.future.set_result(None)

    def _fail_all(self, exc: BaseException) -> None:
        self._closed_error = exc
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionError(f"connection lost: {exc}"))
                # Callers that gave up on the request need not hear of it again.
                pending.future.exception()
        self._pending.clear()
