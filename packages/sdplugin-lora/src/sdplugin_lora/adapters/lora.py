"""LoRA / LoCon (kohya ``networks.lora``, LyCORIS ``locon``): its variant, ``ΔW = up @ down`` (Tucker
optional), and its adapter, with the optional trainable ``lora_up`` bias (PEFT's ``lora_bias``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .dropout import lora_input, scaled_hidden
from .maths import Tensors, _f32, tucker
from .variant import Variant


class LoraVariant(Variant):
    """LoRA / LoCon (kohya ``networks.lora``, LyCORIS ``locon``): ``ΔW = up @ down``.

    For kxk convs ``lora_down`` is ``[r, in, k, k]`` and ``lora_up`` ``[out, r, 1, 1]``; with Tucker
    (``use_tucker``) ``lora_down`` is ``[r, in, 1, 1]`` and ``lora_mid`` ``[r, r, k, k]`` holds the kernel.
    """

    algo = "lora"
    markers = ("lora_down.weight", "lora_up.weight")
    keys = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    tucker_keys = ("lora_mid.weight",)

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        return "lora_down.weight" in t and "lora_up.weight" in t

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(t["lora_down.weight"].shape[0])

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        f = _f32(t)
        up, down = f["lora_up.weight"].flatten(1), f["lora_down.weight"].flatten(1)
        if "lora_mid.weight" in f:
            return tucker(f["lora_mid.weight"], up.T, down).reshape(shape)
        return (up @ down).reshape(shape)

    @classmethod
    def in_out(cls, t: Tensors) -> tuple[int, int] | None:
        return int(t["lora_down.weight"].shape[1]), int(t["lora_up.weight"].shape[0])

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        down, out = t["lora_down.weight"], int(t["lora_up.weight"].shape[0])
        if "lora_mid.weight" in t:
            return (out, int(down.shape[1]), *(int(k) for k in t["lora_mid.weight"].shape[2:]))
        return (out, *(int(d) for d in down.shape[1:]))


#: where a module's trainable ``lora_up`` bias (:attr:`LoraAdapter.up_bias`) sits in files and states: PEFT's and
#: BFL's ``lora_B.bias`` in sdcore's own key names (:mod:`sdplugin_lora.format` maps the two)
UP_BIAS_KEY = "lora_up.bias"


def _up_bias_save_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the ``up_bias`` parameter under its file name, ``lora_up.bias``."""
    if prefix + "up_bias" in state:
        state[prefix + UP_BIAS_KEY] = state.pop(prefix + "up_bias")


def _up_bias_load_hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: a file's ``lora_up.bias`` into the ``up_bias`` parameter."""
    if prefix + UP_BIAS_KEY in state:
        state[prefix + "up_bias"] = state.pop(prefix + UP_BIAS_KEY)


def _add_up_bias(module: nn.Module, rows: int, like: torch.Tensor) -> nn.Parameter:
    """A zero ``lora_up`` bias of ``rows`` values for ``module`` to train (PEFT's ``lora_bias=True``: ``lora_B``
    is built with a bias and ``reset_lora_parameters`` zeroes it with the weight, so the change starts at zero),
    saved and loaded as ``lora_up.bias``."""
    module._register_state_dict_hook(_up_bias_save_hook)
    module._register_load_state_dict_pre_hook(_up_bias_load_hook, with_module=True)
    return nn.Parameter(torch.zeros(rows, dtype=torch.float32, device=like.device))


