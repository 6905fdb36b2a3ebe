"""TLS with real clients: nbdinfo/nbdcopy (nbds://), qemu-img (tls-creds-x509), our client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
from pathlib import Path

import pytest
import trustme

from conftest import NBDSERVE, run
from nbdserve.client import NbdClient, OptionRefused
from nbdserve.config import ExportConfig
from nbdserve.export import Export, ExportCatalog
from nbdserve.image import RawImage
from nbdserve.protocol import constants as c
from nbdserve.server.lifecycle import Server
from nbdserve.server.listener import bind_tcp
from nbdserve.tls import TlsConfig


class Pki:
    """A CA, a server certificate for 127.0.0.1, and client directories in libnbd's and
    QEMU's layout (ca-cert.pem, client-cert.pem, client-key.pem)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA(organization_name="nbdserve tests")
        server = self.ca.issue_cert("127.0.0.1", "localhost", common_name="nbd-server")
        self.server_cert = root / "server-cert.pem"
        self.server_key = root / "server-key.pem"
        self.ca_cert = root / "ca-cert.pem"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        self.ca.cert_pem.write_to_path(str(self.ca_cert))

    def client_dir(self, name: str, common_name: str | None = None,
                   ca: trustme.CA | None = None) -> Path:
        directory = self.root / name
        directory.mkdir()
        self.ca.cert_pem.write_to_path(str(directory / "ca-cert.pem"))
        if common_name is not None:
            cert = (ca or self.ca).issue_cert(f"{common_name}@example.org",
                                               common_name=common_name,
                                               organization_name="Example",
                                               organization_unit_name="Backups")
            cert.cert_chain_pems[0].write_to_path(str(directory / "client-cert.pem"))
            cert.private_key_pem.write_to_path(str(directory / "client-key.pem"))
        return directory

    def server_args(self, mode: str = "require", *extra: str) -> list[str]:
        return ["--tls", mode, "--tls-cert", str(self.server_cert), "--tls-key",
                str(self.server_key), "--tls-ca", str(self.ca_cert), *extra]

    def client_context(self, client_dir: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if client_dir is not None and (client_dir / "client-cert.pem").exists():
            context.load_cert_chain(client_dir / "client-cert.pem",
                                    client_dir / "client-key.pem")
        return context


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def tls_uri(server, directory: Path, export: str = "") -> str:
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={directory}"


def test_require_mode_with_nbdinfo_and_plain_clients(image, start_server, pki):
    server = start_server(image, *pki.server_args("require"), unix=False)
    anonymous = pki.client_dir("anonymous")
    info = json.loads(run("nbdinfo", "--json", tls_uri(server, anonymous)).stdout)
    assert info["exports"][0]["export-size"] == 64 << 20
    assert info["protocol"] == "newstyle-fixed" and info["TLS"] is True
    plain = run("nbdinfo", server.uri(), check=False)
    assert plain.returncode != 0
    server.wait_for_log(r"TLSv1\.[23] established")


def test_data_integrity_over_tls_with_nbdcopy(image, start_server, pki, tmp_path):
    server = start_server(image, *pki.server_args("require"), unix=False)
    anonymous = pki.client_dir("anonymous")
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(24 << 20) + bytes(16 << 20) + os.urandom(24 << 20))
    run("nbdcopy", "--connections=4", "--threads=4", str(source), tls_uri(server, anonymous))
    back = tmp_path / "back.raw"
    run("nbdcopy", tls_uri(server, anonymous), str(back))
    assert back.read_bytes() == source.read_bytes() == image.read_bytes()


def test_qemu_img_over_tls(image, start_server, pki):
    server = start_server(image, *pki.server_args("require"), unix=False)
    creds = pki.client_dir("qemu", common_name="qemu-client")
    opts = (f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={server.port},"
            "tls-creds=tls0")
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}"
    run("qemu-io", "--object", obj, "--image-opts", opts, "-c", "write -P 0x61 0 64k")
    info = json.loads(run("qemu-img", "info", "--output=json", "--object", obj,
                          "--image-opts", opts).stdout)
    assert info["virtual-size"] == 64 << 20
    assert image.read_bytes()[:65536] == b"a" * 65536


