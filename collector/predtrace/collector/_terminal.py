"""Collector data made safe to print on an on-call engineer's terminal.

Names, versions, digests and reasons come from producers, CI hooks,
OpenLineage events and MLflow: any of them may hold an escape sequence that
would clear the screen, recolour a line or retitle the window, and so hide a
missing hop or fake a chain. Control characters are shown as ``\\xNN``.
"""

from __future__ import annotations

from typing import Final

# C0 controls but the newline (multi-line cells), DEL and the C1 controls.
_VISIBLE: Final = {
    code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code != 0x0A
}


def printable(text: str) -> str:
    """``text`` with every control character but the newline written out as ``\\xNN``."""
    return text.translate(_VISIBLE)