def _conv_like(base: nn.Conv2d, in_channels: int, out_channels: int, dtype: torch.dtype) -> nn.Conv2d:
    """A bias-free conv with ``base``'s kernel, stride, padding and dilation: the factor of a LoRA that holds
    the kernel (``lora_down``, or ``lora_mid`` with Tucker), so it sees the input as the layer does."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        base.kernel_size,  # type: ignore[arg-type]
        base.stride,  # type: ignore[arg-type]
        base.padding,  # type: ignore[arg-type]
        dilation=base.dilation,  # type: ignore[arg-type]
        bias=False,
        dtype=dtype,
    )


class LoraAdapter(Adapter):
    """LoRA / LoCon: ``y = W x + m · s · up(down(x))`` (Tucker: ``up(mid(down(x)))``).

    For a kxk convolution ``lora_down`` is a conv with the original kernel, stride and padding and
    ``lora_up`` a 1x1 conv, exactly as kohya (``C3Lier``) stores them; with ``tucker`` the kernel
    moves to ``lora_mid`` as LyCORIS ``use_tucker`` does. With ``dora`` the update goes through
    :class:`Dora` (computed as a weight: rank dropout drops rows of ``ΔW`` as LyCORIS does, neuron
    dropout does not apply, as in LyCORIS' weight path).
    """

    variant = LoraVariant
    algo = "lora"
    scalar_key = "lora_up.weight"
    lora_down: Any
    lora_up: Any
    lora_mid: Any

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        dora: bool = False,
        tucker: bool = False,
        rank_dropout_scale: bool = False,
        lora_bias: bool = False,
        input_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(name, base, rank, alpha, multiplier=multiplier, module_dropout=module_dropout, dora=dora)
        self.rank_dropout_scale = rank_dropout_scale
        #: PEFT's ``lora_dropout`` (``--lora-input-dropout``): on the input of ``lora_down``, training only
        #: (:func:`lora_input`); each module draws its own mask, as PEFT's separate ``to_q``/``to_k``/``to_v`` do
        self.input_dropout = input_dropout
        self.lora_mid = None
        if isinstance(base, nn.Conv2d):
            kernel = tuple(base.kernel_size)
            if tucker and kernel != (1, 1):
                self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False, dtype=dtype)
                self.lora_mid = _conv_like(base, rank, rank, dtype)
            else:
                self.lora_down = _conv_like(base, base.in_channels, rank, dtype)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False, dtype=dtype)
        else:
            assert isinstance(base, nn.Linear)
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, dtype=dtype)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, dtype=dtype)
        self._init_down()
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        #: ``lora_up``'s bias when a file has one (BFL's ``LinearLora``: ``lora_B.bias``), scaled with the rest;
        #: ``lora_bias`` trains one from zero (``--lora-bias``, PEFT's ``lora_bias``)
        self.up_bias: nn.Parameter | None = None
        if lora_bias:
            self.up_bias = _add_up_bias(self, int(self.lora_up.weight.shape[0]), self.lora_up.weight)

    def _init_down(self) -> None:
        """The down's (and Tucker core's) init after the layers are built: kaiming-uniform(a=√5), as
        kohya's ``networks.lora`` and LyCORIS draw it (a subclass drawing otherwise draws only its own)."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))

    def _factorised(self) -> bool:
        return self.dora_scale is None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``m · s · up(down(x))`` with kohya's neuron/rank dropout while training.

        With :attr:`rank_dropout_scale` the rank dropout is LyCORIS' (``LoConModule.forward``, which
        rebuilds the weight: LyCORIS' bypass forward is off unless asked) instead of kohya's: whole
        output rows of ``ΔW`` dropped, one mask for the whole batch divided by its mean, and no neuron
        dropout (LyCORIS' rebuilt weight has none), rather than a rank-channel mask per sample times
        ``1/(1-p)``. That is :meth:`Adapter.delta`'s path, the one LoHa/LoKr/DoRA take."""
        if not self._factorised() or self._frozen is not None:
            return self._with_bias(super().delta(x))
        if self.training and self.rank_dropout and self.rank_dropout_scale:
            return self._with_bias(super().delta(x))
        out = self._with_bias(self._factorised_delta(x))
        if self.ggpo is not None and self.training:  # kohya's GGPO noise, training forwards only
            noise = self.ggpo.output(x, self.base, self.lora_up.weight.dtype)
            if noise is not None:
                out = out + noise.to(out.dtype)
        return out

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        """``s · lora_up.bias`` (BFL's ``LinearLora`` adds ``lora_B(lora_A(x)) · scale``, its bias included, as
        PEFT's ``lora_bias`` does for diffusers), ``None`` without one."""
        if self.up_bias is None:
            return None
        bias = self.up_bias.detach() if detach else self.up_bias
        return bias.float() * (self._scale * self.scalar)

    def _with_bias(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus ``m · s · lora_up.bias`` (per-sample strengths too) when the module has that bias."""
        change = self.bias_change(detach=False)
        if change is None:
            return out
        term = (change * self.multiplier).to(out.dtype)
        if out.dim() == 4:  # a conv's output: channels first
            term = term.reshape(-1, 1, 1)
        factor = self.sample_factor(out)
        return out + (term if factor is None else term * factor)

    def _factorised_delta(self, x: torch.Tensor) -> torch.Tensor:
        inputs = lora_input(self._input(x, self.lora_down.weight.dtype), self.training, self.input_dropout)
        hidden = self.lora_down(inputs)
        if self.lora_mid is not None:
            hidden = self.lora_mid(hidden)
        scale: float | torch.Tensor = self._scale * self.scalar * self.multiplier
        factor = self.sample_factor(hidden)
        if factor is not None:  # kohya: lx * multiplier * scale, the multiplier one per sample
            scale = factor * scale
        hidden = scaled_hidden(hidden, scale, self.training, self.dropout, self.rank_dropout)
        return self.lora_up(hidden)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        variant = cls.variant
        rank = variant.rank(t)
        adapter = cls(
            name,
            base,
            rank,
            variant.alpha(t),
            multiplier=multiplier,
            tucker="lora_mid.weight" in t,
            dora="dora_scale" in t,
        )
        adapter._scale = variant.scale(t)
        with torch.no_grad():
            for key, param in adapter.named_parameters():
                if key in t and key != "dora_scale":
                    param.copy_(t[key].detach().float().reshape(param.shape))
        if "dora_scale" in t:  # kept in the file's layout: it tells the axis
            adapter.dora_scale = nn.Parameter(t["dora_scale"].detach().float().clone())
        if "lora_up.bias" in t:
            adapter.up_bias = nn.Parameter(t["lora_up.bias"].detach().float().clone().reshape(-1))
        return adapter
