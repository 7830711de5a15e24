"""Public modules re-export their names through one sorted __all__."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["predtrace.wire", "predtrace.sidecar.pipeline"]


def _isort_style(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_unique_and_importable(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=_isort_style)
    assert len(set(exported)) == len(exported)
    for attr in exported:
        assert hasattr(module, attr), attr
        assert not attr.startswith("_")