def test_client_certificates_are_verified_and_subjects_filtered(image, start_server, pki):
    server = start_server(image, *pki.server_args(
        "require", "--tls-verify-client", "--tls-allow-subject", "CN=backup,OU=Backups,O=*"),
        unix=False)
    allowed = pki.client_dir("allowed", common_name="backup")
    assert run("nbdinfo", "--size", tls_uri(server, allowed)).stdout.strip() == str(64 << 20)
    server.wait_for_log("with client CN=backup,OU=Backups,O=Example")
    no_cert = pki.client_dir("no-cert")
    assert run("nbdinfo", "--size", tls_uri(server, no_cert), check=False).returncode != 0
    server.wait_for_log("TLS handshake failed")
    unlisted = pki.client_dir("unlisted", common_name="intruder")
    assert run("nbdinfo", "--size", tls_uri(server, unlisted), check=False).returncode != 0
    server.wait_for_log("subject 'CN=intruder,OU=Backups,O=Example' is not allowed")
    foreign = pki.client_dir("foreign", common_name="backup", ca=trustme.CA())
    assert run("nbdinfo", "--size", tls_uri(server, foreign), check=False).returncode != 0


def test_wrong_ca_on_the_client_side_is_refused(image, start_server, pki, tmp_path):
    server = start_server(image, *pki.server_args("require"), unix=False)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    trustme.CA().cert_pem.write_to_path(str(wrong / "ca-cert.pem"))
    result = run("nbdinfo", "--size", tls_uri(server, wrong), check=False)
    assert result.returncode != 0 and "certificate" in result.stderr.lower()


def test_raw_client_before_tls_in_require_mode(image, start_server, pki):
    server = start_server(image, *pki.server_args("require"), unix=False)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.recv(18)
        sock.sendall(struct.pack(">I", 3))
        for option in (c.NBD_OPT_LIST, 99):
            sock.sendall(struct.pack(">QII", c.IHAVEOPT, option, 0))
            _, echoed, kind, length = struct.unpack(">QIII", sock.recv(20))
            assert kind == c.NBD_REP_ERR_TLS_REQD
            sock.recv(length)
        sock.sendall(struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_ABORT, 0))
        assert struct.unpack(">QIII", sock.recv(20))[2] == c.NBD_REP_ACK


def test_client_dropping_mid_handshake_leaves_the_server_serving(image, start_server, pki):
    server = start_server(image, *pki.server_args("require"), unix=False)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.recv(18)
            sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", c.IHAVEOPT,
                                                             c.NBD_OPT_STARTTLS, 0))
            sock.recv(20)
            sock.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, then gone
    anonymous = pki.client_dir("anonymous")
    assert run("nbdinfo", "--size", tls_uri(server, anonymous)).stdout.strip() == \
        str(64 << 20)


async def test_own_client_over_tls_with_bitmap_contexts(image, start_server, pki):
    server = start_server(image, *pki.server_args("require"), "--bitmap", "b0", unix=False)
    context = pki.client_context()
    async with await NbdClient.connect(port=server.port, tls=context,
                                       meta_contexts=["qemu:dirty-bitmap:b0"]) as nbd:
        await nbd.write(1 << 20, b"z" * 8192)
        assert await nbd.read(1 << 20, 8192) == b"z" * 8192
        status = await nbd.block_status(0, 4 << 20)
        assert status["qemu:dirty-bitmap:b0"] == [(1 << 20, 0), (65536, 1),
                                                  ((3 << 20) - 65536, 0)]
    nbd = await NbdClient.open_handshake(port=server.port)
    await nbd.starttls(context, "127.0.0.1")
    with pytest.raises(OptionRefused) as refused:
        await nbd.option(c.NBD_OPT_STARTTLS)
    assert refused.value.reply_type == c.NBD_REP_ERR_INVALID
    await nbd.abort()
    anonymous = pki.client_dir("anonymous")
    out = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json",
              tls_uri(server, anonymous)).stdout
    assert [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1] == \
        [(1 << 20, 65536)]


