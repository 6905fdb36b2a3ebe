"""Bitmap commands on an image that no server holds: open its store, run one
command, save and close. What `nbdserve bitmap ... --image IMAGE` does."""

from __future__ import annotations

from nbdserve.bitmaps.store import BitmapStore, default_qdb_path
from nbdserve.image import RawImage


def run_offline(image_path: str, qdb_path: str | None, command: str, arguments: dict):
    """Run a control command ("query-bitmaps" or a bitmap action) on the QDB file.

    Raises ImageError, StoreLocked (a server holds it), OSError or BitmapError.
    """
    image = RawImage(image_path, read_only=True)
    try:
        store = BitmapStore.open(qdb_path or default_qdb_path(image_path), image.size,
                                 image.identity)
        try:
            if command == "query-bitmaps":
                return store.query()
            store.execute(command, arguments)
            return {}
        finally:
            store.close()
    finally:
        image.close()
