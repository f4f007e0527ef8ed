"""A set of adapters attached to a frozen model by forward hooks (what training builds).

The base model is never copied or renamed: each adapter (:mod:`sdplugin_lora.adapters`) keeps a
reference to its Linear/Conv2d and a forward hook adds its update to that layer's output
(kohya's ``y = W x + m * s * up(down(x))`` for LoRA). The base ``state_dict`` keeps its names, the
adapter parameters stay fp32 while the base may be fp16/bf16, and :meth:`LoraNetwork.remove` takes
every hook off again. The network's own ``state_dict`` is already the kohya/LyCORIS file layout
(``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import (
    FUSED_ADAPTERS,
    TRAINING_ADAPTERS,
    Adapter,
    ChangeCache,
    DiagOftAdapter,
    DyLoraAdapter,
    LohaAdapter,
    LokrAdapter,
    LoraAdapter,
    LoraFaAdapter,
    NormAdapter,
    OftAdapter,
    SharedDownLora,
    fused_adapter,
)
from .algos import ALGOS
from .naming import Target

#: kohya networks.oft's module-name prefix
OFT_PREFIX = "oft_unet"

#: per-target (rank, alpha) override, e.g. from kohya's block_dims; ``None`` keeps the default
RankFor = Callable[[Target], "tuple[int, float | None] | None"]
#: a fused SAI/BFL module trained with one shared down: (kohya name, its diffusers targets in row order)
SharedGroup = tuple[str, Sequence[Target]]


class LoraNetwork(nn.Module):
    """A set of hooked modules keyed by kohya name; ``state_dict`` is the file layout."""

    def __init__(self, modules: Iterable[Adapter] = ()) -> None:
        super().__init__()
        for module in modules:  # registered directly so state_dict keys are "<kohya name>.lora_down.weight"
            self.add_module(module.lora_name, module)

    @property
    def loras(self) -> dict[str, Adapter]:
        return {name: module for name, module in self.named_children() if isinstance(module, Adapter)}

    @classmethod
    def create(
        cls,
        targets: Iterable[Target],
        *,
        rank: int,
        alpha: float | None = None,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        multiplier: float = 1.0,
        algo: str = "lora",
        lokr_factor: int = -1,
        dylora_unit: int = 1,
        use_tucker: bool = False,
        rank_for: RankFor | None = None,
        shared_down: Iterable[SharedGroup] = (),
        swapped: Mapping[str, Sequence[bool]] | None = None,
        decompose_both: bool = False,
        rank_dropout_scale: bool = False,
        norms: Iterable[Target] = (),
        constraint: float = 0.0,
        rescaled: bool = False,
        lora_bias: bool = False,
        input_dropout: float | None = None,
    ) -> LoraNetwork:
        """kohya's rule: Linear and 1x1 conv get ``rank``/``alpha``; kxk convs ``conv_rank``/``conv_alpha``
        (skipped when no conv rank). ``algo`` picks the adapter (:data:`sdplugin_lora.algos.ALGOS`);
        ``use_tucker`` gives kxk convs LyCORIS' Tucker core; ``rank_for`` may override (rank, alpha)
        per target (kohya block dims; rank 0 leaves the target out). ``dylora_unit`` is kohya
        ``networks.dylora``'s ``unit`` (rows trained per step).

        ``shared_down`` (SD3/Flux, plain LoRA only): groups of targets that one fused SAI/BFL Linear
        computes (q/k/v, Flux's ``linear1``) get one :class:`SharedDownLora` named by kohya, as
        kohya's ``lora_sd3``/``lora_flux`` train them unless ``split_qkv``; the rank is the first
        member's. With ``--algo loha``/``lokr`` each group is one LyCORIS module over the fused weight
        instead (:class:`sdplugin_lora.adapters.FusedMixin`, what ``lycoris.kohya`` trains on kohya's model);
        ``swapped`` (kohya name -> per member) marks members whose halves SAI/BFL order otherwise.

        LyCORIS options: ``decompose_both`` (LoKr: ``w1`` low-rank too), ``rank_dropout_scale`` (the
        rank-dropout mask divided by its mean) and ``norms`` (``train_norm``: a :class:`NormAdapter`
        on each of these GroupNorm/LayerNorm targets, ``ModuleIndex.select_norms``); ``constraint`` and
        ``rescaled`` (diag-oft, BOFT). A layer BOFT cannot split is a ``ConfigError`` naming every one.
        ``lora_bias`` (plain LoRA only) gives every module a ``lora_up`` bias trained from zero (PEFT's
        ``lora_bias``, ``--lora-bias``); ``input_dropout`` (plain LoRA only) is PEFT's ``lora_dropout`` on the
        LoRA's input (``--lora-input-dropout``, :func:`sdplugin_lora.adapters.lora_input`).

        LyCORIS ``ia3`` and ``full`` have no rank: ``rank``/``conv_rank`` only say which targets get a
        module (a kxk conv needs a conv rank, as LyCORIS' ``conv_dim``)."""
        if algo not in ALGOS:
            raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
        adapter_cls = TRAINING_ADAPTERS[algo]
        targets = list(targets)
        groups = [(name, list(members)) for name, members in shared_down]
        if groups and algo not in ("lora", "locon", *FUSED_ADAPTERS):
            raise ValueError(f"a fused SAI/BFL module trains as plain LoRA, LoHa or LoKr, not --algo {algo}")
        grouped = {target.name for _, members in groups for target in members}
        modules: list[Adapter] = []
        unsplit: list[str] = []
        for name, members in groups:
            r, a = rank, alpha
            if rank_for is not None:
                override = rank_for(members[0])
                if override is not None:
                    r, a = override
            if not r:
                continue
            if algo in FUSED_ADAPTERS:
                swaps = (swapped or {}).get(name) or [False] * len(members)
                options: dict[str, Any] = {"multiplier": multiplier, "module_dropout": module_dropout,
                                           "rank_dropout": rank_dropout, "tucker": use_tucker,
                                           "rank_dropout_scale": rank_dropout_scale}  # fmt: skip
                if algo == "lokr":
                    options.update(factor=lokr_factor, decompose_both=decompose_both)
                parts = [(t.path, t.module, bool(swap)) for t, swap in zip(members, swaps, strict=True)]
                modules.append(fused_adapter(algo, name, parts, r, a, **options))
                continue
            modules.append(
                SharedDownLora(
                    name,
                    [(t.path, t.module) for t in members],
                    r,
                    a,
                    multiplier=multiplier,
                    dropout=dropout,
                    rank_dropout=rank_dropout,
                    module_dropout=module_dropout,
                    lora_bias=lora_bias,
                    input_dropout=input_dropout,
                )
            )
        for target in targets:
            if target.name in grouped:
                continue
            if algo == "oft":  # kohya networks.oft: UNet Linear/1x1 layers, named oft_unet_...
                if target.is_text_encoder or target.is_conv3x3:
                    continue
                # SD3/Flux modules keep their lora_transformer_ names: oft_flux's are written at save (dit.py)
                name = OFT_PREFIX + target.name[len("lora_unet") :] if target.component == "unet" else target.name
                try:
                    modules.append(
                        OftAdapter(
                            name, target.module, rank, alpha, multiplier=multiplier, module_dropout=module_dropout
                        )
                    )
                except ValueError as exc:
                    from sdcore.errors import ConfigError

                    raise ConfigError(f"--algo oft --rank {rank}: {exc}") from None
                continue
            if target.is_conv3x3:
                r, a = conv_rank or 0, conv_alpha
            else:
                r, a = rank, alpha
            if rank_for is not None:
                override = rank_for(target)
                if override is not None:
                    r, a = override
            if not r:
                continue
            if adapter_cls is DyLoraAdapter:  # kohya networks.dylora: no dropouts
                try:
                    modules.append(
                        DyLoraAdapter(target.name, target.module, r, a, unit=dylora_unit, multiplier=multiplier)
                    )
                except ValueError as exc:
                    from sdcore.errors import ConfigError

                    raise ConfigError(f"--algo dylora: {exc}") from None
                continue
            common: dict[str, Any] = {"multiplier": multiplier, "module_dropout": module_dropout}
            if issubclass(adapter_cls, DiagOftAdapter):  # LyCORIS diag-oft / BOFT: rank = lora_dim
                try:
                    modules.append(
                        adapter_cls(target.name, target.module, r, constraint=constraint, rescaled=rescaled, **common)
                    )
                except ValueError as exc:
                    unsplit.append(f"{target.name} ({exc})")
                continue
            if adapter_cls is LoraFaAdapter:
                common.update(dropout=dropout, rank_dropout=rank_dropout)
            elif adapter_cls is LoraAdapter:
                common.update(dropout=dropout, rank_dropout=rank_dropout, dora=algo == "dora", tucker=use_tucker)
                common.update(rank_dropout_scale=rank_dropout_scale, lora_bias=lora_bias, input_dropout=input_dropout)
            elif algo in ("ia3", "glora", "full"):  # LyCORIS: module dropout only (see their adapters)
                pass
            elif algo == "lokr":
                common.update(factor=lokr_factor, tucker=use_tucker, rank_dropout=rank_dropout)
                common.update(decompose_both=decompose_both, rank_dropout_scale=rank_dropout_scale)
            else:
                common.update(tucker=use_tucker, rank_dropout=rank_dropout, rank_dropout_scale=rank_dropout_scale)
            modules.append(adapter_cls(target.name, target.module, r, a, **common))
        if unsplit:
            from sdcore.errors import ConfigError

            raise ConfigError(
                f"--algo {algo} --rank {rank}: {len(unsplit)} layers cannot be split: {'; '.join(unsplit)}"
            )
        for target in norms:  # LyCORIS passes the network's rank and module dropout to its NormModules
            modules.append(
                NormAdapter(
                    target.name,
                    target.module,
                    multiplier=multiplier,
                    module_dropout=module_dropout,
                    rank_dropout=rank_dropout,
                )
            )
        return cls(modules)

    def __iter__(self):  # type: ignore[override]
        return iter(self._modules_of())

    def __len__(self) -> int:
        return len(self.loras)

    def _modules_of(self) -> list[Adapter]:
        return [module for module in self.children() if isinstance(module, Adapter)]

    def attach(self) -> LoraNetwork:
        for module in self._modules_of():
            module.attach()
        return self

    def remove(self) -> None:
        """Take every hook off: the base model behaves exactly as before."""
        for module in self._modules_of():
            module.detach()

    @contextlib.contextmanager
    def sample_strengths(self, strengths: torch.Tensor | None) -> Iterator[None]:
        """Scale every module's change per sample inside the ``with`` block: sample ``b`` of the batch
        gets exactly the forward at multiplier ``multiplier · strengths[b]`` (kohya's per-dataset
        ``network_multiplier``, which kohya passes to ``set_multiplier`` for the batch). The previous
        strengths come back on exit, so nested blocks (the runtime's forward inside its backward
        scope) are fine."""
        modules = self._modules_of()
        previous = [module.sample_strength for module in modules]
        for module in modules:
            module.sample_strength = strengths
        try:
            yield
        finally:
            for module, old in zip(modules, previous, strict=True):
                module.sample_strength = old

    @contextlib.contextmanager
    def cached_changes(self, max_bytes: int | None = None) -> Iterator[ChangeCache]:
        """Inside the ``with`` block, every module that rebuilds its weight change each forward (all
        but plain LoRA/LoCon, DyLoRA, the shared-down LoRA and ``train_norm``, whose factorised forward
        is cheaper than a cached weight) computes it once and reuses it in every forward run under
        ``no_grad``: what sample images (one UNet forward per denoising step and guidance pass) and the
        validation loss cost is then the base op with the cached weight instead of the rebuild.

        Outputs are exactly those without the cache (:class:`ChangeCache`); forwards with gradients, or
        with rank dropout while training, rebuild as usual, so no gradient ever reaches a cached
        tensor. The cache is dropped on exit (training resumes on the parameters); nested blocks
        restore the outer cache. ``max_bytes``: the per-device budget (default: half of the memory
        free when the first change is built)."""
        cache = ChangeCache(max_bytes)
        modules = [module for module in self._modules_of() if not module._factorised()]
        previous = [module._change_cache for module in modules]
        for module in modules:
            module._change_cache = cache
        try:
            yield cache
        finally:
            for module, old in zip(modules, previous, strict=True):
                module._change_cache = old
            cache.clear()

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """Max-norm regularisation (kohya's ``--scale_weight_norms``), run after each optimizer step.

        For every module, ``n = ||ΔW||`` (Frobenius norm of its change at multiplier 1, ``alpha/rank``
        applied; a kxk conv's change is its composed kernel). Clamped below at ``max_norm / 2`` and
        above at ``max_norm``, it gives ``ratio = clamp(n) / max(n, max_norm / 2)``: 1 unless
        ``n > max_norm``, else ``max_norm / n``. A module with ``ratio != 1`` is rescaled so that its
        change ends at norm ``max_norm``:

        - LoRA/LoCon (kohya's ``networks.lora``/``lora_sd3``/``lora_flux``
          ``apply_max_norm_regularization``): ``lora_up`` and ``lora_down`` times ``sqrt(ratio)``;
        - LoKr (LyCORIS ``LokrModule.apply_max_norm``): each of its ``k`` factor tensors
          (``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a``/``_b`` and ``lokr_t2``) times ``ratio ** (1/k)``.
        - LoHa, DoRA and Tucker LoCon (LyCORIS ``apply_max_norm`` of ``LohaModule``/``LoConModule``):
          the module's ``scalar`` times ``ratio``; ``n`` is then the norm of ``scalar · ΔW`` before
          DoRA's decomposition, and the file gets the scalar baked into ``hada_w1_a``/``lora_up``.

        Returns ``(modules scaled, mean norm, max norm)``, the norms taken after scaling, as kohya
        logs them. Other modules raise (see :func:`max_norm_unsupported`).
        """
        # LyCORIS' NormModule has no max-norm (its apply_max_norm returns None: skipped)
        modules = [module for module in self._modules_of() if not isinstance(module, NormAdapter)]
        if not modules:
            return 0, 0.0, 0.0
        for module in modules:
            why = max_norm_unsupported(module)
            if why:
                raise TypeError(f"{module.lora_name}: {why}")
        norms = torch.stack([_change_norm(module) for module in modules]).float()
        floor = norms.clamp(min=max_norm / 2)
        ratios = floor.clamp(max=max_norm) / floor
        scaled = 0
        for module, ratio in zip(modules, ratios.tolist(), strict=True):
            if ratio != 1:
                scaled += 1
                if _uses_scalar(module):
                    module.scalar *= ratio
                    continue
                factors = _max_norm_factors(module)
                share = ratio ** (1 / len(factors))
                for factor in factors:
                    factor.mul_(share)
        after = norms * ratios
        return scaled, float(after.mean()), float(after.max())

    def parameters_of(self, *, text_encoder: bool) -> list[nn.Parameter]:
        """Trainable parameters of the text-encoder (``True``) or UNet (``False``) modules."""
        params: list[nn.Parameter] = []
        for module in self._modules_of():
            if module.lora_name.startswith("lora_te") == text_encoder:
                params.extend(p for p in module.parameters())
        return params

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
        """Copy weights from a file-layout dict; a missing alpha means alpha = rank.

        Returns the modules the dict does not cover (an error with ``strict``); a tensor of another
        shape (another rank) is always an error.
        """
        from sdcore.errors import NetworkMismatchError

        own = self.state_dict()
        full: dict[str, torch.Tensor] = {}
        missing: set[str] = set()
        modules = self.loras
        for key, current in own.items():
            name = key.split(".", 1)[0]
            value = state.get(key)
            if value is None:
                if key.endswith(".alpha"):
                    value = torch.tensor(float(modules[name].rank))
                else:
                    missing.add(name)
                    value = current
            elif tuple(value.shape) != tuple(current.shape):
                raise NetworkMismatchError(
                    f"{key}: saved shape {tuple(value.shape)} does not match {tuple(current.shape)} (another rank?)"
                )
            full[key] = value.to(current.dtype)
        if strict and missing:
            names = sorted(missing)
            raise NetworkMismatchError(f"{len(names)} modules missing from the weights: {', '.join(names[:10])}")
        self.load_state_dict(full)
        return sorted(missing)


def _uses_scalar(module: Adapter) -> bool:
    """LyCORIS rescales this module's ``scalar`` (LoHa, DoRA, Tucker LoCon), not its factors."""
    if isinstance(module, LohaAdapter):
        return True
    return isinstance(module, LoraAdapter) and (module.dora_scale is not None or module.lora_mid is not None)


@contextlib.contextmanager
def unbaked_scalars(network: LoraNetwork) -> Iterator[None]:
    """``state_dict()`` with the raw factors (the scalars kept apart): for exact resumable states."""
    modules = network._modules_of()
    for module in modules:
        module._bake_scalar = False
    try:
        yield
    finally:
        for module in modules:
            module._bake_scalar = True


def max_norm_unsupported(module: Adapter) -> str | None:
    """Why max-norm regularisation does not apply to ``module`` (``None`` when it does): kohya
    defines it for LoRA/LoCon (``networks.lora_fa`` too: it rescales the frozen down as well),
    LyCORIS for LoCon (incl. DoRA, Tucker), LoHa and LoKr; kohya's ``networks.oft`` and
    ``networks.dylora`` have none."""
    if isinstance(module, LoraAdapter | SharedDownLora | LohaAdapter | LokrAdapter):
        return None
    return f"max-norm regularisation is defined for LoRA/LoCon, LoHa and LoKr modules, not {module.algo}"


def _change_norm(module: Adapter) -> torch.Tensor:
    """``||ΔW||`` (Frobenius, ``alpha/rank`` applied) on the CPU, in float64.

    For ``ΔW = s · U @ D`` (``U = up [out, r]``, ``D = down [r, in·k·k]``: a kxk down with a 1x1 up
    composes to exactly this) ``||ΔW||² = s² · Σ (UᵀU) ⊙ (DDᵀ)``: two rank x rank Gram matrices
    instead of the ``out x in`` product, about ``rank`` times less work than forming ``ΔW`` (what
    kohya does), so the check costs little even on a CPU.
    """
    if _uses_scalar(module):  # LyCORIS: the norm of scalar · scale · W, before DoRA
        t = {key: value.detach() for key, value in module.tensors().items()}
        raw = module.variant.weight(t, tuple(module.base.weight.shape), module.base.weight)
        return (raw.double().norm() * abs(module.scale * module.scalar)).to("cpu")
    if isinstance(module, LoraAdapter | SharedDownLora):
        up = module.lora_up.weight.detach().double()
        down = module.lora_down.weight.detach().double()
        up = up.reshape(up.shape[0], -1)
        down = down.reshape(down.shape[0], -1)
        squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0.0)
        return (squared.sqrt() * abs(module.scale)).to("cpu")
    return module.delta_weight().double().norm().to("cpu")


def _max_norm_factors(module: Adapter) -> list[torch.Tensor]:
    """The tensors max-norm rescales: LoRA's ``up``/``down``, LoKr's factor tensors."""
    if isinstance(module, LokrAdapter):
        return [param for name, param in module.named_parameters() if name != "dora_scale"]
    factored: Any = module  # LoraAdapter / SharedDownLora (checked by max_norm_unsupported)
    return [factored.lora_up.weight, factored.lora_down.weight]


__all__ = ["LoraNetwork", "SharedGroup", "max_norm_unsupported", "unbaked_scalars"]
