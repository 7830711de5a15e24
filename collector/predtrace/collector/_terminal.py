"""Collector data made safe to print on an on-call engineer's terminal.

Names, versions, digests and reasons come from producers, CI hooks,
OpenLineage events and MLflow: any of them may hold an escape sequence that
would clear the screen, recolour a line or retitle the window, and so hide a
missing hop or fake a chain, or a bidirectional override that shows a digest
in another order. Such characters are shown as ``\\xNN`` or ``\\uNNNN``.
"""

from __future__ import annotations

from typing import Final

# C0 controls but the newline (multi-line cells), DEL and the C1 controls.
_VISIBLE: Final[dict[int, str]] = {
    code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code != 0x0A
}
# The bidirectional marks, embeddings, overrides and isolates, which make a
# terminal show text in another order than it is stored, and the line and
# paragraph separators some terminals break lines at.
_VISIBLE.update(
    {
        code: f"\\u{code:04x}"
        for code in (0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A))
    }
)


def printable(text: str) -> str:
    """``text`` with control characters but the newline written out (``\\xNN``, ``\\uNNNN``)."""
    return text.translate(_VISIBLE)
