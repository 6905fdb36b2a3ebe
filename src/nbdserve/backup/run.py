"""`nbdserve backup run`: one backup point, full or incremental.

With the control socket (nbdserve's own server), every run is taken from a snapshot
at one instant, and the bitmaps follow the chain: the chain's newest point names the
bitmap that has recorded every change since it (``nbdserve-backup-CHAINID-N``). A run

1. clears what an interrupted run left (its snapshot; frozen bitmaps of this chain);
2. decides: full (no chain, ``--full``, or the chain's bitmap is gone, was cleared or
   recreated, or is inconsistent: the message says which) or incremental;
3. full: ``snapshot-add`` with a new bitmap at the same instant, and copies all
   allocated data; incremental: ``bitmap-checkpoint`` OLD -> NEW with a snapshot, and
   copies OLD's dirty extents from it;
4. writes the point (its JSON last), then removes the snapshot and OLD.

If a run dies after its checkpoint and before its point, OLD is frozen and NEW records:
the next run merges OLD into NEW (their union is everything since the chain's newest
point) and checkpoints NEW, so no change is ever skipped. A frozen OLD with no
successor means changes went unrecorded: that run is a full backup, and says so.

With ``--uri`` and ``--bitmap`` (any server with qemu:dirty-bitmap contexts, such as
qemu-nbd -B), the caller makes the checkpoints; the run reads the export as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from nbdserve.backup.chain import Chain, Point, PointWriter, now
from nbdserve.backup.copy import Address, Source, copy_into, parse_uri
from nbdserve.control.client import ControlClient, ControlError
from nbdserve.protocol import constants as c


class BackupError(Exception):
    """A backup that cannot be made; the message is for the operator."""


@dataclass
class Outcome:
    point: Point
    bytes_read: int
    seconds: float
    reason: str  # why a full backup was taken, when one was

    def summary(self) -> dict:
        return {"point": self.point.index, "kind": self.point.kind,
                "bitmap": self.point.bitmap, "bytes_read": self.bytes_read,
                "bytes_stored": self.point.stored_bytes, "seconds": round(self.seconds, 3),
                "reason": self.reason or None}


Progress = Callable[[int, str], Callable[[int], None]]  # (total bytes, label) -> advance


def _no_progress(total: int, label: str) -> Callable[[int], None]:
    return lambda n: None


def _why_full(tip: Point | None, full: bool, size: int) -> str:
    """Why this run must be a full backup whatever the bitmaps say, or ""."""
    if tip is None:
        return "no backup in the chain yet"
    if full:
        return "--full"
    if tip.size != size:
        return f"the image's size changed ({tip.size} -> {size})"
    return ""


def _bitmap_problem(tip: Point, bitmaps: dict[str, dict]) -> str:
    """Why the chain's bitmap cannot give the next incremental, or ""."""
    bitmap = bitmaps.get(tip.bitmap)
    if bitmap is None:
        return f"bitmap {tip.bitmap!r} of the chain's newest point is gone from the server"
    if bitmap["generation"] != tip.generation:
        return (f"bitmap {tip.bitmap!r} was cleared or recreated on the server since the "
                "chain's newest point (its generation changed)")
    if bitmap["inconsistent"]:
        return f"bitmap {tip.bitmap!r} is inconsistent (the server could not vouch for it)"
    return ""


# -- with the control socket ---------------------------------------------------------------

def _address_of(status: dict) -> Address:
    """Where the server takes NBD connections (a Unix socket first)."""
    listen = status.get("listen") or []
    for entry in listen:
        if entry.startswith("unix:"):
            return Address(unix=entry[5:])
    for entry in listen:
        host, _, port = entry.rpartition(":")
        return Address(host=host.strip("[]"), port=int(port))
    raise BackupError("the server reports no listening address")


class Server:
    """The control socket of the nbdserve that serves the image."""

    def __init__(self, control: str, export: str | None) -> None:
        try:
            self.client = ControlClient(control)
        except OSError as exc:
            raise BackupError(f"cannot reach {control}: {exc}") from None
        self.export = export

    def call(self, command: str, arguments: dict | None = None):
        arguments = dict(arguments or {})
        if self.export is not None:
            arguments["export"] = self.export
        try:
            return self.client.execute(command, arguments)
        except ControlError as exc:
            raise BackupError(exc.desc) from None
        except OSError as exc:
            raise BackupError(f"the control socket failed: {exc}") from None

    def bitmaps(self) -> dict[str, dict]:
        return {b["name"]: b for b in self.call("query-bitmaps")}

    def close(self) -> None:
        self.client.close()


def run_with_control(dest: str, control: str, export: str | None, *, full: bool = False,
                     compression: str = "zstd", progress: Progress = _no_progress,
                     connections: int = 4) -> Outcome:
    server = Server(control, export)
    try:
        return _run_with_control(dest, server, full, compression, progress, connections)
    finally:
        server.close()


