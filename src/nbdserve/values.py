"""Rules for values that the configuration checks at the edge and the layers below
rely on: sizes with units, bitmap names and granularities, the default address.

A leaf module: it imports nothing from nbdserve, so the configuration can validate
without importing the server or the bitmaps. Each rule raises ValueError with a
message for the user.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10809  # IANA's port for NBD

MIN_GRANULARITY_BITS = 9  # 512 bytes
MAX_GRANULARITY_BITS = 31  # 2 GiB, QEMU's limit
DEFAULT_GRANULARITY = 64 << 10  # QEMU's default for images with no cluster size
MAX_BITMAP_NAME_BYTES = 1023  # QEMU's limit for persistent bitmaps

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
          "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str) -> int:
    """'10G', '512M', '1T', '4096' -> bytes (binary units, like qemu-img)."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B") or text
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in _UNITS:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"invalid size {text!r} (use bytes or a suffix K, M, G, T)") from None
    if value < 0 or value != int(value):
        raise ValueError(f"invalid size {text!r}")
    return int(value)


def check_bitmap_name(name: str) -> None:
    raw = name.encode("utf-8", errors="strict") if isinstance(name, str) else b""
    if not isinstance(name, str) or not raw:
        raise ValueError("Bitmap name cannot be empty")
    if len(raw) > MAX_BITMAP_NAME_BYTES:
        raise ValueError(f"Bitmap name is {len(raw)} bytes; the limit is "
                         f"{MAX_BITMAP_NAME_BYTES}")
    if "\0" in name:
        raise ValueError("Bitmap name cannot contain NUL")


def granularity_bits(granularity: int) -> int:
    """Validate a granularity in bytes and return its log2."""
    if (not isinstance(granularity, int) or isinstance(granularity, bool)
            or granularity <= 0 or granularity & (granularity - 1)):
        raise ValueError(f"Granularity {granularity} must be a power of 2")
    bits = granularity.bit_length() - 1
    if not MIN_GRANULARITY_BITS <= bits <= MAX_GRANULARITY_BITS:
        raise ValueError("Granularity must be between 512 bytes and 2 GiB")
    return bits
