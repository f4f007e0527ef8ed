"""Frozen base weights stored below the compute precision (``--base-weights-dtype fp8|nf4|int8``;
``--fp8-base`` is kohya's spelling of ``fp8``): the denoiser's frozen Linear/Conv2d weights kept
in a compact storage format and turned back into a float weight for one op at a time.

Why this shape: a frozen layer only needs its weight to compute its output and, in backward, the
gradient of its input. Each converted layer keeps *only* the stored tensors; its forward
dequantises them to the compute dtype for that one op, and a custom autograd function saves the
stored tensors (not the float copy) for backward, where they are dequantised again. So no
full-precision copy of any weight outlives the op that uses it, in forward or in the autograd graph.

The layer keeps its identity (its class is switched to a subclass of itself), so its path, adapters'
forward hooks (LoRA adds its update to the layer's output) and references held by a method stay
valid; converting before or after a method injects its adapters gives the same model. Trainable
weights (a full fine-tune, DoRA magnitudes, LoRA factors) are never converted; biases keep their
dtype (they are small and carry offsets a coarse code rounds badly).

The storage formats (:data:`STORAGE_FORMATS`), one object each with ``quantise``/``dequantise`` and
the bytes the memory plan counts:

- ``fp8``: ``torch.float8_e4m3fn`` (kohya's ``--fp8_base``, 1 byte per element). The ``weight``
  parameter itself holds the fp8 tensor (state-dict name ``weight``).
- ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, the 16 values bitsandbytes also uses):
  the flattened weight in blocks of 64 elements (bitsandbytes' default 4-bit block size), each block
  divided by its absolute maximum and every element replaced by the index of the nearest code; two
  4-bit indices per byte (the first of each pair in the high nibble), the block maxima in fp32. No
  double quantisation (QLoRA's 8-bit maxima): 0.5 + 4/64 bytes per element. Buffers
  ``weight_nf4`` (uint8) and ``weight_absmax`` (fp32) replace the ``weight`` parameter.
- ``int8``: symmetric absmax int8 per output row (``round(w * 127 / absmax_row)``), the row maxima in
  fp32: 1 + 4/in_features bytes per element. Weight-only: bitsandbytes' LLM.int8 (OneTrainer's
  ``INT_8``) also finds outlier input columns at run time and multiplies them in fp16, and
  optimum-quanto's ``qint8`` keeps its scales in the weight's dtype, so the numbers differ slightly from
  theirs. Buffers ``weight_int8`` and ``weight_absmax`` replace the ``weight`` parameter.

For the packed formats ``layer.weight`` is a read-only property that returns the dequantised weight
(in the compute dtype), so code that reads a base weight (DoRA's norm, LyCORIS' weight-rebuilding
algorithms, shapes) sees the weight the layer computes with. Writing it (merging a LoRA into the base)
is refused: merge into an unquantised model. Block swap moves the stored buffers like any others.

Torch only (bitsandbytes is not required; its kernels could later back the same format objects).
The output equals the float path on the dequantised weight bit for bit:
``F.linear(x, storage.dequantise(stored, shape, dtype), b)`` is that path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..dtypes import FP8_STORAGE as FP8_DTYPE_NAME
from ..dtypes import NF4_BLOCK, stored_weight_bytes
from ..errors import ConfigError

#: QLoRA's NormalFloat4 code values (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table)
NF4_CODES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; :class:`ConfigError` when this torch has no float8 types."""
    dtype = getattr(torch, FP8_DTYPE_NAME, None)
    if dtype is None:
        raise ConfigError(f"--fp8-base needs torch >= 2.1 (torch.{FP8_DTYPE_NAME}); this torch is {torch.__version__}")
    return dtype  # type: ignore[no-any-return]


