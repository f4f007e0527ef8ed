"""The adapter base class: what every adapted layer shares (base reference, scale, multiplier, forward
hook, merge/unmerge, reading a file module's tensors)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..ggpo import Ggpo
from .change_cache import ChangeCache
from .dora import Dora
from .dropout import rank_dropout_mask
from .maths import Tensors
from .variant import Variant


def _bake_scalar_hook(module: Adapter, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the file holds ``scalar_key · scalar`` (LyCORIS' ``custom_state_dict``)."""
    if module.scalar != 1.0 and module._bake_scalar and module.scalar_key:
        key = prefix + module.scalar_key
        state[key] = state[key] * module.scalar


class Adapter(nn.Module):
    """What every adapted layer shares: the base reference, scale, multiplier, hook, merge.

    ``state_dict()`` is the module's part of the file (``alpha`` plus the variant's tensors and
    ``dora_scale``). The base layer is a plain reference, never a submodule, so the base model's
    ``state_dict`` keeps its names and no base weight is saved.
    """

    variant: ClassVar[type[Variant]]
    algo: ClassVar[str]
    #: the tensor LyCORIS bakes its ``scalar`` into when saving (``""``: the module has no scalar)
    scalar_key: ClassVar[str] = ""
    base: Any
    alpha: torch.Tensor
    dora_scale: nn.Parameter | None
    #: dropout probability of whole output rows of ``ΔW`` while training (see :meth:`delta`)
    rank_dropout: float | None = None
    #: LyCORIS ``rank_dropout_scale``: the rank-dropout mask is divided by its mean (:func:`rank_dropout_mask`)
    rank_dropout_scale: bool = False
    #: per-sample strengths ``[B]`` of the batch being trained (kohya's per-dataset
    #: ``network_multiplier``), set by :meth:`sdplugin_lora.network.LoraNetwork.sample_strengths`;
    #: ``None`` (the usual case) leaves the forward exactly as it is without them
    sample_strength: torch.Tensor | None = None
    #: the change cache of a sampling/validation pass (:meth:`sdplugin_lora.network.LoraNetwork.cached_changes`)
    _change_cache: ChangeCache | None = None
    #: kohya's LoRA-GGPO state (:mod:`sdplugin_lora.ggpo`, plain LoRA only); ``None``: off, no cost
    ggpo: Ggpo | None = None

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name}: LoRA needs a Linear or Conv2d, got {type(base).__name__}")
        self.lora_name = name
        object.__setattr__(self, "base", base)
        self.rank = rank
        if alpha is None or alpha == 0:
            alpha = float(rank)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._scale = float(alpha) / rank if rank else 1.0  # a Python float: no device sync per forward
        #: LyCORIS' per-module ``scalar``: 1 unless max-norm regularisation rescaled the module
        #: (LoHa, DoRA, Tucker LoCon). It multiplies the change in the forward and is baked into
        #: :attr:`scalar_key` in ``state_dict()`` (what files hold), as LyCORIS' ``custom_state_dict``
        #: does; loading a state resets it to 1, as LyCORIS does.
        self.scalar = 1.0
        self._bake_scalar = True
        self._register_state_dict_hook(_bake_scalar_hook)
        self.multiplier = multiplier
        self.module_dropout = module_dropout
        self._handle: Any = None
        self._frozen: torch.Tensor | None = None
        self.dora_scale = nn.Parameter(Dora.magnitude(base.weight)) if dora else None  # type: ignore[arg-type]

    # --- identity --------------------------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None

    @property
    def is_tucker(self) -> bool:
        return self.variant.is_tucker(self.tensors())

    @property
    def scale(self) -> float:
        return self._scale

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.rank:
            self._scale = float(self.alpha) / self.rank
        self.scalar = 1.0
        self._frozen = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The variant's tensors by file name (``lora_down.weight``, ``hada_w1_a``...), live."""
        return {key: value for key, value in self.named_parameters() if key != "dora_scale"}

    # --- the update ------------------------------------------------------------------------------
    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        """The change of the base weight at multiplier 1, in fp32 (DoRA: ``W' - W``)."""
        return self._change(detach=detach)

    def _change(self, *, detach: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`delta_weight`, with ``rows`` a 0/1 mask over the output rows of the scaled ``ΔW``
        (LyCORIS' rank dropout), applied before DoRA's decomposition as LyCORIS does."""
        t = self.tensors()
        if detach:
            t = {key: value.detach() for key, value in t.items()}
        shape = tuple(self.base.weight.shape)
        delta = self.variant.weight(t, shape, self.base.weight) * (self._scale * self.scalar)
        if rows is not None:
            delta = delta * rows.to(delta.device).reshape(-1, *[1] * (delta.dim() - 1))
        if self.dora_scale is not None:
            base = self.base.weight.detach().float()
            magnitude = self.dora_scale.detach() if detach else self.dora_scale
            return Dora.apply(base, delta, magnitude) - base
        return delta

    def sample_factor(self, t: torch.Tensor) -> torch.Tensor | None:
        """:attr:`sample_strength` shaped ``[N, 1, ...]`` to scale ``t`` (batch first) per sample, in
        ``t``'s dtype, or ``None`` without strengths.

        ``N`` may be a multiple ``k·B`` of the batch: the text encoders see each prompt's 77-token
        chunks as ``k`` consecutive rows (``[B, k, 77]`` reshaped), so each strength repeats ``k`` times."""
        strength = self.sample_strength
        if strength is None:
            return None
        rows, batch = int(t.shape[0]), int(strength.shape[0])
        if rows != batch:
            if rows % batch:
                raise RuntimeError(f"{self.lora_name}: {batch} per-sample strengths do not fit an input of {rows} rows")
            strength = strength.repeat_interleave(rows // batch)
        return strength.to(device=t.device, dtype=t.dtype).reshape(rows, *[1] * (t.dim() - 1))

    def _input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not torch.is_autocast_enabled() and x.dtype != dtype:
            return x.to(dtype)
        return x

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's op (stride, padding...) with another weight and no bias."""
        x = self._input(x, weight.dtype)
        base = self.base
        if isinstance(base, nn.Conv2d):
            return nn.functional.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)  # type: ignore[arg-type]
        return nn.functional.linear(x, weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The output increment for input ``x`` (multiplier applied; per-sample strengths too).

        While training with ``rank_dropout`` p, LyCORIS' rank dropout of the weight-rebuilding
        algorithms (LoHa, LoKr, DoRA): each output row of ``ΔW`` is dropped with probability p, one
        draw per forward for the whole batch, not rescaled unless :attr:`rank_dropout_scale` (then
        divided by the mask's mean, as LyCORIS' ``rank_dropout_scale=True``).

        The increment is linear in the multiplier for every algorithm (DoRA and OFT too: the multiplier
        scales ``W' - W``), so sample ``b`` at strength ``s_b`` is the increment times ``s_b``."""
        cached = self._cached_weight() if self._frozen is None else self._frozen
        if cached is not None:
            out = self._apply_weight(x, cached.to(device=x.device))
        else:
            rows = None
            if self.training and self.rank_dropout:
                rows = rank_dropout_mask(int(self.base.weight.shape[0]), self.rank_dropout, self.rank_dropout_scale)
            out = self._apply_weight(x, self._change(detach=False, rows=rows) * self.multiplier)
        factor = self.sample_factor(out)
        return out if factor is None else out * factor

    # --- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.base.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0:
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        return output + self.delta(args[0]).to(output.dtype)

    def freeze(self) -> Adapter:
        """For applying a file: no gradients, eval mode, and the weight update computed once
        (fp32) unless the factorised forward is cheaper (plain LoRA)."""
        self.requires_grad_(False)
        self.eval()
        if not self._factorised():
            self._frozen = self.delta_weight() * self.multiplier
        return self

    def _factorised(self) -> bool:
        return False

    def _cached_weight(self) -> torch.Tensor | None:
        """``m · ΔW`` from the :class:`ChangeCache` the adapter is in (:meth:`LoraNetwork.cached_changes`),
        or ``None``: no cache, or a forward that must rebuild the change (gradients enabled, or rank
        dropout while training: a new mask each forward)."""
        cache = self._change_cache
        if cache is None or torch.is_grad_enabled() or (self.training and self.rank_dropout):
            return None
        return cache.weight(self)

    def _cache_key(self) -> tuple[Any, ...]:
        """What :meth:`_change` · multiplier depends on: the multiplier and scales, the autocast state (it
        changes the precision of the rebuild's matmuls), and every tensor read (the variant's,
        ``dora_scale``, the base weight) by storage and version counter, so an in-place update (an
        optimizer step, EMA weights swapped in, a ``load_state_dict``) or a move shows."""
        weights = self._layer_weights()
        tensors = [*self.tensors().values(), *weights]
        if self.dora_scale is not None:
            tensors.append(self.dora_scale)
        stamps = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)
        kind = weights[0].device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return (self.multiplier, self._scale, self.scalar, autocast, *stamps)

    def _layer_weights(self) -> list[torch.Tensor]:
        """The weights of the layers the module adapts (the first one's device decides the autocast state)."""
        return [self.base.weight]  # type: ignore[list-item]

    # --- merge / unmerge -------------------------------------------------------------------------
    def merge(self, multiplier: float | None = None) -> torch.Tensor:
        """Add ``m · ΔW`` to the base weight (fp32 maths, then cast); returns the previous weight
        (on CPU) for :meth:`unmerge`, which restores it bit for bit."""
        m = self.multiplier if multiplier is None else multiplier
        param = self.base.weight
        backup = param.detach().to("cpu", copy=True)
        delta = self.delta_weight().to(param.device)
        with torch.no_grad():
            param.copy_((param.detach().float() + delta * m).to(param.dtype))
        self._merge_bias(m)
        return backup

    def unmerge(self, backup: torch.Tensor) -> None:
        with torch.no_grad():
            self.base.weight.copy_(backup.to(self.base.weight.device))
        self._unmerge_bias()

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        """The change of the layer's bias at multiplier 1, in fp32 (``None``: the module changes no bias)."""
        return None

    def _merge_bias(self, m: float) -> None:
        """``bias + m · bias_change`` (LyCORIS ``full``'s ``diff_b``, ``train_norm``'s ``b_norm``), backed up
        for :meth:`unmerge`."""
        change = self.bias_change()
        if change is None:
            return
        bias = self.base.bias
        if bias is None:
            raise ValueError(f"{self.lora_name}: the module changes a bias but the layer has none")
        self._bias_backup = bias.detach().to("cpu", copy=True)
        with torch.no_grad():
            bias.copy_((bias.detach().float() + change.to(bias.device) * m).to(bias.dtype))

    def _unmerge_bias(self) -> None:
        backup = getattr(self, "_bias_backup", None)
        if backup is not None:
            with torch.no_grad():
                self.base.bias.copy_(backup.to(self.base.bias.device))
            self._bias_backup = None

    # --- files -----------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        """An adapter holding a file module's tensors (fp32 copies) on ``base``."""
        variant = cls.variant
        adapter = cls.__new__(cls)
        Adapter.__init__(adapter, name, base, variant.rank(t), variant.alpha(t), multiplier=multiplier)
        adapter._scale = variant.scale(t)
        for key in variant.keys:
            if key in t:
                adapter.register_parameter(key, nn.Parameter(t[key].detach().float().clone()))
        if "dora_scale" in t:
            adapter.dora_scale = nn.Parameter(t["dora_scale"].detach().float().clone())
        return adapter


def _no_alpha(adapter: Adapter) -> None:
    """LyCORIS' ``ia3`` and ``full`` modules store no alpha: keep it out of the ``state_dict``."""
    adapter.register_buffer("alpha", torch.tensor(1.0), persistent=False)
    adapter._scale = 1.0
