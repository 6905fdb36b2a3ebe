"""The server as a process: command line, listeners, limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import time

import pytest

from conftest import NBDSERVE, run, wait_until
from nbdserve.client import NbdClient, NbdError, OptionRefused
from nbdserve.config import ExportConfig
from nbdserve.export import Export, ExportCatalog
from nbdserve.image import RawImage
from nbdserve.protocol import constants as c
from nbdserve.server.lifecycle import Server
from nbdserve.server.listener import bind_unix


def test_help_and_version():
    out = run(*NBDSERVE, "--help").stdout
    assert "serve" in out
    out = run(*NBDSERVE, "serve", "--help").stdout
    for option in ("--export-name", "--bind", "--port", "--socket", "--read-only",
                   "--description", "--shared", "--create"):
        assert option in out
    assert run(*NBDSERVE, "--version").stdout.startswith("nbdserve, version ")


def test_image_not_a_multiple_of_512_is_refused(tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    result = run(*NBDSERVE, "serve", str(odd), "-k", str(tmp_path / "s"), check=False)
    assert result.returncode == 1
    assert "not a multiple of 512" in result.stderr


def test_missing_image_is_a_clear_error(tmp_path):
    result = run(*NBDSERVE, "serve", str(tmp_path / "none.img"), "-k", str(tmp_path / "s"),
                 check=False)
    assert result.returncode == 1
    assert "cannot open image" in result.stderr and "No such file" in result.stderr


def test_bad_size_is_a_usage_error(tmp_path):
    result = run(*NBDSERVE, "serve", str(tmp_path / "x.img"), "--create", "12Q", check=False)
    assert result.returncode == 2
    assert "invalid size" in result.stderr


def test_create_makes_a_sparse_image(tmp_path, start_server):
    path = tmp_path / "new.img"
    server = start_server(path, "--create", "10G")
    assert os.path.getsize(path) == 10 << 30
    assert os.stat(path).st_blocks == 0
    assert "export-size: 10737418240" in run("nbdinfo", server.uri()).stdout


def test_tcp_ipv4_and_ipv6(image, start_server):
    v4 = start_server(image, unix=False)
    assert "export-size: 67108864" in run("nbdinfo", v4.uri()).stdout
    v6 = start_server(image, unix=False, host="::1")
    assert v6.uri().startswith("nbd://[::1]:")
    assert "export-size: 67108864" in run("nbdinfo", v6.uri()).stdout


def test_keeps_serving_after_clients_leave(server):
    for i in range(3):
        run("qemu-io", "-f", "raw", "-c", f"write -P {i + 1} 0 512", server.qemu_uri)
    assert server.proc.poll() is None
    assert server.image.read_bytes()[:512] == b"\x03" * 512


def connection_states(control) -> list[str]:
    from nbdserve.control.client import ControlClient
    with ControlClient(str(control)) as client:
        return sorted(conn["state"] for conn in client.execute("query-status")["connections"])


async def test_connection_limit_makes_extra_clients_wait(image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(image, "-e", "1", "--control", str(control))
    first = await NbdClient.connect(**server.client_args())
    assert not first.flags & c.NBD_FLAG_CAN_MULTI_CONN
    second = asyncio.ensure_future(NbdClient.connect(**server.client_args()))
    await wait_until(lambda: connection_states(control) == ["transmission", "waiting"],
                     what="the second client to be queued")
    assert not second.done()  # waiting, as in qemu-nbd's backlog
    await first.disconnect()
    client = await asyncio.wait_for(second, 5)
    assert await client.read(0, 512) == bytes(512)
    # A waiting client that gives up leaves no trace: the next one still gets in.
    gives_up = socket.socket(socket.AF_UNIX if server.unix else socket.AF_INET)
    gives_up.connect(str(server.unix) if server.unix else (server.host, server.port))
    third = asyncio.ensure_future(NbdClient.connect(**server.client_args()))
    await wait_until(lambda: connection_states(control) ==
                     ["transmission", "waiting", "waiting"], what="two clients queued")
    gives_up.close()
    await client.disconnect()
    client = await asyncio.wait_for(third, 5)
    assert await client.read(0, 512) == bytes(512)
    await client.disconnect()


def test_stale_unix_socket_is_replaced_but_a_live_one_is_not(image, tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crash leaves
    from conftest import NbdServe
    server = NbdServe(image, unix=path)
    try:
        result = run(*NBDSERVE, "serve", str(image), "-k", str(path), check=False)
        assert result.returncode == 1
        assert "in use by a running server" in result.stderr
    finally:
        assert server.stop() == 0
    assert not path.exists()  # removed on clean exit


def test_a_regular_file_is_never_replaced_by_the_socket(image, tmp_path):
    path = tmp_path / "precious"
    path.write_text("keep me")
    result = run(*NBDSERVE, "serve", str(image), "-k", str(path), check=False)
    assert result.returncode == 1 and "not a socket" in result.stderr
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_finishes_inflight_requests_and_exits_zero(image, start_server, sig):
    server = start_server(image)
    nbd = await NbdClient.connect(**server.client_args())
    payloads = [os.urandom(65536) for _ in range(64)]
    writes = [asyncio.ensure_future(nbd.write(i * 65536, p, c.NBD_CMD_FLAG_FUA))
              for i, p in enumerate(payloads)]
    await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)  # requests in flight
    server.proc.send_signal(sig)
    results = await asyncio.gather(*writes, return_exceptions=True)
    exit_code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 30)
    assert exit_code == 0, server.log
    data = image.read_bytes()
    for i, outcome in enumerate(results):
        if outcome is None:  # acknowledged: must be on disk
            assert data[i * 65536 : (i + 1) * 65536] == payloads[i]
        else:  # only a refusal because of the shutdown is acceptable
            assert isinstance(outcome, NbdError) and outcome.error == c.NBD_ESHUTDOWN, outcome
    assert any(outcome is None for outcome in results)
    assert "stopped" in server.log


async def test_during_shutdown_options_get_err_shutdown_and_requests_eshutdown(
        blocking_flush_server):
    """In-process: hold a FLUSH in flight so the shutdown window stays open."""
    server, export, path = blocking_flush_server
    busy = await NbdClient.connect(unix=path)
    haggling = await NbdClient.open_handshake(unix=path)
    flush = asyncio.ensure_future(busy.flush())
    await export.flush_entered()
    stopping = asyncio.ensure_future(server.shutdown())
    await wait_until(lambda: server.connections.stopping, what="shutdown to begin")
    with pytest.raises(OptionRefused) as refused:
        await haggling.list_exports()
    assert refused.value.reply_type == c.NBD_REP_ERR_SHUTDOWN
    with pytest.raises(NbdError) as error:
        await busy.read(0, 512)
    assert error.value.error == c.NBD_ESHUTDOWN
    export.release.set()
    await flush  # the in-flight request completed normally
    await asyncio.wait_for(stopping, 10)
    assert export.image.fd == -1


def test_control_socket_in_a_missing_directory_is_one_usage_line(image, tmp_path):
    """Refused before anything is opened: exit 2, one line, no traceback, and no QDB
    file left marked in use."""
    result = run(*NBDSERVE, "serve", str(image), "-k", str(tmp_path / "s"), "--bitmap", "b",
                 "--control", str(tmp_path / "missing" / "ctl.sock"), check=False)
    assert result.returncode == 2, result.stderr
    assert "control:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "disk.img.qdb").exists()


def test_a_port_in_use_fails_before_the_bitmaps_are_touched(image, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        result = run(*NBDSERVE, "serve", str(image), "-p", str(port), "--bitmap", "b",
                     check=False)
    finally:
        busy.close()
    assert result.returncode == 1, result.stderr
    assert "cannot listen" in result.stderr
    assert "saved" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "disk.img.qdb").exists()  # nothing was created or saved


def test_sigterm_as_soon_as_the_socket_exists_stops_gracefully(image, tmp_path):
    """A supervisor may signal us the moment the listener exists, before the event loop
    runs: the stop must still be graceful (bitmaps saved, not left in use)."""
    import subprocess
    import time

    from nbdserve.bitmaps.qdb import read_qdb

    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([*NBDSERVE, "serve", str(image), "-k", str(sock), "--bitmap", "b"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "stopped" in stderr and "Traceback" not in stderr
    assert not read_qdb(str(image) + ".qdb").in_use


def handshake_raw(sock: socket.socket) -> None:
    """Fixed newstyle, GO on the default export, no structured replies."""
    import struct
    stream = sock.makefile("rb")
    assert len(stream.read(18)) == 18
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 6)
                 + struct.pack(">IH", 0, 0))
    while True:
        _magic, _option, reply_type, length = struct.unpack(">QIII", stream.read(20))
        stream.read(length)
        if reply_type == 1:
            return


@pytest.mark.parametrize("unix", [True, False])
def test_a_burst_then_an_abrupt_hang_up_leaves_no_traceback(image, start_server, unix):
    """A client that sends a receive buffer's worth of requests and resets at once:
    the replies have nowhere to go, and that is not an error of ours."""
    import struct
    server = start_server(image, unix=unix)
    for _ in range(10):
        if unix:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(server.unix))
        else:
            sock = socket.create_connection((server.host, server.port))
        handshake_raw(sock)
        # Exactly one receive buffer's worth (the last request cut short).
        burst = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 4096)
                         for i in range((256 << 10) // 28 + 1))[:256 << 10]
        sock.sendall(burst)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    run("nbdinfo", server.uri())  # still serving
    assert "Traceback" not in server.log and "ERROR" not in server.log, server.log


def test_tcp_connect_then_reset_costs_one_debug_line_at_most(image, start_server):
    import struct
    server = start_server(image, unix=False)
    for _ in range(50):
        sock = socket.create_connection((server.host, server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST at once, perhaps before the server's accept runs
    run("nbdinfo", server.uri())
    assert "Traceback" not in server.log and "ERROR" not in server.log, server.log


def test_deeply_nested_json_on_the_control_socket_gets_an_error_reply(image, start_server,
                                                                      tmp_path):
    import json
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--control", str(control))
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(control))
    replies = sock.makefile("rb")
    replies.readline()  # greeting
    sock.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    reply = json.loads(replies.readline())
    assert reply["error"]["class"] == "GenericError" and "nested" in reply["error"]["desc"]
    sock.sendall(b'{"execute": "query-status"}\n')  # the connection still works
    assert "exports" in json.loads(replies.readline())["return"]
    sock.close()
    assert "Traceback" not in server.log, server.log


def test_sigterm_with_a_control_client_connected_is_clean(image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--control", str(control))
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(control))
    sock.makefile("rb").readline()  # greeting: the client is being served
    assert server.stop() == 0
    sock.close()
    assert "stopped" in server.log
    assert "Traceback" not in server.log and "ERROR" not in server.log, server.log


async def test_the_queue_behind_a_connection_limit_is_bounded(image, start_server, tmp_path):
    from nbdserve.server.connections import WAITING_MAX
    control = tmp_path / "ctl.sock"
    server = start_server(image, "-e", "1", "--control", str(control))
    first = await NbdClient.connect(**server.client_args())
    extra = []
    for _ in range(WAITING_MAX + 3):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(server.unix))
        extra.append(sock)
    await wait_until(lambda: connection_states(control).count("waiting") == WAITING_MAX
                     and len(connection_states(control)) == WAITING_MAX + 1,
                     what="the queue to fill")
    for sock in extra:
        sock.setblocking(False)

    def hung_up() -> int:
        count = 0
        for sock in extra:
            try:
                count += sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                pass  # still waiting, as it should
        return count

    await wait_until(lambda: hung_up() >= 3, what="the extra clients to be hung up on")
    assert hung_up() == 3
    for sock in extra:
        sock.close()
    assert "clients already wait for a connection slot" in server.log
    await first.disconnect()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to try as another user")
def test_status_on_a_control_socket_the_user_may_not_open_is_a_runtime_error(
        image, start_server, tmp_path):
    """Exit 1 with one line, as documented; not click's usage error (exit 2)."""
    import subprocess
    control = tmp_path / "ctl.sock"
    start_server(image, "--control", str(control))
    # A user the socket's mode shuts out: root without the capabilities that override
    # file modes (another uid could not read a checkout in a private directory, such
    # as a clone under mktemp -d, and would fail before reaching the socket).
    os.chmod(control, 0)
    no_override = "-dac_override,-dac_read_search"
    result = subprocess.run(
        ["setpriv", f"--bounding-set={no_override}", f"--inh-caps={no_override}",
         *NBDSERVE, "status", "--control", str(control)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "cannot reach" in result.stderr and "Permission denied" in result.stderr


async def test_a_connection_that_ends_leaves_nothing_for_the_cycle_collector(image, tmp_path):
    """Buffers must go when the connection goes, not when the cycle collector next runs
    (a stream and its callbacks used to keep each other alive)."""
    import gc

    from nbdserve.server.stream import NbdStream

    path = str(tmp_path / "s.sock")
    server = Server(ExportCatalog([Export(ExportConfig("", str(image)),
                                          RawImage(str(image)))]), [bind_unix(path)])
    await server.start()
    gc.collect()
    gc.disable()
    try:
        # Ended in the handshake; by DISC, or by going, with requests served as they
        # arrived; by DISC after a WRITE that needed the request loop.
        for ending in ("abort", "disc", "gone", "loop") * 3:
            if ending == "abort":
                haggling = await NbdClient.open_handshake(unix=path)
                await haggling.abort()
                continue
            client = await NbdClient.connect(unix=path)
            await client.write(0, bytes(128 << 10 if ending == "loop" else 4096))
            if ending == "gone":
                client.writer.close()
            else:
                await client.disconnect()
        await wait_until(lambda: not list(server.connections), what="all connections gone")
        await asyncio.sleep(0.05)  # let the last callbacks run
        alive = [o for o in gc.get_objects() if isinstance(o, NbdStream)]
        assert alive == [], f"{len(alive)} streams kept alive by reference cycles"
    finally:
        gc.enable()
        await server.shutdown()


async def test_handshakes_at_once_are_bounded(image, tmp_path):
    """Issue 12: handshake memory across all connections is bounded by the number of
    handshakes at once; clients over it wait, greeted in turn when one ends."""
    path = str(tmp_path / "s.sock")
    server = Server(ExportCatalog([Export(ExportConfig("", str(image)),
                                          RawImage(str(image)))]), [bind_unix(path)])
    server.connections.max_handshakes = 2
    await server.start()
    streams = []
    try:
        for _ in range(3):
            streams.append(await asyncio.open_unix_connection(path))

        async def greeted(reader) -> bool:
            try:
                await asyncio.wait_for(reader.readexactly(18), 0.5)
                return True
            except TimeoutError:
                return False

        assert [await greeted(reader) for reader, _ in streams] == [True, True, False]
        streams[0][1].close()  # one handshake ends: the waiting client's turn
        assert await greeted(streams[2][0])
    finally:
        for _, writer in streams:
            writer.close()
        await server.shutdown()


async def test_a_burst_of_connections_is_logged_in_a_summary(image, start_server):
    """More than 20 connections in a second: the first are logged one by one, the
    rest counted in one line at the end of the second; every one is accounted for.
    At --log-level debug each is logged."""
    for level, burst in (("info", 120), ("debug", 40)):
        server = start_server(image, "--log-level", level)
        for _ in range(burst):
            nbd = await NbdClient.connect(**server.client_args())
            await nbd.disconnect()
        await asyncio.sleep(1.2)  # the summary comes at the end of the second
        one_by_one = len(re.findall(r": connected to export ''", server.log))
        left = len(re.findall(r": disconnected from export ''", server.log))
        counted = sum(int(n) for n in re.findall(r"(\d+) more connections in the last "
                                                 r"second, not logged one by one", server.log))
        assert one_by_one == left  # a connection's two lines go together
        assert one_by_one + counted == burst, server.log
        if level == "info":
            assert 20 <= one_by_one < burst and counted
        else:
            assert one_by_one == burst and not counted
        server.stop()


class FaultyWriteExport(Export):
    """An export whose CACHE has a bug: it raises something no request expects."""

    def cache(self, offset: int, length: int) -> None:
        raise RuntimeError("a bug in CACHE")


async def test_a_bug_in_a_request_costs_its_connection_only(image, tmp_path, caplog):
    """A request that raises unexpectedly, whether served as it arrives or by the
    request loop, ends its own connection (logged with the traceback); the server
    serves the next client."""
    export = FaultyWriteExport(ExportConfig("", str(image)), RawImage(str(image)))
    path = str(tmp_path / "faulty.sock")
    server = Server(ExportCatalog([export]), [bind_unix(path)], poll_max_us=0)
    await server.start()
    try:
        for pipelined in (False, True):
            nbd = await NbdClient.connect(unix=path)
            assert await nbd.read(0, 4096) == image.read_bytes()[:4096]
            if pipelined:  # the CACHE behind a READ in one burst
                read = asyncio.ensure_future(nbd.read(0, 4096))
                await asyncio.sleep(0)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError, NbdError)):
                await asyncio.wait_for(nbd.cache(0, 4096), 10)
            if pipelined:
                assert (await read) == image.read_bytes()[:4096]
            await wait_until(lambda: not server.connections.live, what="connection closed")
            await nbd.disconnect()
        assert caplog.text.count("connection failed") == 2
        assert caplog.text.count("RuntimeError: a bug in CACHE") == 2
        nbd = await NbdClient.connect(unix=path)  # the server is fine
        await nbd.write(0, b"x" * 512)
        await nbd.disconnect()
    finally:
        await server.shutdown()


