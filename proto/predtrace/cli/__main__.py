"""``python -m predtrace.cli``: the same as the ``predtrace`` command."""

from predtrace.cli import main

main()
