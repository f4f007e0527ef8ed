"""fp8 base weights (``--fp8-base``, kohya's ``--fp8_base``): frozen Linear/Conv2d weights of the
denoiser stored as ``torch.float8_e4m3fn`` (1 byte per element instead of 2 in bf16).

This is the ``fp8`` storage format of :mod:`sdcore.train.base_weights` (``--base-weights-dtype fp8``),
which holds the one implementation (layers, autograd function, formats); the names here keep the
``--fp8-base`` spelling for callers and tests. The ``weight`` parameter itself holds the fp8 tensor,
so state-dict names are unchanged, and the output equals the float path on fp8-rounded weights bit
for bit: ``F.linear(x, w8.to(dtype), b)`` is that path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base_weights import (
    STORAGE_FORMATS,
    convert_base_weights,
    convertible,
    convertible_counts,
    fp8_dtype,
    weight_elements,
)
from .base_weights import QuantizedConv2d as Fp8Conv2d
from .base_weights import QuantizedLinear as Fp8Linear

__all__ = [
    "Fp8Conv2d",
    "Fp8Linear",
    "convert_to_fp8",
    "convertible",
    "fp8_dtype",
    "fp8_element_counts",
    "fp8_problem",
    "weight_elements",
]


def fp8_problem(device: Any) -> str | None:
    """Why fp8 base weights cannot be used on ``device`` (``None`` when they can): the dtype must
    exist and a round trip to and from it must run there (storage casts, not fp8 matmuls)."""
    return STORAGE_FORMATS["fp8"].problem(device)


def convert_to_fp8(root: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every frozen Linear/Conv2d weight under ``root`` as float8_e4m3fn, in place; returns
    the number of weight elements converted (:func:`sdcore.train.base_weights.convert_base_weights`)."""
    return convert_base_weights(root, "fp8", compute_dtype)


def fp8_element_counts(root: nn.Module) -> int:
    """Weight elements ``--fp8-base`` would store in fp8 (shapes only: works on the meta device)."""
    return convertible_counts(root)[0]
