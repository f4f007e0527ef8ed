"""kohya's LoRA-GGPO (Gradient-Guided Perturbation Optimization, sd-scripts ``networks/lora_flux.py``,
network_args ``ggpo_sigma`` and ``ggpo_beta``): while training, each LoRA module adds random noise
through its layer, scaled per output row by how large that row's weight and gradient are, to push
training towards flatter minima.

For a layer ``W [out, in]`` with LoRA ``U = up [out, r]``, ``D = down [r, in]``, ``s = alpha / r``, the
training forward adds ``x @ P.T`` (no gradient through it), a fresh ``P = randn(out, in) * f`` each
forward, with the per-row factor ``f = (sigma · c + beta · g²) / sqrt(out)`` where, as kohya computes
them:

- ``c = sqrt(w̄² + ||(U @ D)_row||²)``: ``w̄`` the mean row norm of the layer's weight (kohya estimates it
  from at most 1000 random rows; sdcore takes every row, the value that sample estimates, with no random
  draw, so the run's other draws and an exact resume are unaffected), plus the row norms of ``U @ D``
  *without* ``s`` (kohya's ``module_weights.mul(self.scale)`` is not in place, so the scale is lost; kept
  so the noise matches a kohya run);
- ``g = ||s · (U @ ∇D + ∇U @ D)_row||``: the rows of the change's gradient to first order.

Both are taken once per optimizer step, after the gradients are final (accumulated, all-reduced,
clipped) and before the optimizer applies them (kohya's ``train_network.py`` calls
``update_grad_norms`` and ``update_norms`` there, on the sync step only), through the runtime's
:meth:`sdcore.train.method.TrainingMethod.before_optimizer_step`. So the first step has no noise
(no norms yet), as in kohya. kohya computes ``g`` under autocast (fp16 on CUDA); sdcore in fp32.

Row norms come from ``r x r`` Gram matrices (``||(U @ D)_i||² = u_i (D Dᵀ) u_iᵀ``) instead of the
``out x in`` products kohya forms: the same numbers to rounding, ``in / r`` times less work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .adapters import Adapter

#: kohya's names of the two options (network_args of ``networks.lora_flux``)
KOHYA_ARGS = ("ggpo_sigma", "ggpo_beta")


class Ggpo:
    """One module's GGPO state: ``sigma``, ``beta``, the layer's (fused: the stacked layers') output
    width, and the norms of the last update (plain attributes, never buffers: nothing reaches the file)."""

    def __init__(self, sigma: float, beta: float, out_features: int) -> None:
        self.sigma = float(sigma)
        self.beta = float(beta)
        self.norm_factor = 1.0 / math.sqrt(out_features)
        #: mean row norm of the base weight (computed at the first update, from the weights then trained on)
        self.base_norm: torch.Tensor | None = None
        #: kohya's ``combined_weight_norms`` ``[out, 1]`` and ``grad_norms`` ``[out, 1]`` (fp32)
        self.weight_norms: torch.Tensor | None = None
        self.grad_norms: torch.Tensor | None = None
        #: kohya's ``weight_norms`` ``[out, 1]``: the row norms of ``U @ D`` (no scale), for the logs only
        self.key_norms: torch.Tensor | None = None
        self._factor: torch.Tensor | None = None

    @property
    def factor(self) -> torch.Tensor | None:
        """The noise's per-row scale ``[out, 1]``, or ``None`` until both norms exist (no noise yet)."""
        if self._factor is None and self.weight_norms is not None and self.grad_norms is not None:
            scale = self.sigma * self.weight_norms + self.beta * self.grad_norms.square()
            self._factor = scale * self.norm_factor
        return self._factor

    def set_norms(self, weight_norms: torch.Tensor, grad_norms: torch.Tensor | None) -> None:
        self.weight_norms = weight_norms
        if grad_norms is not None:
            self.grad_norms = grad_norms
        self._factor = None

    def output(
        self, x: torch.Tensor, layer: nn.Module, dtype: torch.dtype, rows: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """``x @ P.T`` for the layer (its rows ``lo:hi`` of a fused module's noise), ``None`` before the norms
        exist. ``P`` is drawn in ``dtype`` (the LoRA weights', as kohya's), on the norms' device, from torch's
        generator."""
        factor = self.factor
        if factor is None:
            return None
        out_features, in_features = _layer_shape(layer)
        if rows is not None:
            factor = factor[rows[0] : rows[1]]
        with torch.no_grad():
            noise = torch.randn(out_features, in_features, dtype=dtype, device=factor.device)
            noise.mul_(factor)
            if not torch.is_autocast_enabled() and x.dtype != noise.dtype:
                noise = noise.to(x.dtype)
            if isinstance(layer, nn.Conv2d):  # a 1x1 conv: a Linear over the channels
                return nn.functional.conv2d(x, noise[:, :, None, None])
            return nn.functional.linear(x, noise)


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a Linear (a 1x1 conv: its channels) from its attributes: a packed base layer
    (``--base-weights-dtype nf4|int8``) dequantises its whole ``weight`` on every read."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0]), int(weight.shape[1])


def ggpo_problem(module: Adapter) -> str | None:
    """Why GGPO does not apply to ``module`` (``None`` when it does): kohya defines it for plain LoRA on
    Linear layers (lora_flux; a 1x1 conv is one over its channels)."""
    from .adapters import LoraAdapter, SharedDownLora

    if isinstance(module, SharedDownLora):
        return None
    if type(module) is not LoraAdapter:  # LoRA-FA, DyLoRA, LoHa ... (kohya: lora_flux's own module only)
        return f"GGPO is defined for plain LoRA modules, not {module.algo}"
    if module.is_dora or module.lora_mid is not None:
        return "GGPO is defined for plain LoRA modules (no DoRA, no Tucker core)"
    base = module.base
    if isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1):
        return "GGPO is defined for Linear layers (and 1x1 convs), not kxk convs"
    return None


def enable(modules: Iterable[Adapter], sigma: float, beta: float) -> None:
    """Give every module its GGPO state (``TypeError`` naming the first one it does not apply to)."""
    modules = list(modules)
    for module in modules:
        why = ggpo_problem(module)
        if why:
            raise TypeError(f"{module.lora_name}: {why}")
    for module in modules:
        module.ggpo = Ggpo(sigma, beta, int(_factors(module)[0].shape[0]))


def _weights(module: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The live ``lora_up``/``lora_down`` weights (LoraAdapter / SharedDownLora: :func:`ggpo_problem`)."""
    factored: Any = module
    return factored.lora_up.weight, factored.lora_down.weight


def _factors(module: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``up [out, r]`` and ``down [r, in]`` (a 1x1 conv's kernels flattened)."""
    up, down = _weights(module)
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def _base_weights(module: Adapter) -> Sequence[torch.Tensor]:
    bases = getattr(module, "bases", None)  # a fused (shared-down) module: its members' layers, in row order
    layers = bases if bases is not None else (module.base,)
    return [layer.weight for layer in layers]


@torch.no_grad()
def mean_row_norm(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean L2 norm of the rows of the weights stacked (what kohya's ``initialize_norm_cache`` samples),
    fp32, a few thousand rows at a time so a large fp16/fp8 layer is never copied whole to fp32."""
    total, rows = None, 0
    for weight in weights:
        flat = weight.reshape(weight.shape[0], -1)
        for start in range(0, flat.shape[0], 4096):
            part = torch.linalg.vector_norm(flat[start : start + 4096].float(), dim=1).sum()
            total = part if total is None else total + part
        rows += int(flat.shape[0])
    assert total is not None
    return total / rows


def _row_norms(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The row norms ``[out, 1]`` of ``left @ right`` from the Gram matrix of ``right`` (fp32)."""
    gram = right @ right.T
    return ((left @ gram) * left).sum(dim=1, keepdim=True).clamp(min=0.0).sqrt()


@torch.no_grad()
def update(modules: Iterable[Adapter]) -> None:
    """kohya's ``update_grad_norms`` then ``update_norms`` on every module with GGPO state, in training mode
    (kohya skips modules in eval mode: a stopped text encoder's). A module without both gradients keeps its
    old gradient norms, as kohya's does. When some gradient norm is not finite (an fp16 step the grad scaler
    is about to skip) every module keeps its old gradient norms: kohya would take them, and the noise after
    would be inf/NaN."""
    todo = [m for m in modules if m.ggpo is not None and m.training]
    results: list[tuple[Adapter, torch.Tensor, torch.Tensor | None]] = []
    for module in todo:
        state = module.ggpo
        assert state is not None
        up, down = (t.detach().float() for t in _factors(module))
        if state.base_norm is None:
            state.base_norm = mean_row_norm(_base_weights(module)).to(up.device)
        grad_up, grad_down = (t.grad for t in _weights(module))
        grads = None
        if grad_up is not None and grad_down is not None:
            gu = grad_up.detach().float().reshape(up.shape)
            gd = grad_down.detach().float().reshape(down.shape)
            # s · (U @ ∇D + ∇U @ D) = s · [U, ∇U] @ [∇D; D]
            grads = _row_norms(torch.cat([up, gu], dim=1), torch.cat([gd, down], dim=0)) * module.scale
        change = _row_norms(up, down)  # kohya: U @ D without the scale (see the module docstring)
        weights = (state.base_norm.square() + change.square()).sqrt()
        state.key_norms = change
        results.append((module, weights, grads))
    fresh = [g for _, _, g in results if g is not None]
    finite = not fresh or bool(torch.stack([g.isfinite().all() for g in fresh]).all())
    for module, weights, grads in results:
        assert module.ggpo is not None
        module.ggpo.set_norms(weights, grads if finite else None)


#: kohya's log names (train_network.py ``generate_step_logs``: ``norm/<name>``) -> the Ggpo attribute averaged
LOG_NORMS = {"avg_key_norm": "key_norms", "avg_grad_norm": "grad_norms", "avg_combined_norm": "weight_norms"}


@torch.no_grad()
def log_values(modules: Iterable[Adapter]) -> dict[str, float]:
    """kohya's per-step GGPO logs (train_network.py L1470-1476 with lora_flux.py's ``weight_norms`` /
    ``grad_norms`` / ``combined_weight_norms``): for each of the three norms, the mean over the modules that
    have it of the module's mean over its output rows, as of the last :func:`update` (this step's, before the
    optimizer applied it). A norm no module has yet is left out, as kohya logs nothing for ``None``."""
    states = [m.ggpo for m in modules if m.ggpo is not None]
    out: dict[str, float] = {}
    for name, attribute in LOG_NORMS.items():
        means = [norms.mean() for state in states if (norms := getattr(state, attribute)) is not None]
        if means:
            out[name] = float(torch.stack([m.to(means[0].device) for m in means]).mean())
    return out


def state_dict(modules: Iterable[Adapter], suffix: str) -> dict[str, torch.Tensor]:
    """The norms of the last update by ``<module>.<suffix>_weight_norms`` / ``_grad_norms`` (for an exact
    resume: a resumed run's first step has the noise the unbroken run had)."""
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        state = module.ggpo
        if state is None:
            continue
        if state.weight_norms is not None:
            out[f"{module.lora_name}.{suffix}_weight_norms"] = state.weight_norms.detach().cpu().clone()
        if state.grad_norms is not None:
            out[f"{module.lora_name}.{suffix}_grad_norms"] = state.grad_norms.detach().cpu().clone()
    return out


def load_state_dict(modules: dict[str, Adapter], state: dict[str, torch.Tensor], suffix: str) -> None:
    """Put back what :func:`state_dict` saved (entries of modules without GGPO state are ignored)."""
    for name, module in modules.items():
        if module.ggpo is None:
            continue
        device = _weights(module)[0].device
        weights, grads = (state.get(f"{name}.{suffix}_{kind}_norms") for kind in ("weight", "grad"))
        module.ggpo.weight_norms = None if weights is None else weights.to(device)
        module.ggpo.grad_norms = None if grads is None else grads.to(device)
        module.ggpo._factor = None


__all__ = ["KOHYA_ARGS", "LOG_NORMS", "Ggpo", "enable", "ggpo_problem", "load_state_dict", "log_values", "mean_row_norm",
           "state_dict", "update"]  # fmt: skip
