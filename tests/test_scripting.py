"""Running nbdserve from scripts: --fork, --pid-file, --run, -U -, --exit-with-parent and
--oneshot, each driven as a shell script would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import NBDSERVE, run


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_fork_prints_the_uri_and_the_pid_file_stops_it(image, tmp_path):
    pid_file = tmp_path / "nbdserve.pid"
    started = time.monotonic()
    result = run(*NBDSERVE, "serve", str(image), "--fork", "--pid-file", str(pid_file),
                 "-b", "127.0.0.1", "-p", "0", "--log-level", "warning")
    assert time.monotonic() - started < 30
    uri = result.stdout.strip()
    assert uri.startswith("nbd://127.0.0.1:") and not uri.endswith(":0/")
    # Ready means ready: no polling needed before the first client.
    assert run("nbdinfo", "--size", uri).stdout.strip() == str(64 << 20)
    pid = int(pid_file.read_text())
    os.kill(pid, 15)
    assert gone(pid)
    assert not pid_file.exists()


def test_fork_reports_a_server_that_cannot_start(tmp_path):
    missing = tmp_path / "missing.img"
    result = run(*NBDSERVE, "serve", str(missing), "--fork", "-k", str(tmp_path / "s"),
                 check=False)
    assert result.returncode == 1 and "cannot open image" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_private_socket(image, tmp_path):
    with open(image, "r+b") as f:
        f.write(b"\x5a" * 65536)
    out = tmp_path / "out.img"
    result = run(*NBDSERVE, "serve", str(image), "-U", "-", "--log-level", "warning",
                 "--run", f'echo "$unixsocket" > {tmp_path}/sock; nbdcopy "$uri" {out}')
    assert out.read_bytes() == image.read_bytes()
    socket_dir = Path((tmp_path / "sock").read_text().strip()).parent
    assert not socket_dir.exists(), "the private socket directory is removed at exit"
    del result
    failed = run(*NBDSERVE, "serve", str(image), "-U", "-", "--run", "exit 7",
                 check=False)
    assert failed.returncode == 7


def test_exit_with_parent(image, tmp_path):
    pid_file = tmp_path / "pid"
    script = (f"{' '.join(NBDSERVE)} serve {image} -k {tmp_path}/s --exit-with-parent "
              f"--pid-file {pid_file} 2>/dev/null & "
              f"while [ ! -s {pid_file} ]; do sleep 0.05; done; cat {pid_file}")
    # The shell exits as soon as the server is ready; the server must follow it.
    pid = int(subprocess.run(["sh", "-c", script], timeout=60, check=True,
                             capture_output=True, text=True).stdout)
    assert gone(pid), "the server outlived its parent"
    assert not pid_file.exists()


def test_oneshot_stops_after_the_last_client(image, tmp_path):
    sock = tmp_path / "s"
    proc = subprocess.Popen([*NBDSERVE, "serve", str(image), "-k", str(sock), "--oneshot"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "ready (pid" in line:
            break
    assert proc.poll() is None  # no client yet: it waits
    run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
    assert proc.wait(10) == 0


def test_fork_and_run_do_not_mix(image):
    result = run(*NBDSERVE, "serve", str(image), "--fork", "--run", "true", check=False)
    assert result.returncode == 2 and "--fork" in result.stderr


def test_messages_for_common_mistakes(image, tmp_path):
    """One line each, with the exit status of its kind (2: usage, 1: runtime)."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    sock = str(tmp_path / "s")
    result = run(*NBDSERVE, "serve", str(image), "-k", sock, "--tls", "require",
                 "--tls-cert", str(bad), "--tls-key", str(bad), check=False)
    assert result.returncode == 2 and f"--tls-cert {bad}: not a readable PEM" in result.stderr
    for size, message in (("0", "positive multiple of 512"),
                          ("10GB", "as qemu-img reads them: 10G, not 10GB")):
        result = run(*NBDSERVE, "serve", str(tmp_path / "new.img"), "--create", size,
                     "-k", sock, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "new.img").exists()


def test_a_read_only_image_without_r_suggests_r(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        raise AssertionError("cannot mount a tmpfs (the suite runs as root)")
    try:
        with open(mount / "disk.img", "wb") as f:
            f.truncate(1 << 20)
        run("mount", "-o", "remount,ro", str(mount))
        result = run(*NBDSERVE, "serve", str(mount / "disk.img"), "-k",
                     str(tmp_path / "s"), check=False)
        assert result.returncode == 1
        assert "Read-only file system; to serve it read-only, add -r" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_discard_ignore_and_detect_zeroes(image, start_server, tmp_path):
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 8M", str(image))
    server = start_server(image, "--discard", "ignore", "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "discard 0 1M", server.qemu_uri)
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 1 0 1M", server.qemu_uri)
    dirty = json.loads(run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0",
                           server.uri()).stdout)
    assert (dirty[0]["offset"], dirty[0]["length"], dirty[0]["type"]) == (0, 1 << 20, 1)
    server.stop()
    blocks = os.stat(image).st_blocks
    server = start_server(image, "--detect-zeroes", "unmap", "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write -P 0 4M 2M", server.qemu_uri)
    assert os.stat(image).st_blocks <= blocks - (2 << 20) // 512, "zeros were written"
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 4M 2M", "-c", "read -P 1 6M 2M",
        server.qemu_uri)
    result = run(*NBDSERVE, "serve", str(image), "-k", str(tmp_path / "x"),
                 "--detect-zeroes", "unmap", "--discard", "ignore", check=False)
    assert result.returncode == 2 and "needs discard = unmap" in result.stderr


