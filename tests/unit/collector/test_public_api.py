"""The collector's public names: sorted, all importable, and the CLI stays light."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import ModuleType

import pytest

from predtrace import collector


def _isort_style(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


@pytest.mark.parametrize(
    "module", [collector, importlib.import_module("predtrace.collector.lineage")]
)
def test_all_is_sorted_and_every_name_imports(module: ModuleType) -> None:
    assert module.__all__ == sorted(module.__all__, key=_isort_style)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_query_commands_do_not_load_the_server_stack() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from predtrace.cli import main\n"
        "CliRunner().invoke(main, ['trace', '--help'])\n"
        "print(','.join(m for m in sys.modules if m.startswith(('aiohttp', 'prometheus_client',"
        " 'asyncpg', 'predtrace.collector.store'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
