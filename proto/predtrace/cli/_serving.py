"""Process settings shared by the long-running servers (collector, sidecar)."""

from __future__ import annotations

import gc
from typing import Final

# Young-generation threshold of the cyclic GC while serving. Ingest allocates
# tens of thousands of containers per batch (maps, rows, event objects) that
# reference counting frees anyway; Python's default (700) runs a collection
# every few events.
GC_GEN0_THRESHOLD: Final = 50_000


def tune_gc() -> None:
    """Freeze what startup allocated and collect young objects less often.

    Call once the server is up. Objects alive after startup (modules, the
    app) move to the permanent generation, so collections stop re-scanning
    them; with the higher threshold this is ~15 % of the CPU of decoding a
    batch in the collector, and of converting events in the sidecar. Garbage
    without cycles is still freed at once by reference counting.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