def test_offset_serves_an_image_inside_a_larger_file(tmp_path, start_server):
    """-o: every read, write (spliced too), hole and trim lands past the offset."""
    path = tmp_path / "container.img"
    header = b"\xee" * (1 << 20)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate((1 << 20) + (16 << 20))
    server = start_server(path, "-o", "1M", "--bitmap", "b0")
    info = json.loads(run("nbdinfo", "--json", server.uri()).stdout)["exports"][0]
    assert info["export-size"] == 16 << 20
    run("qemu-io", "-f", "raw", "-c", "write -P 5 0 4k", "-c", "write -P 6 4M 2M",
        "-c", "discard 4M 1M", server.qemu_uri)
    data = path.read_bytes()
    assert data[:1 << 20] == header, "the bytes before the offset were touched"
    image = data[1 << 20:]
    assert image[:4096] == b"\x05" * 4096
    assert image[4 << 20:5 << 20] == bytes(1 << 20)  # trimmed
    assert image[5 << 20:6 << 20] == b"\x06" * (1 << 20)
    mapped = [(e["offset"], e["length"], e["type"]) for e in json.loads(
        run("nbdinfo", "--json", "--map", server.uri()).stdout)]
    assert mapped[0][2] == 0 and mapped[0][0] == 0  # data at the image's start
    assert any(offset <= 4 << 20 and offset + length >= 5 << 20 and kind == 3
               for offset, length, kind in mapped), "the trimmed MiB is a hole"
    assert (5 << 20, 1 << 20, 0) in mapped
    result = run(*NBDSERVE, "serve", str(path), "-o", "1000", "-k", str(tmp_path / "x"),
                 check=False)
    assert result.returncode == 2 and "multiple of 512" in result.stderr


def test_cache_none_keeps_data_out_of_the_page_cache(tmp_path, start_server):
    """--cache=none (O_DIRECT): unaligned writes land exactly (merged with their
    blocks), fio's verify passes, and the image's pages are not in the host's cache
    afterwards, where --cache=writeback leaves them."""
    image = tmp_path / "direct.img"
    image.write_bytes(b"")
    os.truncate(image, 64 << 20)
    server = start_server(image, "--cache=none")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x41 1000 3000", "-c",
        "write -P 0x42 4096 8192", "-c", "write -P 0x43 65537 10", "-c",
        "write -P 0x45 1M 1M", "-c", "write -P 0x46 3000000 1000000", server.qemu_uri)
    data = image.read_bytes()[:4 << 20]
    assert data[1 << 20:2 << 20] == b"E" * (1 << 20)  # large: spliced from the socket
    assert data[3000000:4000000] == b"F" * 1000000 and data[4000000:] == bytes(194304)
    assert data[:1000] == bytes(1000)
    assert data[1000:4000] == b"A" * 3000 and data[4096:12288] == b"B" * 8192
    assert data[12288:65537] == bytes(65537 - 12288) and data[65537:65547] == b"C" * 10
    posix_fadvise_dontneed(image)
    result = run("fio", "--name=direct", "--ioengine=nbd", f"--uri={server.uri()}",
                 "--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16", "--size=16M",
                 "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                 "--output-format=json", cwd=tmp_path)
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] >= 16 << 20
    assert cached_pages(image) == 0
    # The negative control: the same through the page cache leaves pages there.
    other = tmp_path / "cached.img"
    other.write_bytes(b"")
    os.truncate(other, 64 << 20)
    cached = start_server(other)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4M", cached.qemu_uri)
    assert cached_pages(other) >= 1024


def test_cache_none_refuses_what_o_direct_cannot_serve(tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(512 * 9))  # not a multiple of 4096
    result = run(*NBDSERVE, "serve", str(odd), "--cache=none", "-k",
                 str(tmp_path / "s.sock"), check=False)
    assert result.returncode == 1 and "multiples of 4096" in result.stderr


def posix_fadvise_dontneed(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_pages(path) -> int:
    """How many of the file's pages are in the page cache (util-linux's fincore)."""
    return int(run("fincore", "--noheadings", "--output", "PAGES", str(path)).stdout)


def test_man_page_and_completion_come_from_the_command_line(tmp_path):
    """nbdserve(1) is made from --help: every command and option is in it, and man
    renders it; click's completion script is there for bash."""
    root = Path(__file__).resolve().parent.parent
    page = tmp_path / "nbdserve.1"
    page.write_text(run(sys.executable, str(root / "scripts/manpage.py")).stdout)
    rendered = run("man", "-l", str(page), env={**os.environ, "MANWIDTH": "200"}).stdout
    for text in ("migrate start", "backup run", "qdb info", "--incoming", "--cache",
                 "--max-downtime", "SHELL COMPLETION"):
        assert text in rendered, text
    completion = run(str(root / ".venv/bin/nbdserve"),
                     env={**os.environ, "_NBDSERVE_COMPLETE": "bash_source"})
    assert "complete -o nosort -F _nbdserve_completion nbdserve" in completion.stdout
