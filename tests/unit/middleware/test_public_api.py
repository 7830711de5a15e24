"""The middleware's public names: one sorted __all__, every name importable."""

from __future__ import annotations

from predtrace import middleware


def _isort_style(name: str) -> tuple[int, str]:
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


def test_all_is_sorted_unique_and_importable() -> None:
    exported = list(middleware.__all__)
    assert exported == sorted(exported, key=_isort_style)
    assert len(set(exported)) == len(exported)
    assert all(hasattr(middleware, name) and not name.startswith("_") for name in exported)


def test_the_names_other_components_code_against_exist() -> None:
    from predtrace.middleware import (  # noqa: PLC0415
        MiddlewareConfig,
        PredictionTracingMiddleware,
        current_prediction,
        instrument_app,
    )

    assert callable(instrument_app) and callable(current_prediction)
    assert MiddlewareConfig.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert "__slots__" in vars(MiddlewareConfig)
    assert PredictionTracingMiddleware.__doc__
