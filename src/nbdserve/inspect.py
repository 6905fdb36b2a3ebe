"""`nbdserve list`, `info` and `map`: looking at any NBD server with our own client, so a
host without libnbd's tools can inspect one. `map --picture` draws where the data (or
the dirty granules) are, as a strip of terminal cells or an SVG file."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nbdserve.backup.copy import Address, parse_uri
from nbdserve.client import NbdClient, OptionRefused
from nbdserve.protocol import constants as c

FLAG_NAMES = [
    (c.NBD_FLAG_READ_ONLY, "read_only"), (c.NBD_FLAG_SEND_FLUSH, "can_flush"),
    (c.NBD_FLAG_SEND_FUA, "can_fua"), (c.NBD_FLAG_SEND_TRIM, "can_trim"),
    (c.NBD_FLAG_SEND_WRITE_ZEROES, "can_zero"), (c.NBD_FLAG_SEND_FAST_ZERO, "can_fast_zero"),
    (c.NBD_FLAG_SEND_DF, "can_df"), (c.NBD_FLAG_CAN_MULTI_CONN, "can_multi_conn"),
    (c.NBD_FLAG_SEND_CACHE, "can_cache"),
]


class InspectError(Exception):
    """The server cannot be reached or refused; the message is for the operator."""


async def _handshake(address: Address) -> NbdClient:
    try:
        return await NbdClient.open_handshake(**{k: v for k, v in
                                                 address.connect_kwargs().items()
                                                 if k != "export"})
    except OSError as exc:
        raise InspectError(f"cannot connect: {exc}") from None


async def list_exports(uri: str) -> list[dict]:
    """Every export the server lists, with its size and description."""
    address = parse_uri(uri)
    client = await _handshake(address)
    try:
        try:
            names = await client.list_exports()
        except OptionRefused as exc:
            raise InspectError(f"the server refuses to list its exports: {exc}") from None
        out = []
        for name, description in names:
            try:
                info = await client.info(name)
                out.append({"name": name, "size": info.size,
                            "description": info.description or description})
            except OptionRefused as exc:
                out.append({"name": name, "size": None, "description": description,
                            "error": str(exc)})
        return out
    finally:
        await client.abort()


async def export_info(uri: str) -> dict:
    """What nbdinfo prints for one export."""
    address = parse_uri(uri)
    client = await _handshake(address)
    try:
        try:
            contexts = await client.list_meta_contexts(address.export)
        except OptionRefused:
            contexts = []
        try:
            info = await client.info(address.export)
        except OptionRefused as exc:
            raise InspectError(f"export {address.export!r}: {exc}") from None
    finally:
        await client.abort()
    result = {"export": info.name or address.export, "description": info.description,
              "size": info.size, "flags": info.flags, "contexts": contexts}
    for flag, name in FLAG_NAMES:
        result[name] = bool(info.flags & flag)
    if info.block_sizes is not None:
        result["block_size_minimum"], result["block_size_preferred"], \
            result["block_size_maximum"] = info.block_sizes
    return result


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    flags: int


def describe_flags(context: str, flags: int) -> str:
    if context == c.BASE_ALLOCATION:
        words = [word for bit, word in ((c.NBD_STATE_HOLE, "hole"), (c.NBD_STATE_ZERO, "zero"))
                 if flags & bit]
        return ",".join(words) or "data"
    if context.startswith(c.QEMU_DIRTY_BITMAP_PREFIX):
        return "dirty" if flags & c.NBD_STATE_DIRTY else "clean"
    return str(flags)


async def extents(uri: str, context: str) -> tuple[int, list[Extent]]:
    """(export size, the extents of one context over the whole export, merged)."""
    address = parse_uri(uri)
    try:
        client = await NbdClient.connect(**address.connect_kwargs(), meta_contexts=[context])
    except OSError as exc:
        raise InspectError(f"cannot connect: {exc}") from None
    except OptionRefused as exc:
        raise InspectError(f"export {address.export!r}: {exc}") from None
    try:
        if context not in client.contexts.values():
            raise InspectError(f"the export does not offer the context {context}")
        try:
            out = [Extent(*extent) for extent in await client.walk_extents(context)]
        except ConnectionError as exc:
            raise InspectError(str(exc)) from None
        return client.size, out
    finally:
        await client.disconnect()


def run(coroutine):
    return asyncio.run(coroutine)


# -- pictures -----------------------------------------------------------------------------------

SHADES = " ░▒▓█"


def marked_fraction(context: str, flags: int) -> bool:
    """What a picture counts: data (base:allocation) or dirty granules (bitmaps)."""
    if context == c.BASE_ALLOCATION:
        return not flags & c.NBD_STATE_HOLE
    return bool(flags & 1)


def cell_fractions(size: int, found: list[Extent], context: str, cells: int) -> list[float]:
    """The fraction of each of ``cells`` equal parts of the disk that is marked."""
    if not size:
        return []
    marked = [0] * cells
    span = size / cells
    for extent in found:
        if not marked_fraction(context, extent.flags):
            continue
        start, end = extent.offset, extent.offset + extent.length
        first, last = int(start // span), min(int((end - 1) // span), cells - 1)
        for cell in range(first, last + 1):
            low, high = cell * span, (cell + 1) * span
            marked[cell] += min(end, high) - max(start, low)
    return [min(1.0, m / span) for m in marked]


def picture(size: int, found: list[Extent], context: str, width: int = 64,
            rows: int = 8) -> str:
    """A strip of width x rows cells, each shaded by how much of it is marked."""
    fractions = cell_fractions(size, found, context, width * rows)
    def shade(f: float) -> str:
        if f <= 0:
            return SHADES[0]
        if f >= 1:
            return SHADES[4]
        return SHADES[1 + min(2, int(f * 3))]  # up to a third, two thirds, less than all
    what = "data" if context == c.BASE_ALLOCATION else "dirty"
    lines = ["".join(shade(f) for f in fractions[row * width:(row + 1) * width])
             for row in range(rows)]
    total = sum(e.length for e in found if marked_fraction(context, e.flags))
    cell_bytes = size / (width * rows)
    legend = (f"{context}: {total} of {size} bytes {what} ({100 * total / size:.1f} %); "
              f"each cell {human(cell_bytes)}, left to right, top to bottom; "
              f"'{SHADES[0]}' none, '{SHADES[1]}{SHADES[2]}{SHADES[3]}' up to a third, two "
              f"thirds, less than all, '{SHADES[4]}' all {what}")
    return "\n".join(["+" + "-" * width + "+", *("|" + line + "|" for line in lines),
                      "+" + "-" * width + "+", legend])


def svg(size: int, found: list[Extent], context: str, width: int = 128,
        rows: int = 16, cell: int = 8) -> str:
    fractions = cell_fractions(size, found, context, width * rows)
    what = "data" if context == c.BASE_ALLOCATION else "dirty"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * cell}" '
             f'height="{rows * cell + 24}">',
             f'<rect width="{width * cell}" height="{rows * cell}" fill="#f4f4f4"/>']
    for index, fraction in enumerate(fractions):
        if fraction > 0:
            x, y = (index % width) * cell, (index // width) * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="#c0392b" fill-opacity="{0.15 + 0.85 * fraction:.3f}"/>')
    total = sum(e.length for e in found if marked_fraction(context, e.flags))
    parts.append(f'<text x="0" y="{rows * cell + 16}" font-family="monospace" '
                 f'font-size="12">{context}: {100 * total / size if size else 0:.1f} % '
                 f'{what}, each cell {human(size / (width * rows))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def human(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover
