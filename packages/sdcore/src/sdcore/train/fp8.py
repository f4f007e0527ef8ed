"""fp8 base weights (``--fp8-base``, kohya's ``--fp8_base``): frozen Linear/Conv2d weights of the
denoiser stored as ``torch.float8_e4m3fn`` (1 byte per element instead of 2 in bf16).

Why this shape: a frozen layer only needs its weight to compute its output and, in backward, the
gradient of its input. Each converted layer keeps *only* the fp8 tensor; its forward upcasts it to
the compute dtype for that one op, and a custom autograd function saves the fp8 tensor (not the
upcast copy) for backward, where it is upcast again. So no full-precision copy of any weight outlives
the op that uses it, in forward or in the autograd graph.

The layer keeps its identity (its class is switched to a subclass of itself), so its state-dict
names, adapters' forward hooks (LoRA adds its update to the layer's output) and references held by
a method stay valid; converting before or after a method injects its adapters gives the same model.
Trainable weights (a full fine-tune, DoRA magnitudes, LoRA factors) are never converted.

The output equals the float path on fp8-rounded weights bit for bit: ``F.linear(x, w8.to(dtype), b)``
is that path. Biases stay in the compute dtype (they are small and carry offsets fp8 rounds badly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..dtypes import FP8_STORAGE as FP8_DTYPE_NAME
from ..errors import ConfigError


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; :class:`ConfigError` when this torch has no float8 types."""
    dtype = getattr(torch, FP8_DTYPE_NAME, None)
    if dtype is None:
        raise ConfigError(f"--fp8-base needs torch >= 2.1 (torch.{FP8_DTYPE_NAME}); this torch is {torch.__version__}")
    return dtype  # type: ignore[no-any-return]


def fp8_problem(device: Any) -> str | None:
    """Why fp8 base weights cannot be used on ``device`` (``None`` when they can): the dtype must
    exist and a round trip to and from it must run there (storage casts, not fp8 matmuls)."""
    try:
        dtype = fp8_dtype()
    except ConfigError as exc:
        return str(exc)
    try:
        probe = torch.tensor([1.0, -0.5, 448.0], device=device)
        back = probe.to(dtype).to(torch.float32)
        if not torch.equal(back, probe):
            return f"--fp8-base: float8 casts on {device} do not round-trip exact values"
    except Exception as exc:  # the device's kernels decide: any failure means no
        return f"--fp8-base: this device ({device}) cannot store {FP8_DTYPE_NAME} weights ({exc})"
    return None


def _compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype the op runs in: autocast's when active, else the input's (as a float layer would)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else fallback


class _Fp8LinearFunction(torch.autograd.Function):
    """``F.linear`` with an fp8 weight upcast per call; backward saves the fp8 tensor only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight8: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Any:
        ctx.save_for_backward(weight8)
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.autocast = torch.is_autocast_enabled(x.device.type)
        ctx.device_type = x.device.type
        return F.linear(x, weight8.to(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (weight8,) = ctx.saved_tensors
        weight = weight8.to(ctx.dtype)
        grad_x = grad.to(weight.dtype).matmul(weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
        return grad_x, None, grad_b, None


class _Fp8Conv2dFunction(torch.autograd.Function):
    """``F.conv2d`` with an fp8 weight upcast per call; backward saves the fp8 tensor only."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight8: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, conv: Any
    ) -> Any:
        ctx.save_for_backward(weight8)
        ctx.dtype, ctx.x_dtype, ctx.input_shape, ctx.conv = dtype, x.dtype, x.shape, conv
        ctx.bias_grad = bias is not None and bias.requires_grad
        weight = weight8.to(dtype)
        return conv._conv_forward(x.to(dtype) if x.dtype != dtype else x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (weight8,) = ctx.saved_tensors
        weight = weight8.to(ctx.dtype)
        conv = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(  # type: ignore[attr-defined]
                ctx.input_shape, weight, grad.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups
            ).to(ctx.x_dtype)
        grad_b = grad.sum((0, 2, 3)) if ctx.bias_grad else None
        return grad_x, None, grad_b, None, None


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in fp8 and upcast per forward."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(input, self.compute_dtype)
        bias: torch.Tensor | None = self.bias
        if bias is not None and bias.dtype != dtype and not torch.is_autocast_enabled(input.device.type):
            bias = bias.to(dtype)
        out: torch.Tensor = _Fp8LinearFunction.apply(input, self.weight, bias, dtype)
        return out


class Fp8Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is stored in fp8 and upcast per forward."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(input, self.compute_dtype)
        bias: torch.Tensor | None = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        out: torch.Tensor = _Fp8Conv2dFunction.apply(input, self.weight, bias, dtype, self)
        return out


def convertible(module: nn.Module) -> bool:
    """A plain Linear/Conv2d whose weight does not train (the layers ``--fp8-base`` converts)."""
    if type(module) not in (nn.Linear, nn.Conv2d):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.requires_grad and weight.is_floating_point()


def weight_elements(module: nn.Module) -> int:
    """Elements of a layer's ``weight``."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.numel()


def convert_to_fp8(root: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every frozen Linear/Conv2d weight under ``root`` as float8_e4m3fn, in place; returns
    the number of weight elements converted. ``compute_dtype`` is the dtype each op runs in when
    no autocast is active (the dtype the weights would have had without fp8)."""
    dtype = fp8_dtype()
    converted = 0
    for module in root.modules():
        if not convertible(module):
            continue
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        with torch.no_grad():
            weight.data = weight.data.to(dtype)
        module.__class__ = Fp8Linear if isinstance(module, nn.Linear) else Fp8Conv2d
        module.compute_dtype = compute_dtype  # type: ignore[assignment]
        converted += weight.numel()
    return converted


def fp8_element_counts(root: nn.Module) -> int:
    """Weight elements ``--fp8-base`` would store in fp8 (shapes only: works on the meta device)."""
    return sum(weight_elements(m) for m in root.modules() if convertible(m))