class StorageFormat:
    """How one kind of frozen weight is stored: ``quantise`` a float weight into named tensors,
    ``dequantise`` them back, and the bytes the memory plan counts."""

    name = ""
    #: the stored tensors' attribute names on a converted layer, in ``dequantise``'s order
    names: tuple[str, ...] = ()

    def quantise(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def dequantise(self, stored: tuple[torch.Tensor, ...], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def stored_bytes(self, elements: int, rows: int) -> float:
        """Bytes of ``elements`` weight elements in ``rows`` output rows (the memory plan's formula,
        :func:`sdcore.dtypes.stored_weight_bytes`)."""
        return stored_weight_bytes(self.name, elements, rows)

    def problem(self, device: Any) -> str | None:
        """Why this format cannot be used on ``device`` (``None`` when it can): a round trip must run there."""
        try:
            probe = torch.tensor([[1.0, -1.0, 0.0, 1.0]], device=device)  # values every format keeps exactly
            back = self.dequantise(self.quantise(probe), probe.shape, torch.float32)
            if not torch.equal(back, probe):
                return f"--base-weights-dtype {self.name}: a round trip on {device} does not keep exact values"
        except ConfigError as exc:
            return str(exc)
        except Exception as exc:  # the device's kernels decide: any failure means no
            return f"--base-weights-dtype {self.name}: this device ({device}) cannot store the weights ({exc})"
        return None


class Fp8Storage(StorageFormat):
    """float8_e4m3fn, the ``weight`` parameter itself (kohya, ComfyUI and diffusers store e4m3fn)."""

    name = "fp8"
    names = ("weight",)

    def quantise(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (weight.to(fp8_dtype()),)

    def dequantise(self, stored: tuple[torch.Tensor, ...], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return stored[0].to(dtype)

    def problem(self, device: Any) -> str | None:
        try:
            dtype = fp8_dtype()
        except ConfigError as exc:
            return str(exc)
        try:
            probe = torch.tensor([1.0, -0.5, 448.0], device=device)
            if not torch.equal(probe.to(dtype).to(torch.float32), probe):
                return f"--fp8-base: float8 casts on {device} do not round-trip exact values"
        except Exception as exc:
            return f"--fp8-base: this device ({device}) cannot store {FP8_DTYPE_NAME} weights ({exc})"
        return None


class Nf4Storage(StorageFormat):
    """4-bit NormalFloat in absmax blocks of :data:`NF4_BLOCK`, two codes per byte, fp32 block maxima."""

    name = "nf4"
    names = ("weight_nf4", "weight_absmax")

    def codes(self, device: Any = None) -> torch.Tensor:
        return torch.tensor(NF4_CODES, dtype=torch.float32, device=device)

    def quantise(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = weight.detach().reshape(-1).float()
        padded = math.ceil(flat.numel() / NF4_BLOCK) * NF4_BLOCK
        blocks = F.pad(flat, (0, padded - flat.numel())).reshape(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        codes = self.codes(weight.device)
        # nearest code: the count of midpoints below the value (a tie goes to the lower code)
        index = torch.bucketize(scaled.reshape(-1), (codes[1:] + codes[:-1]) / 2).to(torch.uint8)
        packed = (index[0::2] << 4) | index[1::2]
        return packed, absmax

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """The 4-bit indices of a packed tensor, in element order (padding included)."""
        return torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1).long()

    def dequantise(self, stored: tuple[torch.Tensor, ...], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        packed, absmax = stored
        values = self.codes(packed.device)[self.unpack(packed)].reshape(-1, NF4_BLOCK) * absmax.float()[:, None]
        return values.reshape(-1)[: math.prod(shape)].reshape(shape).to(dtype)


class Int8Storage(StorageFormat):
    """Symmetric int8 with one fp32 absmax per output row (weight-only, no outlier columns)."""

    name = "int8"
    names = ("weight_int8", "weight_absmax")

    def quantise(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = weight.detach().reshape(weight.shape[0], -1).float()
        absmax = rows.abs().amax(dim=1)
        scale = absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None] / 127
        return torch.round(rows / scale).clamp(-127, 127).to(torch.int8).reshape(weight.shape), absmax

    def dequantise(self, stored: tuple[torch.Tensor, ...], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        codes, absmax = stored
        rows = codes.reshape(shape[0], -1).float() * (absmax.float()[:, None] / 127)
        return rows.reshape(shape).to(dtype)


#: option value -> its format
STORAGE_FORMATS: dict[str, StorageFormat] = {f.name: f for f in (Fp8Storage(), Nf4Storage(), Int8Storage())}


def _compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype the op runs in: autocast's when active, else the input's (as a float layer would)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else fallback


class _StoredWeightFunction(torch.autograd.Function):
    """The layer's op with its weight dequantised per call; backward saves the stored tensors only."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, layer: Any, *stored: Any
    ) -> Any:
        ctx.save_for_backward(*stored)
        ctx.dtype, ctx.x_dtype, ctx.input_shape, ctx.layer = dtype, x.dtype, x.shape, layer
        ctx.storage, ctx.shape = layer.storage, layer.stored_shape
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.count = len(stored)
        weight = layer.storage.dequantise(stored, layer.stored_shape, dtype)
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x.to(dtype) if x.dtype != dtype else x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        weight = ctx.storage.dequantise(ctx.saved_tensors, ctx.shape, ctx.dtype)
        layer = ctx.layer
        conv = isinstance(layer, nn.Conv2d)
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            if conv:
                grad_x = torch.nn.grad.conv2d_input(  # type: ignore[attr-defined]
                    ctx.input_shape, weight, grad.to(weight.dtype), layer.stride, layer.padding, layer.dilation,
                    layer.groups,
                ).to(ctx.x_dtype)  # fmt: skip
            else:
                grad_x = grad.to(weight.dtype).matmul(weight).to(ctx.x_dtype)
        if ctx.bias_grad:
            grad_b = grad.sum((0, 2, 3)) if conv else grad.reshape(-1, grad.shape[-1]).sum(0)
        return (grad_x, grad_b, None, None, *[None] * ctx.count)


class _StoredWeightLayer(nn.Module):
    """What a converted Linear/Conv2d adds: the stored tensors, the dequantising forward, and a
    ``weight`` that reads as the dequantised weight for the packed formats."""

    storage: StorageFormat
    stored_shape: torch.Size
    compute_dtype: torch.dtype

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors (the ones a block swap has put on the device while it runs)."""
        return tuple(self._parameters[n] if n in self._parameters else self._buffers[n] for n in self.storage.names)  # type: ignore[misc]

    def dequantised_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.storage.dequantise(self.stored(), self.stored_shape, dtype or self.compute_dtype)

    def _stored_forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(input, self.compute_dtype)
        bias: torch.Tensor | None = self._parameters.get("bias")
        # a Linear under autocast casts the bias itself; a convolution gets it in the compute dtype
        autocast = torch.is_autocast_enabled(input.device.type)
        if bias is not None and bias.dtype != dtype and (isinstance(self, nn.Conv2d) or not autocast):
            bias = bias.to(dtype)
        out: torch.Tensor = _StoredWeightFunction.apply(input, bias, dtype, self, *self.stored())
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``.to(dtype)`` on the model must not round the fp32 block/row maxima: they follow the
        device only."""
        maxima = self._buffers.get("weight_absmax")
        result = super()._apply(fn, recurse)
        moved = self._buffers.get("weight_absmax")
        if maxima is not None and moved is not None and moved.dtype != maxima.dtype:
            self._buffers["weight_absmax"] = maxima.to(moved.device)
        return result


def _weight_property() -> Any:
    def get(self: Any) -> torch.Tensor:
        stored = self._parameters.get("weight")
        if stored is not None:  # fp8: the parameter itself
            return stored  # type: ignore[no-any-return]
        return self.dequantised_weight()  # type: ignore[no-any-return]

    def put(self: Any, value: Any) -> None:
        raise AttributeError(
            f"{type(self).__name__}.weight is dequantised from {self.storage.name} storage and cannot be "
            "written (merge into a model loaded without --base-weights-dtype)"
        )

    return property(get, put, doc="The layer's weight as it computes with it (dequantised per read).")


class QuantizedLinear(_StoredWeightLayer, nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in a :class:`StorageFormat` and dequantised per forward."""

    weight = _weight_property()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._stored_forward(input)


class QuantizedConv2d(_StoredWeightLayer, nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is stored in a :class:`StorageFormat` and dequantised per forward."""

    weight = _weight_property()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._stored_forward(input)


def convertible(module: nn.Module) -> bool:
    """A plain Linear/Conv2d whose weight does not train (the layers the option converts)."""
    if type(module) not in (nn.Linear, nn.Conv2d):
        return False
    weight = module._parameters.get("weight")
    return isinstance(weight, torch.Tensor) and not weight.requires_grad and weight.is_floating_point()


def weight_elements(module: nn.Module) -> int:
    """Elements of a layer's ``weight``."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.numel()


def weight_rows(module: nn.Module) -> int:
    """Output rows of a layer's ``weight`` (``int8`` stores one maximum per row)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def excluded_names(root: nn.Module, patterns: Sequence[str], trainable: set[int] | None = None) -> dict[str, list[str]]:
    """Per glob pattern (``fnmatch`` on the names of ``root.named_modules()``, as optimum-quanto's ``exclude``
    that ai-toolkit's ``quantize_kwargs`` passes), the convertible layers it keeps out of the conversion.
    ``trainable``: ids of the parameters that will train, as :func:`convertible_counts` takes them (the memory
    plan's meta-device model keeps the flags a method's ``plan_groups`` left, which need not be the run's)."""
    from fnmatch import fnmatch

    def frozen(module: nn.Module) -> bool:
        if trainable is None:
            return convertible(module)
        weight = module._parameters.get("weight") if type(module) in (nn.Linear, nn.Conv2d) else None
        return isinstance(weight, torch.Tensor) and weight.is_floating_point() and id(weight) not in trainable

    names = [name for name, module in root.named_modules() if frozen(module)]
    return {pattern: [name for name in names if fnmatch(name, pattern)] for pattern in patterns}


def excluded_weights(root: nn.Module, patterns: Sequence[str]) -> list[torch.Tensor]:
    """The weights of the Linear/Conv2d layers under ``root`` that ``patterns`` keep out of the conversion
    (the names :func:`excluded_names` matches, without its frozen-weights condition: the memory plan's
    meta-device model need not have its training flags yet)."""
    from fnmatch import fnmatch

    return [
        module.weight
        for name, module in root.named_modules()
        if type(module) in (nn.Linear, nn.Conv2d) and any(fnmatch(name, pattern) for pattern in patterns)
    ]


def convert_base_weights(
    root: nn.Module, storage: str | StorageFormat, compute_dtype: torch.dtype, exclude: Sequence[str] = ()
) -> int:
    """Store every frozen Linear/Conv2d weight under ``root`` in ``storage`` (a :data:`STORAGE_FORMATS`
    name or object), in place, except the layers under ``exclude``'s glob patterns (:func:`excluded_names`);
    returns the number of weight elements converted. ``compute_dtype`` is the dtype each op runs in when no
    autocast is active (the dtype the weights would have had)."""
    fmt = STORAGE_FORMATS[storage] if isinstance(storage, str) else storage
    kept = {name for names in excluded_names(root, exclude).values() for name in names} if exclude else set()
    converted = 0
    for name, module in list(root.named_modules()):
        if not convertible(module) or name in kept:
            continue
        weight = module._parameters["weight"]
        assert weight is not None
        with torch.no_grad():
            stored = fmt.quantise(weight.data)
        shape = weight.shape
        if fmt.names == ("weight",):
            weight.data = stored[0]
        else:
            del module._parameters["weight"]
            for name, tensor in zip(fmt.names, stored, strict=True):
                module.register_buffer(name, tensor)
        module.__class__ = QuantizedLinear if isinstance(module, nn.Linear) else QuantizedConv2d
        module.storage = fmt  # type: ignore[assignment]
        module.stored_shape = shape  # type: ignore[assignment]
        module.compute_dtype = compute_dtype  # type: ignore[assignment]
        converted += shape.numel()
    return converted


def convert_text_encoder(encoder: nn.Module, storage: str | StorageFormat, compute_dtype: torch.dtype) -> int:
    """``--text-encoder-weights-dtype``: a frozen text encoder's Linear weights stored as the denoiser's are
    (:func:`convert_base_weights`: embeddings, norms and biases keep their dtype, trainable weights are skipped);
    returns the weight elements converted.

    transformers' T5 feed-forward casts its input to ``wo.weight.dtype`` unless that is int8 (for a checkpoint
    stored in float32); an fp8 ``wo`` would round every hidden state to fp8 before the layer even runs. So a T5
    feed-forward whose ``wo`` was converted runs its own ops without that cast, as it does when the dtypes agree."""
    converted = convert_base_weights(encoder, storage, compute_dtype)
    for module in encoder.modules():
        if isinstance(getattr(module, "wo", None), _StoredWeightLayer) and type(module).__name__ in _T5_FEED_FORWARD:
            module.forward = _T5_FEED_FORWARD[type(module).__name__].__get__(module)  # type: ignore[method-assign]
    return converted


def _t5_gated_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``T5DenseGatedActDense``'s ops: ``wo(dropout(act(wi_0(x)) * wi_1(x)))``, the input left in its dtype."""
    return self.wo(self.dropout(self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)))  # type: ignore[no-any-return]


def _t5_plain_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``T5DenseActDense``'s ops: ``wo(dropout(act(wi(x))))``, the input left in its dtype."""
    return self.wo(self.dropout(self.act(self.wi(hidden_states))))  # type: ignore[no-any-return]


#: transformers' T5 feed-forward classes -> their ops without the cast to ``wo.weight.dtype``
_T5_FEED_FORWARD = {"T5DenseGatedActDense": _t5_gated_forward, "T5DenseActDense": _t5_plain_forward}


def convertible_counts(root: nn.Module, trainable: set[int] | None = None) -> tuple[int, int]:
    """(weight elements, output rows) the option would convert under ``root`` (shapes only: works on
    the meta device). ``trainable``: ids of the parameters that will train (default: ``requires_grad``)."""
    elements = rows = 0
    for module in root.modules():
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        weight = module._parameters.get("weight")
        if weight is None or (weight.requires_grad if trainable is None else id(weight) in trainable):
            continue
        elements += weight.numel()
        rows += int(weight.shape[0])
    return elements, rows
