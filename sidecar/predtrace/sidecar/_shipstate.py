"""The shipper's durable state, saved with the spool's high-water mark.

Holds what must survive a crash for retries to resend identical bytes and
for the hash chain to continue: the next seq, the digest of the last batch,
and the batch in flight (its seq, record span, created-at and digest). A
batch is planned and persisted *before* its first send, so after a crash it
is rebuilt byte for byte and the collector deduplicates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

_VERSION = 1


@dataclass(slots=True)
class Plan:
    """A batch in flight: enough to rebuild its exact bytes from the spool."""

    seq: int
    first: int
    last: int
    created_at_ns: int
    digest: bytes
    replays: int = 0
    events: int = 0
    first_ts_ns: int = 0
    payload: bytes | None = None
    body: bytes | None = None


@dataclass(slots=True)
class ShipState:
    """Next seq, the chain link and the plan in flight."""

    next_seq: int = 1
    prev_digest: bytes = b""
    plan: Plan | None = None

    def encode(self) -> bytes:
        """Bytes for ``Spool.commit``."""
        plan = None
        if self.plan is not None:
            p = self.plan
            plan = [
                p.seq,
                p.first,
                p.last,
                p.created_at_ns,
                p.digest,
                p.replays,
                p.events,
                p.first_ts_ns,
            ]
        return msgpack.packb(  # type: ignore[no-any-return]
            [_VERSION, self.next_seq, self.prev_digest, plan], use_bin_type=True
        )

    @classmethod
    def decode(cls, data: bytes) -> ShipState:
        """Parse saved bytes; empty bytes are a fresh start.

        Raises:
            ValueError: the bytes are not a shipper state.
        """
        if not data:
            return cls()
        try:
            version, next_seq, prev_digest, plan = msgpack.unpackb(data)
            if version != _VERSION:
                raise ValueError(f"unknown shipper state version {version}")
            state = cls(_int(next_seq), _bytes(prev_digest))
            if plan is not None:
                seq, first, last, created, digest, replays, events, first_ts = plan
                state.plan = Plan(
                    _int(seq),
                    _int(first),
                    _int(last),
                    _int(created),
                    _bytes(digest),
                    _int(replays),
                    _int(events),
                    _int(first_ts),
                )
        except (TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"unreadable shipper state: {type(exc).__name__}") from None
        return state


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("shipper state: expected a non-negative integer")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("shipper state: expected bytes")
    return value
