"""The one table of precision names: ``fp32``/``fp16``/``bf16`` (and their aliases) <-> ``torch.dtype``.

Import-light: torch loads only when a name is resolved. Every option that takes a precision
(``--save-dtype``, ``--mixed-precision``, ``--dtype``) resolves it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import SdcoreError

if TYPE_CHECKING:
    import torch

#: precision name -> torch attribute name (``"no"`` is ``--mixed-precision no``: full precision)
DTYPE_NAMES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "no": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    # storage only (``--fp8-base``), not a training or save precision: no short alias on purpose
    "float8_e4m3fn": "float8_e4m3fn",
}
#: the dtype ``--fp8-base`` stores frozen weights in (kohya, ComfyUI and diffusers store e4m3fn)
FP8_STORAGE = "float8_e4m3fn"
#: torch attribute name -> bytes per element (the memory plan and the disk estimate)
ELEMENT_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
#: torch attribute name -> the short name files and logs use
SHORT_NAMES: dict[str, str] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8"}


#: elements per absmax block of the ``nf4`` base-weight format (bitsandbytes' default 4-bit block size)
NF4_BLOCK = 64


def stored_weight_bytes(storage: str, elements: int, rows: int) -> float:
    """Bytes of ``elements`` frozen weight elements in ``rows`` output rows under
    ``--base-weights-dtype storage`` (:mod:`sdcore.train.base_weights`), without torch: ``fp8`` 1 byte
    each; ``nf4`` half a byte plus an fp32 maximum per block of :data:`NF4_BLOCK` (0.5 + 4/64);
    ``int8`` 1 byte plus an fp32 maximum per output row (1 + 4/in_features). Blocks are padded to 64
    elements per tensor; the plan counts the formula (the padding is at most 63 elements a layer)."""
    if storage == "fp8":
        return float(elements * ELEMENT_BYTES[FP8_STORAGE])
    if storage == "nf4":
        return elements * (0.5 + 4 / NF4_BLOCK)
    if storage == "int8":
        return elements + 4.0 * rows
    raise SdcoreError(f"unknown base-weight storage {storage!r}; use fp8, nf4 or int8")


def element_bytes(name: str) -> int:
    """Bytes per element of a precision name (``"bf16"`` -> 2, ``"no"``/``"fp32"`` -> 4), without torch."""
    attribute = DTYPE_NAMES.get(name.lower())
    if attribute is None:
        raise SdcoreError(f"unknown dtype {name!r}; use fp32, fp16 or bf16")
    return ELEMENT_BYTES[attribute]


def resolve_dtype(dtype: Any) -> Any:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or an alias) or a ``torch.dtype`` -> ``torch.dtype``; ``None`` stays ``None``."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise SdcoreError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return getattr(torch, name)


def torch_dtype(name: str) -> torch.dtype:
    """Like :func:`resolve_dtype` for a name that must be given (``--mixed-precision``, ``--save-dtype``)."""
    dtype = resolve_dtype(name)
    if dtype is None:
        raise SdcoreError("no dtype given; use fp32, fp16 or bf16")
    return dtype  # type: ignore[no-any-return]


def short_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (other dtypes: their ``str``)."""
    return SHORT_NAMES.get(str(dtype).removeprefix("torch."), str(dtype))


def compute_dtype(module: Any) -> torch.dtype:
    """The dtype ``module`` computes in. Not ``module.dtype`` (its first parameter's): with ``--fp8-base``
    the frozen weights are float8 storage while every op runs in the layers' ``compute_dtype`` (see
    :mod:`sdcore.train.fp8`); a family adapter casts its inputs to this."""
    import torch

    for child in module.modules():
        found = getattr(child, "compute_dtype", None)
        if isinstance(found, torch.dtype):
            return found
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.element_size() > 1:
            return parameter.dtype
    return torch.float32
