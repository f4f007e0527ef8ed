"""sdcore's own model families, declared through the same hook plugins use (no torch import here)."""

from __future__ import annotations

from collections.abc import Iterable

from ..hookspecs import hookimpl
from ..models.chroma import CHROMA
from ..models.family import BUILTIN_FAMILIES, ModelFamily
from ..models.flux import FLUX
from ..models.sd3 import SD3


@hookimpl
def sdcore_model_families() -> Iterable[ModelFamily]:
    return (*BUILTIN_FAMILIES, SD3, FLUX, CHROMA)
