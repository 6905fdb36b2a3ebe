"""A small blocking client for the control socket (what the CLI uses)."""

from __future__ import annotations

import json
import socket


class ControlError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class ControlClient:
    def __init__(self, path: str, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")
        greeting = json.loads(self.file.readline() or b"{}")
        if "QMP" not in greeting:
            raise ConnectionError(f"{path} is not an nbdserve control socket")

    def execute(self, command: str, arguments: dict | None = None):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        line = self.file.readline()
        if not line:
            raise ConnectionError("the server closed the control connection")
        reply = json.loads(line)
        if "error" in reply:
            raise ControlError(reply["error"].get("class", "GenericError"),
                               reply["error"].get("desc", "unknown error"))
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