def bitmap_server(image, tmp_path, export_class: type[Export] = Export):
    """An in-process server (not started) of image with one recording bitmap, b0, on a
    Unix socket, without busy-polling. Returns it, the export, its store and the
    socket's path."""
    from nbdserve.bitmaps.store import BitmapStore
    from nbdserve.config import BitmapRequest

    raw = RawImage(str(image))
    store = BitmapStore.open(str(image) + ".qdb", raw.size, raw.identity,
                             requests=[BitmapRequest("b0")])
    export = export_class(ExportConfig("", str(image)), raw, store)
    path = str(tmp_path / "s.sock")
    server = Server(ExportCatalog([export]), [bind_unix(path)], poll_max_us=0)
    return server, export, store, path


class SlowFlushExport(Export):
    """An export whose FLUSH takes a while (and says when it is done)."""

    flushed = False

    def flush(self) -> None:
        time.sleep(0.3)
        super().flush()
        self.flushed = True


async def test_requests_served_as_they_arrive_need_no_request_loop(image, tmp_path,
                                                                     monkeypatch, caplog):
    """A connection whose requests are all served as they arrive is served from the
    stream's callbacks alone, to its end (DISC, or a client that just goes): no task
    for its request loop. A request that needs the loop (a large WRITE) starts it, and
    so does a hang-up with a request still in flight. However it ends, what the
    connection counted is undone: the export's connections, the bitmap it kept busy,
    its "disconnected" line."""
    from nbdserve.server.connections import Connections

    server, export, store, path = bitmap_server(image, tmp_path, SlowFlushExport)
    loops: list[str] = []
    start_loop = Connections.start_loop

    def counted(self, connection) -> None:
        if connection.task is None:
            loops.append(connection.peer)
        start_loop(self, connection)

    monkeypatch.setattr(Connections, "start_loop", counted)
    caplog.set_level("INFO", logger="nbdserve.server")
    await server.start()
    bitmap = store.bitmaps["b0"]
    small, large = os.urandom(4096), os.urandom(1 << 20)

    async def connect() -> NbdClient:
        nbd = await NbdClient.connect(unix=path, meta_contexts=["qemu:dirty-bitmap:b0"])
        assert (export.connections, bitmap.busy) == (1, 1)
        return nbd

    async def ended() -> None:
        await wait_until(lambda: not server.connections.live, what="the client gone")
        await wait_until(lambda: export.connections == 0, what="its book-keeping done")
        assert bitmap.busy == 0

    try:
        # 1. Small requests, then DISC: all from the callbacks.
        nbd = await connect()
        await nbd.write(0, small)
        assert await nbd.read(0, 4096) == small
        await nbd.disconnect()
        await ended()
        assert loops == []
        # 2. The client goes without DISC: still no loop.
        nbd = await connect()
        await nbd.write(8192, small)
        nbd.writer.close()
        await ended()
        assert loops == []
        # 3. A large WRITE needs the loop, which then serves the rest.
        nbd = await connect()
        await nbd.write(1 << 20, large)
        assert await nbd.read(1 << 20, len(large)) == large
        await nbd.disconnect()
        await ended()
        assert len(loops) == 1
        # 4. A FLUSH still in flight when the client goes: the loop starts to let it
        #    finish before the connection's end is accounted for.
        nbd = await connect()
        nbd.submit(c.NBD_CMD_FLUSH, 0, 0)
        await nbd.writer.drain()
        await wait_until(lambda: server.connections.inflight(), what="FLUSH in flight")
        nbd.writer.close()
        await ended()
        assert export.flushed
        assert len(loops) == 2
        # 5. The same while something waits for the connection to finish (as
        #    shutdown and export removal do): it hears of the end once the FLUSH
        #    is done and the connection accounted for, not when the client went.
        export.flushed = False
        nbd = await connect()
        nbd.submit(c.NBD_CMD_FLUSH, 0, 0)
        await nbd.writer.drain()
        await wait_until(lambda: server.connections.inflight(), what="FLUSH in flight")
        (connection,) = server.connections.live
        finished = connection.finished()
        nbd.writer.close()
        await asyncio.wait_for(finished, 5)
        assert export.flushed
        assert (export.connections, bitmap.busy) == (0, 0)
        assert len(loops) == 3
        assert caplog.text.count("disconnected from export") == 5
        assert image_holds(image, 0, small) and image_holds(image, 8192, small)
    finally:
        await server.shutdown()


