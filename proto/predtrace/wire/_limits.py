"""Bounds of decoding untrusted bytes, shared by the batch codec and the event-map readers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

_UINT64_MAX: Final = 2**64 - 1
INT63_MAX: Final = 2**63 - 1  # the largest signed 64-bit integer: seq, times as stored


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeLimits:
    """Bounds applied while decoding untrusted bytes.

    Example:
        >>> decode_batch(body, limits=DecodeLimits(max_events=1000))
    """

    max_bytes: int = 16 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_events: int = 10_000
    max_str_len: int = 64 * 1024
    max_bin_len: int = 64 * 1024
    max_map_len: int = 1024
    max_id_len: int = 256

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_decompressed_bytes", "max_events", "max_str_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecodeLimits.{name} must be positive")


DEFAULT_LIMITS: Final = DecodeLimits()
