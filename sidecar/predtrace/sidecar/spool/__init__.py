"""The sidecar's durable spool: checksummed segment files between intake and shipper.

At-least-once from the moment an event is acknowledged: records are fsynced
before the acknowledgement, replayed after a crash, dropped only at the byte
cap (oldest first, counted). ``MemoryFileLayer`` and ``FaultPoints`` are the
seams tests use to simulate power loss and crashes at named points.
"""

from predtrace.sidecar.spool._config import SpoolConfig, SpoolCounters
from predtrace.sidecar.spool._files import (
    FAULT_POINTS,
    FAULTS_ENV,
    FaultPoints,
    FileLayer,
    OsFileLayer,
    SimulatedCrash,
    write_whole,
)
from predtrace.sidecar.spool._memfs import MemoryFileLayer
from predtrace.sidecar.spool._record import HEADER_SIZE, Record, encode_record, scan
from predtrace.sidecar.spool._segments import segment_name
from predtrace.sidecar.spool._spool import Spool, SpoolStats

__all__ = [
    "FAULTS_ENV",
    "FAULT_POINTS",
    "HEADER_SIZE",
    "FaultPoints",
    "FileLayer",
    "MemoryFileLayer",
    "OsFileLayer",
    "Record",
    "SimulatedCrash",
    "Spool",
    "SpoolConfig",
    "SpoolCounters",
    "SpoolStats",
    "encode_record",
    "scan",
    "segment_name",
    "write_whole",
]
