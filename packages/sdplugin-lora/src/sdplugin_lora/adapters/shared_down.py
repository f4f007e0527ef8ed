"""kohya's default LoRA on a fused SAI/BFL Linear (``qkv``, ``linear1``): one ``down`` shared by the
diffusers members, each adding its rows of ``up``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .dropout import lora_input, scaled_hidden
from .lora import LoraVariant, _add_up_bias
from .members import MemberHooks, member_input_width


class SharedDownLora(MemberHooks, Adapter):
    """kohya's default LoRA on a fused SAI/BFL Linear, trained on the diffusers modules it stacks.

    SD3's and Flux's checkpoints compute q, k and v (Flux's single blocks: and the MLP input) with
    one ``qkv``/``linear1`` Linear, and kohya's ``lora_sd3``/``lora_flux`` put *one* LoRA on it by
    default: ``down [r, in]``, ``up [Σ rows, r]``, ``alpha``. diffusers splits that Linear into
    ``to_q``, ``to_k``, ``to_v`` (``proj_mlp``), which read the same input, so the same LoRA is one
    ``down`` shared by those members and, per member, its rows of ``up``:
    ``ΔW_member = up[rows] @ down · alpha/r``. Trained that way it has kohya's parameter count
    and init (down kaiming-uniform, up zeros), and its ``state_dict`` *is* kohya's fused module
    (``lora_down.weight``, ``lora_up.weight``, ``alpha`` under the kohya name).

    Each member's forward hook adds its rows of ``up(down(x))``. The hidden state ``down(x)`` is
    computed once per input and reused by the other members called with the very same tensor
    (diffusers' attention processors pass one tensor to ``to_q``, ``to_k`` and ``to_v``), so the
    group costs one ``down`` as kohya's module does, and dropout, rank dropout and module dropout
    are drawn once for the whole group, exactly as on kohya's fused module.
    """

    variant = LoraVariant
    algo = "lora"
    lora_down: nn.Linear
    lora_up: nn.Linear
    bases: tuple[nn.Module, ...]

    def __init__(
        self,
        name: str,
        members: Sequence[tuple[str, nn.Module]],
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        lora_bias: bool = False,
        input_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not members:
            raise ValueError(f"{name}: a shared-down LoRA needs at least one member")
        layers = [layer for _, layer in members]
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            raise TypeError(f"{name}: a shared-down LoRA needs Linear members")
        width = member_input_width(name, layers)
        super().__init__(name, layers[0], rank, alpha, multiplier=multiplier, module_dropout=module_dropout)
        self._init_members([path for path, _ in members], layers)
        self.lora_down = nn.Linear(width, rank, bias=False, dtype=dtype)
        self.lora_up = nn.Linear(rank, self.rows[-1][1], bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        #: PEFT's ``lora_dropout`` on the input (``--lora-input-dropout``): drawn once per input in :meth:`_hidden`,
        #: so the members share one mask, as PEFT's one module on a fused ``to_qkv`` draws one
        self.input_dropout = input_dropout
        #: ``--lora-bias``: the fused module's ``lora_up`` bias (BFL's ``lora_B.bias`` of a ``qkv``/``linear1``),
        #: each member adding its rows, from zero as PEFT's ``lora_bias``
        self.up_bias: nn.Parameter | None = None
        if lora_bias:
            self.up_bias = _add_up_bias(self, self.rows[-1][1], self.lora_up.weight)

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        """``s · lora_up.bias`` over the fused rows (``None`` without ``--lora-bias``)."""
        if self.up_bias is None:
            return None
        bias = self.up_bias.detach() if detach else self.up_bias
        return bias.float() * self._scale

    def _bias_term(self, out: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``out`` plus ``m · s · bias[lo:hi]`` (per-sample strengths too), as :meth:`LoraAdapter._with_bias`."""
        change = self.bias_change(detach=False)
        if change is None:
            return out
        term = (change[lo:hi] * self.multiplier).to(out.dtype)
        factor = self.sample_factor(out)
        return out + (term if factor is None else term * factor)

    @property
    def out_features(self) -> int:
        return self.rows[-1][1]

    def _factorised(self) -> bool:
        return True  # always up(down(x)): freezing precomputes nothing

    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        """The fused module's change ``[Σ rows, in]`` (members' rows stacked in kohya's order)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if detach:
            up, down = up.detach(), down.detach()
        return (up.float() @ down.float()) * self._scale

    def member_deltas(self) -> dict[str, torch.Tensor]:
        """Each member's change (its rows of :meth:`delta_weight`), by module path."""
        delta = self.delta_weight()
        return {path: delta[lo:hi] for path, (lo, hi) in zip(self.paths, self.rows, strict=True)}

    # --- hooks -----------------------------------------------------------------------------------
    def _hidden(self, x: torch.Tensor) -> torch.Tensor | None:
        """``m · s · down(x)`` after the dropouts, shared by the members called with this ``x``
        (``None``: module dropout skips the group for this input; :meth:`MemberHooks._shared`)."""

        def compute() -> torch.Tensor | None:
            if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
                return None
            inputs = lora_input(self._input(x, self.lora_down.weight.dtype), self.training, self.input_dropout)
            hidden = self.lora_down(inputs)
            scale: float | torch.Tensor = self._scale * self.multiplier
            factor = self.sample_factor(hidden)
            if factor is not None:
                scale = factor * scale
            return scaled_hidden(hidden, scale, self.training, self.dropout, self.rank_dropout)

        key = (self.lora_down.weight._version, self.training, torch.is_grad_enabled(), self.multiplier,
               id(self.sample_strength))  # fmt: skip
        return self._shared(x, key, compute)

    def _member_hook(self, i: int, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0:
            return output
        hidden = self._hidden(args[0])
        if hidden is None:
            return output
        lo, hi = self.rows[i]
        out = output + nn.functional.linear(hidden, self.lora_up.weight[lo:hi]).to(output.dtype)
        if self.ggpo is not None and self.training:  # kohya's GGPO noise: this member's rows of the fused one
            noise = self.ggpo.output(args[0], module, self.lora_up.weight.dtype, (lo, hi))
            if noise is not None:
                out = out + noise.to(out.dtype)
        return self._bias_term(out, lo, hi)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The fused module's output increment ``[..., Σ rows]`` for input ``x``."""
        hidden = self.lora_down(self._input(x, self.lora_down.weight.dtype))
        scale: float | torch.Tensor = self._scale * self.multiplier
        factor = self.sample_factor(hidden)
        if factor is not None:
            scale = factor * scale
        return self._bias_term(self.lora_up(scaled_hidden(hidden, scale, False, None, None)), 0, self.out_features)
