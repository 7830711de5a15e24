"""The producer id a sidecar ships under, kept in its spool directory.

SidecarApp (``_app``) -> **identity** -> shipper. At start the sidecar takes
the configured id, else the one kept in the spool directory (made once);
when that cannot continue the spool's seq numbering (a lost spool state, a
damaged or missing file, another configured id), it continues under a new
or derived id whose seqs start at 1. The shipper asks for a derived id
when the collector refuses a seq as reused.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
import socket

from predtrace.sidecar._config import SidecarConfig, producer_id_problem
from predtrace.sidecar.spool import FileLayer, Spool, write_whole
from predtrace.wire import producer_id_base, restarted_producer_id

_log = logging.getLogger("predtrace.sidecar")
PRODUCER_FILE = "producer_id"
_PRODUCER_FILE_MAX_BYTES = 1024  # an id is at most 200 characters (4 bytes each in UTF-8)


def producer_id(config: SidecarConfig, spool: Spool, files: FileLayer) -> tuple[str, bool]:
    """The configured id, else the one kept in the spool directory (made once).

    Also whether the id is new to the spool's numbering (its seqs then
    start at 1). When the spool's state was lost, its seq numbering can
    no longer be trusted, so the sidecar continues under a derived id
    (``<id>-r<hex>``, kept in the directory) that can never collide with
    the old seqs; a token made by ``predtrace collector token --producer
    <id>`` accepts it. A configured id other than the kept one (and not
    one of its ``-r`` restarts) is new too: it must not carry on the old
    id's numbering, which the collector would report as missing batches.
    A new id's numbering is reset in the spool state before the id is
    kept, so a death in between cannot leave the new id on the old seqs.

    A kept id that breaks the ``--producer-id`` rules (a damaged file), or
    none kept in a spool that was used (the file removed), is logged and
    replaced the same way, by a new id whose seqs start at 1:
    the old id is unknown, so nothing may continue its numbering. That
    loses nothing: the spooled events go out under the new id, and the
    sidecar keeps accepting (refusing to start would leave producers
    unacknowledged until someone repairs the file).
    """
    path = posixpath.join(config.spool.directory, PRODUCER_FILE)
    stored, damage = "", None
    if files.exists(path):
        stored, damage = _read_producer_file(files, path)
    elif spool.meta or spool.hwm > 0:
        # Lost while the spool kept the shipper's numbering: of an id
        # unknown now (the configured one may have been continued under a
        # derived id), so nothing may continue it, as for a damaged file.
        damage = "the file is missing, but the spool holds an earlier id's numbering"
    if damage is not None:
        return _replace_unusable(config, spool, files, path, damage), True
    configured = config.producer_id
    kept, fresh = stored, False
    # The kept id is this one, or one it continued under (``<id>-r<6 hex>``);
    # not merely one that begins with it ("edge" is not "edge-rack-1").
    if configured and not (kept == configured or producer_id_base(kept) == configured):
        if stored:
            _log.warning(
                "--producer-id %s replaces the producer id %s kept in %s; seqs start at 1",
                configured,
                stored,
                path,
            )
            reset_numbering(spool)
            fresh = True
        kept = configured
    if not kept:
        kept = _new_producer_id()
    elif spool.state_lost:
        # From the configured id when there is one: a configured id may
        # itself end in -r<6 hex> and must never be taken for a restart.
        kept = restarted_producer_id(configured or producer_id_base(kept))
    if kept != stored:
        _write_atomic(files, path, kept.encode())
    return kept, fresh


def _replace_unusable(
    config: SidecarConfig, spool: Spool, files: FileLayer, path: str, damage: str
) -> str:
    """A new id for one kept in ``path`` that is not usable, its seqs from 1 (logged)."""
    configured = config.producer_id
    kept = restarted_producer_id(configured) if configured else _new_producer_id()
    _log.error(
        "the producer id kept in %s is not usable (%s); continuing as the new "
        "producer %s, its seqs from 1",
        path,
        damage,
        kept,
    )
    reset_numbering(spool)
    _write_atomic(files, path, kept.encode())
    return kept


def reset_numbering(spool: Spool) -> None:
    """Make the shipper's next start number from 1, durably (the mark stays).

    The shipper's state (next seq, chain, the batch in flight) belongs to
    the old id; an empty state is a fresh numbering.
    """
    spool.commit(spool.hwm, b"")


def renumbered_producer_id(config: SidecarConfig, files: FileLayer, current: str) -> str:
    """The id to continue under after the collector refused a seq of ``current`` as reused.

    Derived from the configured id when there is one, as for a lost spool
    state, and kept in the spool directory so a restart continues it.
    """
    path = posixpath.join(config.spool.directory, PRODUCER_FILE)
    new = restarted_producer_id(config.producer_id or producer_id_base(current))
    _write_atomic(files, path, new.encode())
    return new


def _new_producer_id() -> str:
    host = socket.gethostname().split(".")[0][:40] or "host"
    return f"sidecar-{host}-{secrets.token_hex(4)}"


def _read_producer_file(files: FileLayer, path: str) -> tuple[str, str | None]:
    """The id kept in ``path``, and what is wrong with it (None when usable)."""
    if files.size(path) > _PRODUCER_FILE_MAX_BYTES:
        return "", f"the file is larger than {_PRODUCER_FILE_MAX_BYTES} bytes"
    try:
        text = files.read(path, 0, _PRODUCER_FILE_MAX_BYTES).decode("utf-8").strip()
    except UnicodeDecodeError:
        return "", "the file is not UTF-8 text"
    # A restarted id is its base plus "-r" and 6 hex digits: the length rule
    # (room for that suffix) applies to the base, as it did to --producer-id.
    problem = producer_id_problem(producer_id_base(text))
    return (text, None) if problem is None else ("", problem)


def _write_atomic(files: FileLayer, path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    write_whole(files, tmp, data)
    files.rename(tmp, path)
    files.fsync_dir(posixpath.dirname(path))
