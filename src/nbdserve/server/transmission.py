"""The transmission phase of one connection: receive a request, handle it, reply.

The rules (framing, validation, ESHUTDOWN) are the sans-I/O TransmissionRules; the
replies are the ReplyWriter's; the work is the export's verbs. What is left here is
moving bytes and deciding where a request runs. Requests that the page cache can
answer at once (most READs, WRITEs without FUA, CACHE, BLOCK_STATUS) are served
inline: a task per request would cost more than the I/O. Requests that may block
(FLUSH, FUA, TRIM, WRITE_ZEROES, reads of uncached data) run in worker threads and are
answered out of order when done.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import Executor

from nbdserve.export import Export
from nbdserve.metrics import OTHER
from nbdserve.protocol import ProtocolViolation
from nbdserve.protocol import constants as c
from nbdserve.protocol.options import Session
from nbdserve.protocol.transmission import (
    DISCONNECT,
    EXTENDED_REQUEST_HEADER,
    REQUEST_HEADER,
    ExtendedTransmissionRules,
    RequestValidator,
    TransmissionRules,
    parse_status_payload,
)
from nbdserve.server.polling import Poller
from nbdserve.server.replies import ExtendedReplyWriter, ReplyWriter
from nbdserve.server.splice import SocketSplicer
from nbdserve.server.stream import NbdStream

log = logging.getLogger("nbdserve.transmission")

SPLICE_MIN = 64 << 10  # WRITEs with this much payload still on the socket are spliced
INLINE_READ_MAX = 1 << 20  # larger reads go to a worker thread
SENDFILE_MIN = 64 << 10  # data runs at least this long go out with sendfile(2)...
# ...when at least this many requests' bytes wait behind the READ. sendfile hands the
# socket 64 KiB at a time, and a client waiting for the reply wakes for each piece:
# a fio 1 MiB read at queue depth 4 cost the client 2.5x the CPU of a copied reply, at
# 0.75x the rate. A client with requests queued (nbdcopy keeps 64 in flight) is busy
# reading already, and sendfile's saved copy is what makes it fast (docs/performance.md).
SENDFILE_BACKLOG = 4
SPARSE_READ_MIN = 64 << 10  # reads at least this long look for holes (OFFSET_HOLE)
MAX_INFLIGHT_BYTES = 64 << 20  # payload held by unanswered requests, per connection
WRITE_BUFFER_HIGH = 4 << 20  # wait for the socket to drain above this
BATCH_MAX = 64  # replies queued before they are flushed even mid-burst
INLINE_WRITE_MAX = SPLICE_MIN  # larger WRITEs are left to the request loop
# Bound once: these are tested per request (a global, not a module attribute).
_CMD_READ, _CMD_WRITE, _CMD_DISC = c.NBD_CMD_READ, c.NBD_CMD_WRITE, c.NBD_CMD_DISC
_FLAG_FUA, _FLAG_PAYLOAD_LEN = c.NBD_CMD_FLAG_FUA, c.NBD_CMD_FLAG_PAYLOAD_LEN


def take_disc(stream: NbdStream, layout: struct.Struct, magic: int) -> bool | None:
    """Whether the next request (its header: layout, magic) is DISC: True, consumed;
    False, left unread; None while the header is still on its way."""
    header = stream.peek_struct(layout)
    if header is None:
        return None
    if header[2] != _CMD_DISC or header[0] != magic:
        return False
    stream.consume(layout.size)
    return True


def first_is_disc(stream: NbdStream, extended: bool) -> bool | None:
    """take_disc for a connection's first request, looked at before anything is built
    to serve requests (Connections.first_request)."""
    if extended:
        return take_disc(stream, EXTENDED_REQUEST_HEADER, c.NBD_EXTENDED_REQUEST_MAGIC)
    return take_disc(stream, REQUEST_HEADER, c.NBD_REQUEST_MAGIC)


class Transmission:
    def __init__(self, stream: NbdStream, session: Session, executor: Executor, peer: str,
                 *, stopping: bool = False, sock: socket.socket | None = None,
                 unix: bool = False, poller: Poller | None = None) -> None:
        self.stream = stream
        stream.use_transmission_buffer()
        self.transport = stream.transport
        self.export: Export = session.export  # type: ignore[assignment]
        self.structured = session.structured_replies
        self.contexts = session.meta_contexts
        # Extended headers: 32-byte requests, 64-bit lengths, extended reply chunks
        # echoing the request's offset, and BLOCK_STATUS_EXT's 64-bit descriptors.
        extended = session.extended_headers
        self.request_header = EXTENDED_REQUEST_HEADER if extended else REQUEST_HEADER
        self.request_magic = c.NBD_EXTENDED_REQUEST_MAGIC if extended \
            else c.NBD_REQUEST_MAGIC
        self.sendfile_backlog = SENDFILE_BACKLOG * self.request_header.size
        self.status_typecode = "Q" if extended else "I"
        rules = ExtendedTransmissionRules if extended else TransmissionRules
        self.rules = rules(RequestValidator(
            self.export.size, session.transmission_flags, session.structured_replies,
            bool(session.meta_contexts), self.export.discard_only, extended), stopping)
        # Under TLS the socket's bytes are ciphertext: no sendfile, splice or polling.
        plain = sock if sock is not None and not session.tls else None
        writer = ExtendedReplyWriter if extended else ReplyWriter
        self.replies = writer(self.transport, self.export, self.structured, peer, plain, unix)
        self.status_filter: list[int] | None = None  # BLOCK_STATUS_PAYLOAD's selection
        self.executor = executor
        self.peer = peer
        self.loop = stream.loop
        self.tasks: set[asyncio.Task] = set()
        self.inflight_bytes = 0
        # Set while inflight_bytes is under the limit; made at the first time it is not
        # (most connections never get there, and every connection would pay for it)...
        self.room: asyncio.Event | None = None
        self.held_up = False  # ...and this is its opposite, read per request for less
        self.requests = 0
        # Busy-polling before sleeping (see polling.py); plain sockets only, as TLS
        # may hold decrypted bytes the socket does not show.
        self.poller = poller if plain is not None else None
        self.sockfd = plain.fileno() if plain is not None else -1
        self.splicer: SocketSplicer | None = None  # made at the first large WRITE
        self.polled_from = 0  # when busy-polling started before this wait (ns), or 0
        # The last spin ended with the (plain) socket readable: it may be read at once.
        self.polled_readable = False
        # Until the request loop runs (run), requests are served from the stream's
        # callback alone, and start_loop is called when one needs the loop.
        self.looping = False
        self.start_loop: Callable[[], None] = lambda: None
        self.failure: BaseException | None = None  # raised by serve_arrived before it

    def stop(self) -> None:
        """The server is shutting down: later requests earn ESHUTDOWN."""
        self.rules.stop()

    # -- the request loop: receive, handle, reply ----------------------------------------------

    def serve_from_callbacks(self, start_loop: Callable[[], None]) -> None:
        """Begin serving without the request loop: requests that arrive complete are
        served from the stream's callback (serve_arrived), and DISC with nothing in
        flight hangs up there too, so a short connection needs no task. start_loop is
        called once a request needs the loop; it runs run() in a task."""
        self.start_loop = start_loop
        self.stream.on_arrival = self.serve_arrived
        self.serve_arrived()  # what came with the end of the handshake

    async def run(self) -> None:
        """Serve requests until DISC, EOF or a protocol violation."""
        self.looping = True
        stream = self.stream
        rules = self.rules
        stats = self.export.stats
        requests = stats.requests
        clock = time.perf_counter
        take_struct, read_struct = stream.take_struct, stream.read_struct
        write_buffer_size = self.transport.get_write_buffer_size
        replies = self.replies
        request_header = self.request_header
        try:
            if self.failure is not None:  # serve_arrived failed before the loop ran
                raise self.failure
            while True:
                if self.held_up or write_buffer_size() > WRITE_BUFFER_HIGH:
                    await self.wait_for_client()  # our own backlog first
                # Pipelined requests are already here: no coroutine for those.
                header = take_struct(request_header)
                if header is None:  # not here yet: send what is ready, then wait
                    self.polled_from = self.prepare_to_wait()
                    # Meanwhile requests that arrive complete are served from the
                    # stream's callback; this wakes for the first one that is not.
                    stream.on_arrival = self.serve_arrived
                    try:
                        header = await read_struct(request_header)
                    finally:
                        stream.on_arrival = None
                    if self.polled_from:
                        self.poller.adapt(time.perf_counter_ns() - self.polled_from)
                        self.polled_from = 0
                    if self.held_up:
                        # The callback's requests filled the backlog while this
                        # waited: this one waits for room too, like the next.
                        await self.wait_for_client()
                elif len(replies.out) > BATCH_MAX:
                    replies.flush()
                magic, flags, command, cookie, offset, length = header
                wanted = rules.frame(magic, flags, command, length)
                if wanted == DISCONNECT:
                    log.debug("%s: client disconnected (DISC)", self.peer)
                    if self.hang_up():
                        await asyncio.sleep(0)  # let the loop close it before the rest
                    return
                error, reason = rules.check(command, flags, offset, length)
                self.requests += 1
                requests[command if command < OTHER else OTHER] += 1
                started = clock() if stats.timing else 0.0
                if command == _CMD_WRITE:
                    if not error and length >= SPLICE_MIN and self.splice_worthy(length):
                        await self.write_spliced(flags, cookie, offset, length, started)
                        continue
                    payload = await stream.read_payload(length)
                elif wanted:  # extended headers: a payload on another command
                    data = b"".join(await stream.read_payload(wanted))
                    error, reason, length = self.other_payload(command, flags, offset, data,
                                                               error, reason)
                    payload = None
                else:
                    payload = None
                if error:
                    replies.refuse(command, cookie, error, reason, offset)
                elif self.handle(command, flags, cookie, offset, length, payload,
                                 started) and started:
                    stats.observe(command, clock() - started)
                payload = None  # views of the stream's buffers, valid until the loop runs
        except ProtocolViolation as violation:
            log.warning("%s: %s; disconnecting", self.peer, violation)
        except asyncio.IncompleteReadError:
            log.debug("%s: client closed the connection", self.peer)
        except ConnectionError as exc:
            log.debug("%s: connection lost: %s", self.peer, exc)
        finally:
            self.replies.flush()
            await self.finish_inflight()
            if self.splicer is not None:
                self.splicer.close()

    def serve_arrived(self) -> None:
        """While the request loop waits for a header, bytes arrived: serve the
        requests that are complete and need no waiting, here in the stream's callback,
        which saves waking the loop's coroutine for each (at queue depth 1, a tenth
        of a request's time). A small WRITE whose payload is still on its way is
        waited for here too. Anything else (DISC, a large WRITE, a payload on another
        command, backpressure, a header the loop must refuse) stays unread: the loop
        takes over from there, as the stream wakes it."""
        stream = self.stream
        if self.polled_from:
            self.poller.adapt(time.perf_counter_ns() - self.polled_from)
            self.polled_from = 0
        layout = self.request_header
        size = layout.size
        magic_wanted = self.request_magic
        replies = self.replies
        rules = self.rules
        stats = self.export.stats
        stream.expect(size)  # what the request loop waits for (a WRITE may raise it)
        write_buffer_size = self.transport.get_write_buffer_size
        try:
            while not self.held_up and write_buffer_size() <= WRITE_BUFFER_HIGH:
                header = stream.peek_struct(layout)
                if header is None:  # all served: wait on
                    polled_from = self.prepare_to_wait()
                    if not self.polled_readable or self.looping or \
                            not stream.receive_now(self.sockfd):
                        self.polled_from = polled_from
                        return
                    # The next request came while we polled, and is read now: no
                    # turn of the event loop (a wait and a callback) before it.
                    self.poller.adapt(time.perf_counter_ns() - polled_from)
                    continue
                magic, flags, command, cookie, offset, length = header
                if magic != magic_wanted or command == _CMD_DISC:
                    break
                if command == _CMD_WRITE:
                    if length > INLINE_WRITE_MAX:
                        break
                    view = stream.take_request(size, length)
                    if view is None:
                        # Its payload is on its way (and fits the buffer): served
                        # here once it is in, without waking the loop for it. (No
                        # busy-polling: the rest is already being sent.)
                        stream.expect(size + length)
                        replies.flush()
                        return
                    payload = (view,)
                elif flags & _FLAG_PAYLOAD_LEN:
                    break
                else:
                    stream.consume(size)
                    payload = None
                # (What rules.frame would check is settled above: the magic, no DISC,
                # no payload but a WRITE's, and that one far under MAX_PAYLOAD.)
                error, reason = rules.check(command, flags, offset, length)
                self.requests += 1
                stats.requests[command if command < OTHER else OTHER] += 1
                started = time.perf_counter() if stats.timing else 0.0
                if error:
                    replies.refuse(command, cookie, error, reason, offset)
                elif self.handle(command, flags, cookie, offset, length, payload,
                                 started) and started:
                    stats.observe(command, time.perf_counter() - started)
                payload = view = None  # (views of the receive buffer: never kept)
                if len(replies.out) > BATCH_MAX:
                    replies.flush()
        except BaseException as exc:  # the loop raises it, as if it had been there
            stream.on_arrival = None
            if self.looping:
                stream.fail_reader(exc)
            else:
                self.failure = exc
                self.start_loop()
            return
        # The loop serves the next request: the replies so far go out now, as the
        # loop may not run before the client has them (it waits for a header).
        stream.on_arrival = None
        replies.flush()
        if not self.looping:
            self.take_over()

    def take_over(self) -> None:
        """serve_arrived left a request to the request loop, and none runs yet. DISC
        with nothing in flight ends the connection here (how most short connections
        end: without a task at all); anything else starts the loop."""
        if not self.tasks and take_disc(self.stream, self.request_header, self.request_magic):
            self.rules.frame(self.request_magic, 0, _CMD_DISC, 0)  # the phase is CLOSED now
            log.debug("%s: client disconnected (DISC)", self.peer)
            self.hang_up()
            return
        self.start_loop()

    def other_payload(self, command: int, flags: int, offset: int, data: bytes, error: int,
                      reason: str) -> tuple[int, str, int]:
        """A payload on a command other than WRITE (read already, to stay in step):
        BLOCK_STATUS_PAYLOAD's effect length and contexts, else EINVAL. Returns the
        error and reason, and the request's effect length."""
        if command != c.NBD_CMD_BLOCK_STATUS or not flags & c.NBD_CMD_FLAG_PAYLOAD_LEN:
            return error or c.NBD_EINVAL, reason or "this command takes no payload", 0
        if flags & ~self.rules.validator.allowed_flags[command]:
            return error, reason, 0  # PAYLOAD_LEN without BLOCK_STATUS_PAYLOAD, say
        # The header's length was the payload's: the checks that matter use the
        # effect length the payload gives.
        try:
            effect, selected = parse_status_payload(data, self.contexts)
        except ValueError as exc:
            return c.NBD_EINVAL, str(exc), 0
        error, reason = self.rules.check(command, flags, offset, effect)
        if not error:  # handle() takes it up at once; a refused request leaves none
            self.status_filter = selected
        return error, reason, effect

    def prepare_to_wait(self) -> int:
        """Before waiting for the client: send the queued replies, and let a lone busy
        connection busy-poll its socket briefly. Returns when polling started (ns, for
        Poller.adapt), or 0 if it did not; polled_readable says whether the spin saw
        the next request arrive on a plain socket."""
        replies = self.replies
        if replies.out:
            replies.flush()
        poller = self.poller
        # Not before the first request: nothing is known of this client's rhythm yet,
        # and a client that connects only to look (nbdinfo) sends DISC after a while.
        if poller is not None and self.requests and \
                poller.allowed(bool(self.tasks) or self.transport.get_write_buffer_size()):
            polled_from = time.perf_counter_ns()
            self.polled_readable = poller.spin(polled_from)  # (a poller: a plain socket)
            return polled_from
        self.polled_readable = False
        return 0

    async def wait_for_client(self) -> None:
        """Our backlog: too much payload held by unanswered requests (wait for some to
        finish), or replies the client reads slower than it asks (wait for the socket
        to drain)."""
        self.replies.flush()
        if self.room is not None and not self.room.is_set():
            await self.room.wait()
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self.stream.drain()

    def handle(self, command: int, flags: int, cookie: int, offset: int, length: int,
               payload: tuple[memoryview, ...] | None, started: float) -> bool:
        """handle_request: one branch per command (the rules already passed). True
        when the request was answered here; False when a task will answer it."""
        export = self.export
        replies = self.replies
        if command == _CMD_READ:
            export.stats.bytes_read += length
            sparse = (self.structured and length >= SPARSE_READ_MIN
                      and not flags & c.NBD_CMD_FLAG_DF)
            if not flags & _FLAG_FUA:
                if length >= SENDFILE_MIN:
                    replies.large_read()
                    if self.stream.available() >= self.sendfile_backlog and \
                            replies.send_file(cookie, offset, length, sparse):
                        return True
                if length <= INLINE_READ_MAX:
                    # Page-cache hits are served at once; anything that would block
                    # goes to a worker thread.
                    try:
                        pieces = export.read(offset, length, sparse, nowait=True)
                    except OSError as exc:
                        replies.fail(command, cookie, flags, exc, offset)
                        return True
                    if pieces is not None:
                        replies.read_data(cookie, pieces, offset)
                        return True
            self.spawn(self.slow_read(cookie, offset, length, flags, sparse), length, started,
                       command)
            return False
        if command == _CMD_WRITE:
            export.stats.bytes_written += length
            try:
                export.write(offset, length, payload)
            except OSError as exc:
                replies.fail(command, cookie, flags, exc, offset)
                return True
            if flags & _FLAG_FUA:
                return self.in_thread(command, cookie, flags, export.flush, started, offset)
            replies.ok(cookie, offset)
            return True
        # (No lambda, inner function or comprehension in this method: any of them
        # would turn the variables it uses into cells, made on every call, READs and
        # WRITEs included.)
        if command == c.NBD_CMD_WRITE_ZEROES:
            zero = functools.partial(export.zero, offset, length,
                                     may_punch=not flags & c.NBD_CMD_FLAG_NO_HOLE,
                                     fast_only=bool(flags & c.NBD_CMD_FLAG_FAST_ZERO))
            return self.in_thread(command, cookie, flags, zero, started, offset)
        if command == c.NBD_CMD_TRIM:
            return self.in_thread(command, cookie, flags,
                                  functools.partial(export.trim, offset, length), started,
                                  offset)
        if command == c.NBD_CMD_FLUSH:
            return self.in_thread(command, cookie, flags, export.flush, started, offset)
        if command == c.NBD_CMD_CACHE:
            export.cache(offset, length)
            replies.ok(cookie, offset)
            return True
        if command == c.NBD_CMD_BLOCK_STATUS:
            self.block_status(cookie, flags, offset, length)
            return True
        raise AssertionError(f"command {command} passed validation")  # pragma: no cover

    def block_status(self, cookie: int, flags: int, offset: int, length: int) -> None:
        """BLOCK_STATUS: one chunk per selected context, answered at once."""
        limit = 1 if flags & c.NBD_CMD_FLAG_REQ_ONE else c.MAX_EXTENTS_PER_CHUNK
        contexts = self.contexts
        selected = self.status_filter  # BLOCK_STATUS_PAYLOAD named some
        if selected is None:
            selected = contexts
        else:
            self.status_filter = None
        status = self.export.block_status
        typecode = self.status_typecode
        chunks = []
        try:
            for context_id in selected:
                chunks.append((context_id, status(contexts[context_id], offset, length,
                                                  limit, typecode)))
        except OSError as exc:  # a context that went away since SET, say
            self.replies.fail(c.NBD_CMD_BLOCK_STATUS, cookie, flags, exc, offset)
            return
        self.replies.block_status(cookie, chunks, offset)

    # -- WRITE payloads spliced from the socket ----------------------------------------------

    def splice_worthy(self, length: int) -> bool:
        """Most of this WRITE's payload is still on the socket, and large: splice it."""
        if self.sockfd < 0 or self.export.detect_zeroes is not None:
            return False  # (zero detection needs the payload in memory)
        available = self.stream.available()
        if self.replies.out and available < length:
            self.replies.flush()  # about to wait for the payload
        return length - available >= SPLICE_MIN

    async def write_spliced(self, flags: int, cookie: int, offset: int, length: int,
                            started: float) -> None:
        """A valid WRITE whose payload moves socket -> pipe -> image (splice.py); the
        export records each part before it lands (Export.write_from_pipe)."""
        stream = self.stream
        self.export.stats.bytes_written += length
        if self.splicer is None:
            self.splicer = SocketSplicer(self.sockfd, self.loop)
        head = stream.take_view(min(length, stream.available()))
        error: OSError | None = None
        try:
            self.export.write(offset, len(head), (head,))  # now: head is borrowed
        except OSError as exc:
            error = exc  # the rest is still read off the socket, and discarded
        stream.pause_reading()  # the splicer reads the socket meanwhile
        try:
            error = await self.splicer.receive(self.export.write_from_pipe,
                                               offset + len(head), length - len(head), error)
        finally:
            stream.resume_reading()
        if error is not None:
            self.replies.fail(c.NBD_CMD_WRITE, cookie, flags, error, offset)
        elif flags & c.NBD_CMD_FLAG_FUA:
            self.in_thread(c.NBD_CMD_WRITE, cookie, flags, self.export.flush, started,
                           offset)
            return
        else:
            self.replies.ok(cookie, offset)
        if started:
            self.export.stats.observe(c.NBD_CMD_WRITE, time.perf_counter() - started)

    # -- requests answered from tasks ------------------------------------------------------------

    def spawn(self, coroutine, held_bytes: int, started: float, command: int) -> None:
        self.inflight_bytes += held_bytes
        if self.inflight_bytes > MAX_INFLIGHT_BYTES:
            if self.room is None:
                self.room = asyncio.Event()
            self.room.clear()  # backpressure: stop reading requests until some finish
            self.held_up = True
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)

        def done(finished: asyncio.Task) -> None:
            if started:
                self.export.stats.observe(command, time.perf_counter() - started)
            self.tasks.discard(finished)
            self.inflight_bytes -= held_bytes
            if self.inflight_bytes <= MAX_INFLIGHT_BYTES:
                if self.room is not None:
                    self.room.set()
                self.held_up = False
        task.add_done_callback(done)

    def in_thread(self, command: int, cookie: int, flags: int, work: Callable[[], None],
                  started: float, offset: int) -> bool:
        """Run work in a worker thread; reply when it is done. Returns False (the
        reply comes from the task)."""
        self.spawn(self._in_thread(command, cookie, flags, work, offset), 0, started, command)
        return False

    async def _in_thread(self, command: int, cookie: int, flags: int,
                         work: Callable[[], None], offset: int) -> None:
        try:
            await self.loop.run_in_executor(self.executor, work)
        except Exception as exc:  # never let one request take the connection down
            if not isinstance(exc, OSError):
                log.exception("%s: request failed", self.peer)
            self.replies.fail(command, cookie, flags, exc, offset)
        else:
            self.replies.ok(cookie, offset)
        self.replies.flush()

    async def slow_read(self, cookie: int, offset: int, length: int, flags: int,
                        sparse: bool) -> None:
        export = self.export

        def read() -> list:
            if flags & c.NBD_CMD_FLAG_FUA:
                export.flush()  # as QEMU: READ with FUA first makes earlier writes durable
            return export.read(offset, length, sparse)

        try:
            pieces = await self.loop.run_in_executor(self.executor, read)
        except OSError as exc:
            self.replies.fail(c.NBD_CMD_READ, cookie, flags, exc, offset)
        else:
            self.replies.read_data(cookie, pieces, offset)
        self.replies.flush()

    # -- end of the connection ---------------------------------------------------------------------

    def hang_up(self) -> bool:
        """DISC: with nothing left to answer, hang up now (queued replies still go out
        first), not after the book-keeping; clients wait for it. True if it did."""
        if self.tasks:
            return False
        self.replies.flush()
        self.transport.close()
        return True

    async def finish_inflight(self) -> None:
        """Let every accepted request complete and its reply be queued."""
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
