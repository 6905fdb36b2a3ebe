"""The container image, built and run without a daemon: buildah with chroot isolation
on a Debian base made by debootstrap, both from Debian's packages (as CI can)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, run

ROOT = Path(__file__).resolve().parent.parent
BUILDAH = ["buildah", "--storage-driver", "vfs"]  # no overlay mounts needed
BASE = "docker.io/library/debian:12-slim"  # what the Dockerfile's FROM names
IMAGE = "localhost/nbdserve:test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def base_image(tmp_path: Path) -> None:
    """debian:12-slim from debootstrap (minbase), unless an earlier run left it."""
    if subprocess.run([*BUILDAH, "inspect", "--type", "image", BASE],
                      capture_output=True).returncode == 0:
        return
    rootfs = tmp_path / "rootfs"
    run("debootstrap", "--variant=minbase", "bookworm", str(rootfs), timeout=600)
    container = run(*BUILDAH, "from", "scratch").stdout.strip()
    try:
        mount = run(*BUILDAH, "mount", container).stdout.strip()
        run("cp", "-a", f"{rootfs}/.", mount)
        run(*BUILDAH, "umount", container)
        run(*BUILDAH, "commit", "-q", container, BASE, timeout=600)
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)


@pytest.mark.slow  # about two minutes: CI runs it (it is the only way to see the image)
def test_image_builds_runs_answers_its_health_check_and_stops_cleanly(tmp_path):
    base_image(tmp_path)
    build = [*BUILDAH, "bud", "--isolation", "chroot", "--format", "docker",
             "--pull-never", "-f", "docker/Dockerfile", "-t", IMAGE]
    if HOST_CA.exists():  # this machine's network inspects TLS: pip needs its CA
        build += ["--volume", f"{HOST_CA}:/run/host-ca.crt:ro",
                  "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    run(*build, ".", cwd=ROOT, timeout=900)
    container = run(*BUILDAH, "from", "--pull-never", IMAGE).stdout.strip()
    server = None
    try:
        config = run(*BUILDAH, "inspect", "--format",
                     "{{.Docker.Config.User}}|{{.Docker.Config.Healthcheck.Test}}|"
                     "{{.Docker.Config.StopSignal}}", container).stdout.strip()
        user, health, stop_signal = config.split("|")
        assert user == "10809:10809" and stop_signal == "SIGTERM"
        assert "nbdserve status --control /run/nbdserve/control.sock" in health.replace(
            "[CMD ", "").replace("]", "").replace("  ", " ")
        # Nothing but the environment and the configuration came in.
        mount = run(*BUILDAH, "mount", container).stdout.strip()
        for absent in ("opt/nbdserve/tests", "opt/nbdserve/bench", "opt/nbdserve/src",
                       "opt/nbdserve/disk.img"):
            assert not (Path(mount) / absent).exists(), absent
        run(*BUILDAH, "umount", container)
        # The image declares its volume; buildah run would also mount an anonymous one
        # there, racing the bind below (which one wins varies). A runtime replaces it
        # with the bind, so take the declaration off this working container.
        volumes_declared = run(*BUILDAH, "inspect", "--format",
                               "{{.Docker.Config.Volumes}}", container).stdout
        assert "/var/lib/nbdserve" in volumes_declared
        run(*BUILDAH, "config", "--volume", "/var/lib/nbdserve-", container)
        state, sockets = tmp_path / "state", tmp_path / "run"
        for directory in (state, sockets):
            directory.mkdir()
            os.chmod(directory, 0o777)
        port = free_port()
        config_file = tmp_path / "nbdserve.toml"
        config_file.write_text(f'listen = ["127.0.0.1:{port}"]\n'
                               'control = "/run/nbdserve/control.sock"\n[[export]]\n'
                               'name = ""\nimage = "/var/lib/nbdserve/disk.img"\n'
                               'create = "64M"\nbitmaps = ["backup"]\n')
        volumes = ["-v", f"{state}:/var/lib/nbdserve", "-v", f"{sockets}:/run/nbdserve"]
        log = tmp_path / "log"
        with open(log, "w") as stderr:
            # The image's entrypoint, as a runtime starts it.
            server = subprocess.Popen(
                [*BUILDAH, "run", "--isolation", "chroot", "--user", "10809:10809",
                 *volumes, "-v", f"{config_file}:/etc/nbdserve/nbdserve.toml:ro",
                 container, "--", "nbdserve", "serve", "--config",
                 "/etc/nbdserve/nbdserve.toml"], stdout=stderr, stderr=stderr)
        deadline = time.monotonic() + 60
        while "ready (pid" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/").stdout.strip() == \
            str(64 << 20)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", f"nbd://127.0.0.1:{port}/")
        # The health check, in the container, over the shared control socket.
        health_run = run(*BUILDAH, "run", "--isolation", "chroot", "--user", "10809:10809",
                         *volumes, container, "--", "nbdserve", "status", "--control",
                         "/run/nbdserve/control.sock")
        assert "backup" in health_run.stdout
        # A clean stop: the runtime sends STOPSIGNAL (SIGTERM) to the server. (Chroot
        # isolation has no PID namespace: the pid the server logs is the host's.)
        pid = int(log.read_text().split("ready (pid ")[1].split(")")[0])
        os.kill(pid, signal.SIGTERM)
        server.wait(60)
        text = log.read_text()
        assert "stopped" in text and "Traceback" not in text, text
        assert not (state / "disk.img.qdb.journal").exists()  # bitmaps saved clean
        info = run(str(ROOT / ".venv/bin/nbdserve"), "qdb", "info",
                   str(state / "disk.img.qdb")).stdout
        assert "in use: no" in info and "65536 bytes dirty" in info
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)
        subprocess.run([*BUILDAH, "rmi", IMAGE], capture_output=True)
