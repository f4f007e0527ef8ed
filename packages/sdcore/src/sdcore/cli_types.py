"""Number types for the click options of sdcore's commands: a float option refuses nan and inf.

click's ``float`` and ``FloatRange`` accept ``nan`` (no comparison with a bound is true, so a range passes it)
and ``inf``: ``sdcore generate --cfg nan`` wrote a black image, ``--strength nan`` ran. Every float option of
every command but ``train`` (whose options are checked by :func:`sdcore.train.config.coerce`, all problems at
once) takes one of these types.
"""

from __future__ import annotations

import math
from typing import Any

import click


def _finite(param_type: click.ParamType, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        param_type.fail(f"{value!r} is not a finite number", param, ctx)


class FiniteFloat(click.types.FloatParamType):
    """click's float, without nan and inf."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        _finite(self, number, param, ctx)
        return number


class FiniteFloatRange(click.FloatRange):
    """click's ``FloatRange``, without nan and inf (``FloatRange(min=1.0)`` took both)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        _finite(self, number, param, ctx)
        return number


FINITE_FLOAT = FiniteFloat()
