"""kohya's DyLoRA: a LoRA trained a random slice of ranks at a time, so its leading ranks work alone
(files are plain LoRA)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .lora import LoraVariant


class DyLoraAdapter(Adapter):
    """kohya's DyLoRA (``networks.dylora``): a LoRA trained so that its leading ranks work alone.

    The rank ``r`` is kept as ``r`` rows of ``lora_down`` and ``r`` columns of ``lora_up``, each its
    own parameter (as kohya's ``lora_A``/``lora_B`` parameter lists), so an optimizer only ever sees
    the rows a step trained (a row without a gradient gets no update, no weight decay and no Adam
    step, exactly as in kohya). At each training forward a slice start ``b`` is drawn uniformly from
    ``{0, unit, 2·unit, ..., r - unit}`` and the forward is (kohya's rule)::

        y = W x + (alpha / r) · sqrt(r / (b + unit)) · up(down(x))

    with the *whole* ``up``/``down``; only rows/columns ``b .. b + unit - 1`` get gradients. (LyCORIS'
    ``algo=dylora`` is another rule: it truncates to the first blocks and scales by alpha/blocks.)
    Out of training (sampling, applying) the factor is 1: the module is a plain rank-``r`` LoRA,
    which is what its file holds (``lora_down.weight``, ``lora_up.weight``, ``alpha``, as kohya
    saves it), and what every LoRA loader applies. ``b`` is drawn from torch's generator, so
    gradient checkpointing replays the same draw.

    kohya's training forward has no dropout and ignores the multiplier; here the multiplier (and
    per-sample strengths) scale the change as for every algorithm.
    """

    variant = LoraVariant
    algo = "dylora"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        unit: int = 1,
        multiplier: float = 1.0,
    ) -> None:
        if unit < 1 or rank % unit:
            raise ValueError(f"{name}: the DyLoRA rank {rank} must be a multiple of the unit {unit}")
        super().__init__(name, base, rank, alpha, multiplier=multiplier)
        self.unit = unit
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        out_dim, in_dim = int(weight.shape[0]), int(weight.shape[1])
        self._kernel = tuple(int(k) for k in weight.shape[2:]) if self.is_conv else ()
        spatial = self._kernel if self._kernel and self._kernel != (1, 1) else ()
        # kohya: every row kaiming-uniform(a=√5) on its own (fan-in = in·k·k, as a LoRA down's), ups zero
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(1, in_dim, *spatial, dtype=torch.float32)) for _ in range(rank)]
        )
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(out_dim, 1)) for _ in range(rank)])
        for row in self.lora_A:
            nn.init.kaiming_uniform_(row, a=math.sqrt(5))
        self._register_state_dict_hook(_dylora_file_keys)

    # --- the file layout ---------------------------------------------------------------------------
    def _down(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        down = torch.cat(tuple(rows), dim=0)
        return down[:, :, None, None] if self._kernel == (1, 1) else down

    def _up(self, cols: Sequence[torch.Tensor]) -> torch.Tensor:
        up = torch.cat(tuple(cols), dim=1)
        return up[:, :, None, None] if self._kernel else up

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self._down(list(self.lora_A)), "lora_up.weight": self._up(list(self.lora_B))}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        down = state_dict.pop(prefix + "lora_down.weight", None)
        up = state_dict.pop(prefix + "lora_up.weight", None)
        if down is not None and up is not None:
            down = down.reshape(self.rank, *self.lora_A[0].shape[1:])
            up = up.reshape(up.shape[0], self.rank)
            for i in range(self.rank):
                state_dict[f"{prefix}lora_A.{i}"] = down[i : i + 1]
                state_dict[f"{prefix}lora_B.{i}"] = up[:, i : i + 1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- the forward -------------------------------------------------------------------------------
    def draw(self) -> int:
        """The first row of the slice one training forward trains (a multiple of the unit)."""
        return int(torch.randint(0, self.rank // self.unit, ())) * self.unit

    def delta(self, x: torch.Tensor, b: int | None = None) -> torch.Tensor:
        """The output increment; while training, for slice start ``b`` (drawn when ``None``)."""
        if self._frozen is not None:
            return super().delta(x)
        factor = 1.0
        if self.training:
            b = self.draw() if b is None else b
            keep = range(b, b + self.unit)
            rows = [p if i in keep else p.detach() for i, p in enumerate(self.lora_A)]
            cols = [p if i in keep else p.detach() for i, p in enumerate(self.lora_B)]
            factor = math.sqrt(self.rank / (b + self.unit))
        else:
            rows, cols = list(self.lora_A), list(self.lora_B)
        down, up = self._down(rows), self._up(cols)
        x = self._input(x, down.dtype)
        if self.is_conv:
            conv: Any = self.base
            hidden = nn.functional.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation)
            out = nn.functional.conv2d(hidden, up)
        else:
            out = nn.functional.linear(nn.functional.linear(x, down), up)
        out = out * (self._scale * factor * self.multiplier)
        strength = self.sample_factor(out)
        return out if strength is None else out * strength


def _dylora_file_keys(module: DyLoraAdapter, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the per-row parameters become the file's ``lora_down``/``lora_up`` (kohya's layout)."""
    for i in range(module.rank):
        state.pop(f"{prefix}lora_A.{i}", None)
        state.pop(f"{prefix}lora_B.{i}", None)
    with torch.no_grad():
        for key, value in module.tensors().items():
            state[prefix + key] = value.detach()