async def test_a_client_that_only_says_goodbye_is_served_with_nothing_built(
        image, tmp_path, monkeypatch, caplog):
    """A client that reads the handshake's answers and sends DISC (nbdinfo --size, a
    health probe) is hung up on without anything built to serve requests; the first
    request of any other kind builds it, also when it came in the GO's packet. Either
    way the connection counts as in transmission until it ends, and its end undoes
    what it counted."""
    import struct

    from nbdserve.server import connections as connections_module

    server, export, store, path = bitmap_server(image, tmp_path)
    built: list[str] = []
    transmission_class = connections_module.Transmission

    def counted(stream, session, *args, **kwargs):
        built.append(session.export.name)
        return transmission_class(stream, session, *args, **kwargs)

    monkeypatch.setattr(connections_module, "Transmission", counted)
    caplog.set_level("INFO", logger="nbdserve.server")
    await server.start()
    bitmap = store.bitmaps["b0"]
    data = os.urandom(4096)
    with open(image, "r+b") as f:
        f.write(data)

    async def ended() -> None:
        await wait_until(lambda: not server.connections.live, what="the client gone")
        assert (export.connections, bitmap.busy) == (0, 0)

    def raw_go(extra: bytes) -> tuple[socket.socket, object]:
        """GO on the default export with `extra` in the same packet; the option
        replies read."""
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        stream = sock.makefile("rb")
        assert len(stream.read(18)) == 18
        sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 6)
                     + struct.pack(">IH", 0, 0) + extra)
        while True:
            _magic, _option, reply_type, length = struct.unpack(">QIII", stream.read(20))
            stream.read(length)
            if reply_type == 1:
                return sock, stream

    try:
        for extended in (False, True):
            # 1. Connected and idle: in transmission, with what it holds, and nothing
            #    built yet. Then DISC.
            nbd = await NbdClient.connect(unix=path, extended=extended,
                                          meta_contexts=["qemu:dirty-bitmap:b0"])
            assert nbd.extended == extended
            assert (export.connections, bitmap.busy) == (1, 1)
            (state,) = [conn.describe() for conn in server.connections]
            assert (state["state"], state["requests"], state["in_flight"]) == \
                ("transmission", 0, 0)
            await nbd.disconnect()
            await ended()
            assert built == []
        # 2. The client goes without a request: the same.
        nbd = await NbdClient.connect(unix=path)
        nbd.writer.close()
        await ended()
        assert built == []
        # 3. A first request that is not DISC builds what serves it.
        nbd = await NbdClient.connect(unix=path)
        assert await nbd.read(0, 4096) == data
        await nbd.disconnect()
        await ended()
        assert built == [""]
        # 4. DISC, then a READ, in the GO's packet: hung up on, the READ unanswered.
        sock, stream = await asyncio.to_thread(
            raw_go, struct.pack(">IHHQQI", 0x25609513, 0, c.NBD_CMD_DISC, 1, 0, 0)
            + struct.pack(">IHHQQI", 0x25609513, 0, c.NBD_CMD_READ, 2, 0, 4096))
        assert await asyncio.to_thread(stream.read, 1) == b""
        sock.close()
        await ended()
        assert built == [""]
        # 5. A READ, then DISC, in the GO's packet: answered, then hung up on.
        sock, stream = await asyncio.to_thread(
            raw_go, struct.pack(">IHHQQI", 0x25609513, 0, c.NBD_CMD_READ, 7, 0, 4096)
            + struct.pack(">IHHQQI", 0x25609513, 0, c.NBD_CMD_DISC, 8, 0, 0))
        reply = await asyncio.to_thread(stream.read, 16 + 4096 + 1)
        assert reply == struct.pack(">IIQ", c.NBD_SIMPLE_REPLY_MAGIC, 0, 7) + data
        sock.close()
        await ended()
        assert built == ["", ""]
        assert caplog.text.count("disconnected from export") == 6
        assert caplog.text.count("after 0 requests") == 4
    finally:
        await server.shutdown()