def _run_with_control(dest: str, server: Server, full: bool, compression: str,
                      progress: Progress, connections: int) -> Outcome:
    status = server.client.execute("query-status")
    live = [e for e in status["exports"] if "snapshot-of" not in e
            and (server.export is None or e["name"] == server.export)]
    if len(live) != 1:
        raise BackupError("several exports are served: name one with --export"
                          if live else f"export {server.export!r} not found")
    export_name, size = live[0]["name"], live[0]["size"]
    chain = Chain.open(dest, create_size=size)
    chain.remove_leftovers()
    prefix = f"nbdserve-backup-{chain.id}-"
    snapshot_name = f"{prefix}snapshot"
    tip = chain.tip
    # 1. What an interrupted run left: its snapshot, and frozen bitmaps of this chain
    # other than the newest point's (which a merge below may still need).
    for snapshot in server.call("query-snapshots"):
        if snapshot["name"].startswith(prefix):
            server.call("snapshot-remove", {"name": snapshot["name"], "force": True})
    for name, bitmap in server.bitmaps().items():
        if name.startswith(prefix) and not bitmap["recording"] and \
                (tip is None or name != tip.bitmap):
            server.call("bitmap-remove", {"name": name})
    bitmaps = server.bitmaps()
    # 2. Full or incremental.
    reason = _why_full(tip, full, size) or _bitmap_problem(tip, bitmaps)
    source_bitmap = tip.bitmap if tip is not None else None
    if not reason and not bitmaps[source_bitmap]["recording"]:
        # An earlier run checkpointed and died: its successor has recorded since.
        successors = [name for name, b in bitmaps.items() if name.startswith(prefix)
                      and b["recording"] and name != source_bitmap]
        if len(successors) != 1:
            reason = (f"bitmap {source_bitmap!r} stopped recording and no single successor "
                      "recorded since: changes may be unrecorded")
        else:
            server.call("bitmap-merge", {"target": successors[0],
                                         "bitmaps": [source_bitmap]})
            source_bitmap = successors[0]
    index = tip.index + 1 if tip is not None else 0
    new_bitmap = f"{prefix}{index}-{secrets.token_hex(3)}"
    # 3. The instant, and the copy.
    if reason:
        server.call("snapshot-add", {"name": snapshot_name, "bitmap": new_bitmap})
    else:
        server.call("bitmap-checkpoint", {"old": source_bitmap, "new": new_bitmap,
                                          "snapshot": True, "snapshot-name": snapshot_name})
    generation = server.bitmaps()[new_bitmap]["generation"]
    point = Point(index=index, kind="full" if reason else "incremental",
                  parent=None if reason else tip.index,
                  parent_id=None if reason else tip.id, size=size,
                  export=export_name, bitmap=new_bitmap, generation=generation,
                  source="control", created=now(), compression=compression)
    address = _address_of(status).with_export(snapshot_name)
    started = time.monotonic()
    read = asyncio.run(_copy(chain, point, address, None if reason else source_bitmap,
                             progress, connections, release=True))
    # 4. The point is written: what it replaces can go (the snapshot, and every
    # earlier bitmap of this chain; the next run clears whatever this leaves).
    with contextlib.suppress(BackupError):
        server.call("snapshot-remove", {"name": snapshot_name, "force": True})
    for name in server.bitmaps():
        if name.startswith(prefix) and name != new_bitmap:
            with contextlib.suppress(BackupError):
                server.call("bitmap-remove", {"name": name})
    return Outcome(point, read, time.monotonic() - started, reason)


async def _copy(chain: Chain, point: Point, address: Address, bitmap: str | None,
                progress: Progress, connections: int, release: bool) -> int:
    """Copy into a new point: all allocated data (full) or the bitmap's dirty extents."""
    context = c.BASE_ALLOCATION if bitmap is None else c.QEMU_DIRTY_BITMAP_PREFIX + bitmap
    source = Source(address, [context])
    writer = None
    try:
        await source.open(connections)
        if source.size != point.size:
            raise BackupError(f"the export has {source.size} bytes, the point {point.size}")
        if bitmap is None:
            ranges = await source.ranges(context, lambda flags: not flags & c.NBD_STATE_HOLE)
        else:
            ranges = await source.ranges(context, lambda flags: flags & c.NBD_STATE_DIRTY)
        writer = PointWriter(chain, point)
        total = sum(length for _, length in ranges)
        read = await copy_into(source, writer, ranges,
                               progress=progress(total, f"{point.kind} backup"),
                               release=release)
        writer.finish()
        writer = None
        return read
    finally:
        if writer is not None:
            writer.abandon()
        await source.close()


# -- any server: the caller makes the checkpoints ------------------------------------------

def run_with_uri(dest: str, uri: str, bitmap: str | None, *, full: bool = False,
                 compression: str = "zstd", progress: Progress = _no_progress,
                 connections: int = 4) -> Outcome:
    address = parse_uri(uri)
    size = asyncio.run(_size_of(address))
    chain = Chain.open(dest, create_size=size)
    chain.remove_leftovers()
    tip = chain.tip
    reason = _why_full(tip, full, size)
    if not reason and bitmap is None:
        raise BackupError("an incremental backup with --uri needs --bitmap NAME (or --full)")
    if not reason and tip.bitmap is not None and tip.bitmap != bitmap:
        raise BackupError(f"the chain's newest point was followed by bitmap {tip.bitmap!r}, "
                          f"not {bitmap!r}; give that one, or --full")
    point = Point(index=tip.index + 1 if tip is not None else 0,
                  kind="full" if reason else "incremental",
                  parent=None if reason else tip.index,
                  parent_id=None if reason else tip.id, size=size,
                  export=address.export, bitmap=bitmap, generation=None, source="uri",
                  created=now(), compression=compression)
    started = time.monotonic()
    read = asyncio.run(_copy(chain, point, address, None if reason else bitmap, progress,
                             connections, release=False))
    return Outcome(point, read, time.monotonic() - started, reason)


async def _size_of(address: Address) -> int:
    source = Source(address, [])
    await source.open(1)
    try:
        return source.size
    finally:
        await source.close()
