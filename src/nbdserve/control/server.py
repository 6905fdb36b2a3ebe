"""The control socket: JSON in QEMU's QMP style, one object per line.

    <- {"QMP": {"version": {"nbdserve": "0.1.0"}, "capabilities": []}}
    -> {"execute": "bitmap-add", "arguments": {"name": "b0"}, "id": 1}
    <- {"return": {}, "id": 1}
    -> {"execute": "bitmap-remove", "arguments": {"name": "nope"}}
    <- {"error": {"class": "DeviceNotFound", "desc": "Dirty bitmap 'nope' not found"}}

Commands are documented in docs/control.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from nbdserve import __version__
from nbdserve.bitmaps.policy import BitmapError
from nbdserve.bitmaps.store import ACTIONS, BitmapStore
from nbdserve.export import Export, ExportCatalog
from nbdserve.migration.source import MigrationError
from nbdserve.snapshots import manager as snapshots

log = logging.getLogger("nbdserve.control")

MAX_LINE = 1 << 20
MIGRATION_COMMANDS = ("migrate-start", "query-migrate", "migrate-cancel")
# QEMU's names work too, so QMP habits carry over.
ALIASES = {f"block-dirty-{action}": action for action in ACTIONS}


class CommandError(Exception):
    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class ControlServer:
    def __init__(self, catalog: ExportCatalog, path: str, executor: Executor,
                 status: Callable[[], dict] | None = None,
                 remove_export: Callable[[str], Awaitable[None]] | None = None,
                 migrate: Callable[[str, dict], Awaitable] | None = None) -> None:
        self.catalog = catalog
        self.migrate = migrate  # the server's migrate-start, query-migrate, migrate-cancel
        self.status = status
        self.remove_export = remove_export
        self.path = path
        self.executor = executor
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task] = set()  # handlers of connected clients

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # the control socket is private to this server
        old_umask = os.umask(0o177)  # mode 0600 from the start, no window
        try:
            self.server = await asyncio.start_unix_server(self.handle, path=self.path,
                                                          limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        log.info("control socket on %s", self.path)

    async def close(self) -> None:
        """Stop listening and hang up on connected clients (a command under way
        finishes first: it runs in a worker thread, and its transaction is atomic)."""
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for task in list(self.clients):
            task.cancel()
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=5)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.clients.add(task)
        greeting = {"QMP": {"version": {"nbdserve": __version__}, "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\n")
        try:
            while line := await reader.readline():
                response = await self.respond(line)
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ValueError, asyncio.LimitOverrunError):
            writer.write(json.dumps(_error("GenericError", "line too long")).encode() + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the server is stopping: hang up quietly
        finally:
            self.clients.discard(task)
            writer.close()

    async def respond(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error("GenericError", f"invalid JSON: {exc}")
        except RecursionError:
            return _error("GenericError", "invalid JSON: nested too deeply")
        if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
            return _error("GenericError", "expected an object with \"execute\"")
        reply_id = {"id": request["id"]} if "id" in request else {}
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            return _error("GenericError", "\"arguments\" must be an object") | reply_id
        try:
            result = await self.run(request["execute"], dict(arguments))
        except CommandError as error:
            return _error(error.error_class, error.desc) | reply_id
        except BitmapError as error:
            return _error(error.error_class, str(error)) | reply_id
        except (snapshots.SnapshotError, MigrationError) as error:
            return _error("GenericError", str(error)) | reply_id
        except OSError as error:
            log.error("control command %s failed: %s", request["execute"], error)
            return _error("GenericError", f"I/O error: {error}") | reply_id
        return {"return": result} | reply_id

    async def run(self, command: str, arguments: dict):
        command = ALIASES.get(command, command)
        if command == "qmp_capabilities":
            return {}
        if command == "query-status" and self.status is not None:
            return self.status()
        if command == "query-exports":
            return [export.describe() for export in self.catalog]
        if command in ("query-bitmaps", "bitmap-list"):
            return self.store(arguments.pop("export", None)).query()
        if command == "bitmap-checkpoint" and arguments.pop("snapshot", False):
            return await self.checkpoint_with_snapshot(arguments)
        if command in ("query-snapshots", "snapshot-list"):
            export_name = arguments.get("export")
            export = self.live_export(export_name) if export_name is not None else None
            return snapshots.describe_all(self.catalog, export)
        if command in MIGRATION_COMMANDS and self.migrate is not None:
            return await self.migrate(command, arguments)
        if command == "snapshot-add":
            export = self.live_export(arguments.get("export"))
            if export.migrating:
                raise CommandError(f"export {export.name!r} is being migrated: snapshots "
                                   "wait until the migration ends")
            bitmap = arguments.get("bitmap")
            if bitmap is not None and not isinstance(bitmap, str):
                raise CommandError("\"bitmap\" must be a bitmap name")
            taken = await self.in_thread(functools.partial(
                snapshots.take_snapshot, self.catalog, export, arguments.get("name"),
                new_bitmap=bitmap))
            return {"name": taken.name}
        if command == "snapshot-remove":
            snapshot = snapshots.find_snapshot(self.catalog, arguments.get("name"))
            snapshots.check_removable(snapshot, bool(arguments.get("force", False)))
            await self.remove_export(snapshot.name)
            return {}
        if command in ACTIONS:
            store = self.store(arguments.pop("export", None))
            await self.in_thread(store.execute, command, arguments)
            return {}
        if command == "transaction":
            store = self.store(arguments.get("export"))
            actions = arguments.get("actions")
            if not isinstance(actions, list) or not actions:
                raise CommandError("'actions' must be a non-empty list")
            steps = []
            for action in actions:
                if not isinstance(action, dict) or not isinstance(action.get("type"), str):
                    raise CommandError("each action needs a \"type\" and \"data\"")
                kind = ALIASES.get(action["type"], action["type"])
                data = action.get("data", {})
                if not isinstance(data, dict):
                    raise CommandError("\"data\" must be an object")
                steps.append((kind, data))
            await self.in_thread(store.transaction, steps)
            return {}
        raise CommandError(f"The command {command} has not been found", "CommandNotFound")

    async def in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def checkpoint_with_snapshot(self, arguments: dict) -> dict:
        """bitmap-checkpoint with "snapshot": true: the checkpoint and a snapshot
        export of the image at the same instant (docs/snapshots.md)."""
        export_name = arguments.get("export")
        store = self.store(export_name)
        export = next(e for e in self.catalog if e.tracker is store)
        old, new = arguments.get("old"), arguments.get("new")
        if not isinstance(old, str) or not isinstance(new, str):
            raise CommandError("bitmap-checkpoint needs \"old\" and \"new\" bitmap names")
        name = arguments.get("snapshot-name")
        if name is None:
            name = snapshots.default_name(export, old)
        taken = await self.in_thread(functools.partial(
            snapshots.take_snapshot, self.catalog, export, name, checkpoint=(old, new)))
        return {"snapshot": taken.name}

    def live_export(self, export_name) -> Export:
        """The export a snapshot command acts on: the one named, or the only live one."""
        if export_name is None:
            live = [e for e in self.catalog if e.parent is None]
            if len(live) != 1:
                raise CommandError("several exports are served: name one with \"export\"")
            return live[0]
        export = self.catalog.find(export_name) if isinstance(export_name, str) else None
        if export is None or export.parent is not None:
            raise CommandError(f"export {export_name!r} not found", "DeviceNotFound")
        return export

    def store(self, export_name) -> BitmapStore:
        if export_name is None:
            with_bitmaps = [e for e in self.catalog if e.tracker is not None]
            # (snapshot exports have no tracker: only live exports are counted)
            if len(with_bitmaps) != 1:
                raise CommandError("several exports have bitmaps: name one with \"export\""
                                   if with_bitmaps else "no export has bitmaps enabled")
            return with_bitmaps[0].tracker
        export = self.catalog.find(export_name) if isinstance(export_name, str) else None
        if export is None:
            raise CommandError(f"export {export_name!r} not found", "DeviceNotFound")
        if export.tracker is None:
            raise CommandError(f"export {export_name!r} has no bitmaps enabled")
        return export.tracker


def _error(error_class: str, desc: str) -> dict:
    return {"error": {"class": error_class, "desc": desc}}