async def test_optional_mode_with_a_tls_only_export(image, tmp_path, pki):
    """In-process: one export open to all, one only over TLS (SELECTIVETLS)."""
    other = tmp_path / "secure.img"
    with open(other, "wb") as f:
        f.truncate(1 << 20)
    catalog = ExportCatalog([
        Export(ExportConfig("open", str(image)), RawImage(str(image))),
        Export(ExportConfig("secure", str(other), tls_required=True), RawImage(str(other))),
    ])
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    tls = TlsConfig("optional", str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    server = Server(catalog, [sock], tls=tls)
    await server.start()
    try:
        plain = await NbdClient.open_handshake(port=port)
        assert await plain.list_exports() == [("open", "")]
        with pytest.raises(OptionRefused) as refused:
            await plain.info("secure")
        assert refused.value.reply_type == c.NBD_REP_ERR_TLS_REQD
        await plain.go("open")
        assert len(await plain.read(0, 4096)) == 4096
        await plain.disconnect()
        secure = await NbdClient.connect(port=port, export="secure",
                                         tls=pki.client_context())
        assert secure.size == 1 << 20
        await secure.disconnect()
        anonymous = pki.client_dir("anonymous")
        proc = await asyncio.create_subprocess_exec(
            "nbdinfo", "--list", "--json", f"nbds://127.0.0.1:{port}/?tls-certificates="
            f"{anonymous}", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        names = {e["export-name"] for e in json.loads(out)["exports"]}
        assert names == {"open", "secure"}
    finally:
        await server.shutdown()


def test_tls_options_are_checked_at_start(image, pki, tmp_path):
    result = run(*NBDSERVE, "serve", str(image), "-k", str(tmp_path / "s"), "--tls", "require",
                 check=False)
    assert result.returncode == 2 and "needs --tls-cert and --tls-key" in result.stderr
    result = run(*NBDSERVE, "serve", str(image), "-k", str(tmp_path / "s"), "--tls", "require",
                 "--tls-cert", str(pki.ca_cert), "--tls-key", str(pki.ca_cert), check=False)
    assert result.returncode == 2
    assert f"--tls-key {pki.ca_cert}: not a readable PEM private key" in result.stderr


@pytest.mark.parametrize("ending", ["disc", "abort"])
def test_tls_session_ends_with_close_notify(image, start_server, pki, ending):
    """After DISC (transmission) or ABORT (haggling) the server ends TLS properly: the
    client reads a clean close_notify, not a truncated stream."""
    server = start_server(image, *pki.server_args("require"), unix=False)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    raw.recv(18)
    raw.sendall(struct.pack(">I", 3) + struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_STARTTLS, 0))
    assert struct.unpack(">QIII", raw.recv(20))[2] == c.NBD_REP_ACK
    tls = pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1",
                                           suppress_ragged_eofs=False)

    def recv_exactly(n):
        data = b""
        while len(data) < n:
            data += tls.recv(n - len(data))
        return data

    if ending == "abort":
        tls.sendall(struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_ABORT, 0))
        assert struct.unpack(">QIII", recv_exactly(20))[2] == c.NBD_REP_ACK
    else:
        go = struct.pack(">IH", 0, 0)
        tls.sendall(struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_GO, len(go)) + go)
        while True:
            _, _, kind, length = struct.unpack(">QIII", recv_exactly(20))
            recv_exactly(length)
            if kind == c.NBD_REP_ACK:
                break
        tls.sendall(struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0, 0, 0))
    # A clean TLS shutdown reads as end of stream; a bare TCP close raises SSLEOFError.
    assert tls.recv(1) == b""
    tls.close()


def test_a_tls_handshake_cut_off_by_the_timeout_is_not_logged_as_established(
        image, start_server, pki):
    import struct
    server = start_server(image, *pki.server_args(), "--handshake-timeout", "0.5",
                          unix=False)
    sock = socket.create_connection((server.host, server.port))
    first_peer = f"127.0.0.1:{sock.getsockname()[1]}:"
    stream = sock.makefile("rb")
    stream.read(18)
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054,
                                                    c.NBD_OPT_STARTTLS, 0))
    stream.read(20)  # the ACK; then no ClientHello: the TLS handshake never ends
    assert stream.read(1) == b""  # hung up on by the handshake deadline
    sock.close()
    server.wait_for_log("handshake not finished")
    run("nbdinfo", tls_uri(server, pki.client_dir("c")))  # a real client still gets in
    lines = [line for line in server.lines if first_peer in line]
    assert lines, server.log
    assert not any("established" in line for line in lines), lines
    assert not any(line.rstrip().endswith("TLS handshake failed:") for line in lines), lines


def test_a_tls_connection_that_ends_leaves_nothing_for_the_cycle_collector(image, pki,
                                                                         tmp_path):
    """Issue 12, item 11: uvloop's TLS protocol holds the stream's bound methods. The
    stream lets go of the transport and its buffers when the connection is lost, so
    nothing waits for the cycle collector (RSS grew with every TLS client before). Run
    on uvloop, as the server runs."""
    import gc

    import uvloop

    from nbdserve.server.listener import bind_unix
    from nbdserve.server.stream import NbdStream

    path = str(tmp_path / "s.sock")
    tls = TlsConfig("require", str(pki.server_cert), str(pki.server_key))

    async def scenario() -> list:
        server = Server(ExportCatalog([Export(ExportConfig("", str(image)),
                                              RawImage(str(image)))]), [bind_unix(path)],
                        tls=tls)
        await server.start()
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                client = await NbdClient.connect(unix=path, tls=pki.client_context(),
                                                 tls_hostname="127.0.0.1")
                assert await client.read(0, 4096) == bytes(4096)
                await client.disconnect()
            for _ in range(100):
                if not list(server.connections):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
            return [o for o in gc.get_objects() if isinstance(o, NbdStream)]
        finally:
            gc.enable()
            await server.shutdown()

    loop = uvloop.new_event_loop()
    try:
        alive = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert alive == [], f"{len(alive)} TLS streams kept alive by reference cycles"
