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
    """'10G', '512M', '1T', '4096', '4k' -> bytes, exactly as qemu-img reads a size:
    binary units K, M, G, T, P, E (either case), an optional fraction, B for bytes.
    '10GB' and '10GiB' are refused, as qemu-img refuses them, rather than guessed."""
    cleaned = text.strip()
    unit = cleaned[-1:].upper() if cleaned[-1:].isalpha() else ""
    number = cleaned[:-1] if unit else cleaned
    try:
        if unit not in _UNITS or not number or number[-1:].isalpha():
            raise ValueError
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"invalid size {text!r}: use bytes or one suffix K, M, G, T, P or "
                         "E (binary units, as qemu-img reads them: 10G, not 10GB)") from None
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
