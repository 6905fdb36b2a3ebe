"""Bitmap operations as atomic transactions, with QEMU's refusal rules.

``Plan.check`` checks one action against the state the earlier actions of the same
transaction would leave (``Planned``, per bitmap), and returns a closure that applies
it; nothing changes until every action has passed. ``Undo`` remembers what a failed
save must put back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.bitmaps.policy import BitmapError, DirtyBitmap, check_name, granularity_bits
from nbdserve.values import DEFAULT_GRANULARITY

ACTIONS = ("bitmap-add", "bitmap-remove", "bitmap-enable", "bitmap-disable", "bitmap-clear",
           "bitmap-merge", "bitmap-checkpoint")


@dataclass(slots=True)
class Planned:
    """A bitmap as the transaction so far would leave it."""

    granularity_bits: int
    recording: bool
    busy: bool
    inconsistent: bool


class Plan:
    def __init__(self, bitmaps: dict[str, DirtyBitmap], image_size: int) -> None:
        self.bitmaps = bitmaps
        self.image_size = image_size
        self.state = {name: Planned(b.granularity_bits, b.recording, b.busy > 0,
                                    b.inconsistent)
                      for name, b in bitmaps.items()}

    def _get(self, arguments: dict, key: str = "name") -> tuple[str, Planned]:
        name = arguments.get(key)
        if not isinstance(name, str):
            raise BitmapError(f"Parameter '{key}' is missing or not a string")
        if name not in self.state:
            raise BitmapError(f"Dirty bitmap '{name}' not found", "DeviceNotFound")
        return name, self.state[name]

    @staticmethod
    def _usable(name: str, planned: Planned, *, allow_inconsistent: bool = False) -> None:
        if planned.busy:
            raise BitmapError(f"Bitmap '{name}' is currently in use by another operation "
                              "and cannot be used")
        if planned.inconsistent and not allow_inconsistent:
            raise BitmapError(f"Bitmap '{name}' is inconsistent and cannot be used; remove or "
                              "clear it")

    def _new(self, arguments: dict, key: str = "name") -> tuple[str, int]:
        name = arguments.get(key)
        if not isinstance(name, str):
            raise BitmapError(f"Parameter '{key}' is missing or not a string")
        check_name(name)
        if name in self.state:
            raise BitmapError(f"Bitmap already exists: {name}")
        granularity = arguments.get("granularity", DEFAULT_GRANULARITY)
        return name, granularity_bits(granularity)

    def check(self, action: str, arguments: dict) -> Callable[[], None]:
        if not isinstance(arguments, dict):
            raise BitmapError("arguments must be an object")
        bitmaps = self.bitmaps
        size = self.image_size
        if action == "bitmap-add":
            name, gbits = self._new(arguments)
            recording = not arguments.get("disabled", False)
            self.state[name] = Planned(gbits, recording, False, False)

            def add() -> None:
                bitmaps[name] = DirtyBitmap.create(name, size, 1 << gbits, recording)
            return add
        if action == "bitmap-remove":
            name, planned = self._get(arguments)
            self._usable(name, planned, allow_inconsistent=True)
            del self.state[name]
            return lambda: bitmaps.pop(name)
        if action in ("bitmap-enable", "bitmap-disable"):
            name, planned = self._get(arguments)
            self._usable(name, planned)
            enable = action == "bitmap-enable"
            planned.recording = enable
            return lambda: setattr(bitmaps[name], "recording", enable)
        if action == "bitmap-clear":
            name, planned = self._get(arguments)
            self._usable(name, planned, allow_inconsistent=True)
            planned.inconsistent = False
            return lambda: bitmaps[name].clear()
        if action == "bitmap-merge":
            return self._merge(arguments)
        if action == "bitmap-checkpoint":
            old, planned = self._get(arguments, "old")
            self._usable(old, planned)
            new, gbits = self._new({"name": arguments.get("new"),
                                    "granularity": arguments.get(
                                        "granularity", 1 << planned.granularity_bits)})
            planned.recording = False
            self.state[new] = Planned(gbits, True, False, False)

            def checkpoint() -> None:
                bitmaps[old].recording = False
                bitmaps[new] = DirtyBitmap.create(new, size, 1 << gbits, True)
            return checkpoint
        raise BitmapError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})",
                          "CommandNotFound")

    def _merge(self, arguments: dict) -> Callable[[], None]:
        target, planned = self._get(arguments, "target")
        self._usable(target, planned)
        sources = arguments.get("bitmaps")
        if not isinstance(sources, list) or not sources:
            raise BitmapError("Parameter 'bitmaps' must be a non-empty list")
        for source in sources:
            if not isinstance(source, str) or source not in self.state:
                raise BitmapError(f"Dirty bitmap '{source}' not found", "DeviceNotFound")
            other = self.state[source]
            if other.inconsistent:
                raise BitmapError(f"Bitmap '{source}' is inconsistent and cannot be used")
            if other.granularity_bits != planned.granularity_bits:
                raise BitmapError(f"Bitmap '{source}' has granularity "
                                  f"{1 << other.granularity_bits} but '{target}' has "
                                  f"{1 << planned.granularity_bits}; merge needs equal "
                                  "granularities")
        bitmaps = self.bitmaps

        def merge() -> None:
            for source in sources:
                bitmaps[target].bitmap.merge(bitmaps[source].bitmap)
        return merge


@dataclass(slots=True)
class _Saved:
    bitmap: DirtyBitmap
    recording: bool
    generation: int
    inconsistent: bool
    reason: str
    bits: Bitmap | None  # a copy, for the bitmaps the transaction rewrites


class Undo:
    """What a failed transaction needs to be undone: every bitmap's state, and the
    bits of those it clears or merges into."""

    def __init__(self, bitmaps: dict[str, DirtyBitmap],
                 actions: Sequence[tuple[str, dict]]) -> None:
        rewritten = {arguments.get("name") for action, arguments in actions
                     if action == "bitmap-clear"}
        rewritten |= {arguments.get("target") for action, arguments in actions
                      if action == "bitmap-merge"}
        self.saved = [_Saved(b, b.recording, b.generation, b.inconsistent,
                             b.inconsistent_reason,
                             b.bitmap.copy() if b.name in rewritten else None)
                      for b in bitmaps.values()]

    def restore(self) -> dict[str, DirtyBitmap]:
        """The bitmaps as they were, by name."""
        bitmaps = {}
        for saved in self.saved:
            bitmap = saved.bitmap
            bitmap.recording, bitmap.generation = saved.recording, saved.generation
            bitmap.inconsistent, bitmap.inconsistent_reason = saved.inconsistent, saved.reason
            if saved.bits is not None:
                bitmap.bitmap = saved.bits
            bitmaps[bitmap.name] = bitmap
        return bitmaps