def image_holds(image, offset: int, data: bytes) -> bool:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(len(data)) == data


async def test_payload_held_by_unanswered_requests_holds_back_the_next_ones(
        image, tmp_path, monkeypatch):
    """Backpressure: once the requests in worker threads hold more than the limit, the
    server serves no further request until some finish. A cached READ sent behind slow
    ones (READ with FUA flushes first) is then answered after one of them, not at once:
    before the request loop runs (the first round) and while it waits for a header
    (the second)."""
    from nbdserve.server import transmission

    monkeypatch.setattr(transmission, "MAX_INFLIGHT_BYTES", 8192)
    export = SlowFlushExport(ExportConfig("", str(image)), RawImage(str(image)))
    path = str(tmp_path / "s.sock")
    server = Server(ExportCatalog([export]), [bind_unix(path)], poll_max_us=0)
    await server.start()
    data = image.read_bytes()
    order: list[str] = []
    try:
        nbd = await NbdClient.connect(unix=path)
        for _round in range(2):  # the limit engages again once it was lifted
            futures = []
            for i in range(3):
                future = nbd.submit(c.NBD_CMD_READ, i * 4096, 4096, c.NBD_CMD_FLAG_FUA)
                future.add_done_callback(lambda _f, i=i: order.append(f"slow{i}"))
                futures.append(future)
            cached = nbd.submit(c.NBD_CMD_READ, 1 << 20, 4096)
            cached.add_done_callback(lambda _f: order.append("cached"))
            await nbd.writer.drain()
            replies = await asyncio.wait_for(asyncio.gather(*futures, cached), 30)
            assert [bytes(r) for r in replies] == [data[i * 4096:(i + 1) * 4096]
                                                   for i in range(3)] + \
                [data[1 << 20:(1 << 20) + 4096]]
            assert order.index("cached") > 0, order  # after a slow one at least
            order.clear()
        await nbd.disconnect()
    finally:
        await server.shutdown()
