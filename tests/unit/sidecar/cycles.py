"""Finding request bytes that only the cyclic garbage collector would free.

The sidecar runs that collector seldom (``tune_gc``): a failed call whose
frames end up in a reference cycle keeps its request's bytes long after the
call, one request per failure. Tests make the calls inside ``CycleWatch``
(automatic collection off), then ask which frames in cycles hold big bytes.
"""

from __future__ import annotations

import gc
import types


class CycleWatch:
    """Collection off inside the block; ``frames_holding`` looks into what it would free."""

    def __enter__(self) -> CycleWatch:
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()

    def frames_holding(self, size: int) -> list[str]:
        """``function:local`` of each frame in a cycle with a local of ``size`` bytes or more."""
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            return [
                f"{frame.f_code.co_name}:{name}"
                for frame in gc.garbage
                if isinstance(frame, types.FrameType)
                for name, value in frame.f_locals.items()
                if _big(value, size)
            ]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()


def _big(value: object, size: int) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) >= size
    return isinstance(value, list | tuple) and any(_big(item, size) for item in value)
