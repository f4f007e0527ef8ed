"""LoRA file tools: extract (SVD of a fine-tune's weight differences), resize, merge, info.

The formulas follow sd-scripts' ``extract_lora_from_models.py``, ``resize_lora.py``,
``merge_lora.py`` and ``svd_merge_lora.py`` so results behave as users expect from kohya tools;
the code is our own.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sdcore.errors import ConfigError, NetworkMismatchError

from .adapters import LoraVariant, OftVariant, needs_base, weight_change
from .algos import FAMILY_LORA_MODULE, PLAIN_LORA_MODULES
from .bfl_names import for_writing, kohya_name, kohya_names
from .dataset_metadata import datasets_tag_frequency
from .format import (
    PEFT_LAYOUT,
    LoraFile,
    ModuleWeights,
    detect_family,
    family_label,
    network_metadata,
    peft_state_dict,
    read_lora,
)
from .naming import ModuleIndex, kohya_component

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")

#: kohya ``svd_merge_lora.py`` ``CLAMP_QUANTILE`` (and ``extract_lora_from_models.py``'s
#: ``--clamp_quantile`` default): factors are clamped to this quantile of their values
CLAMP_QUANTILE = 0.99
#: ``merge --mode svd``'s rank when none is given: kohya ``svd_merge_lora.py``'s ``--new_rank`` default (its
#: ``--new_conv_rank`` defaults to the rank, as ``conv_rank`` does here)
SVD_MERGE_RANK = 4


def check_ranks(**ranks: int | None) -> None:
    """Refuse ranks below 1 (a zero or negative rank would write empty or nonsense modules)."""
    bad = [f"--{name.replace('_', '-')} {value}" for name, value in ranks.items() if value is not None and value < 1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: a rank must be at least 1")


def check_quantile(clamp_quantile: float | None) -> None:
    """``--clamp-quantile`` is a quantile: in (0, 1] (1 = no clamp), or ``None`` for none."""
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ConfigError(f"--clamp-quantile {clamp_quantile}: choose a value in (0, 1] (1 = no clamp)")


def check_ratios(loras: Sequence[tuple[Any, float]]) -> None:
    """Refuse NaN or infinite ratios, which would write NaN weights without a word."""
    bad = [f"{getattr(lora, 'label', lora)}:{ratio}" for lora, ratio in loras if not math.isfinite(ratio)]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: a ratio must be a finite number")


def _quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile`` (which refuses > 16M elements) with an order-statistic fallback."""
    if q >= 1.0:
        return float(values.max())
    if values.numel() <= 16_000_000:
        return float(torch.quantile(values, q))
    k = max(1, min(values.numel(), math.ceil(q * values.numel())))
    return float(values.kthvalue(k).values)


def _factor(delta: torch.Tensor, rank: int, clamp_quantile: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD ``delta`` [out, in·k·k] to ``up @ down`` of ``rank``, clamped as kohya (U·S and Vh)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    up = U[:, :rank] @ torch.diag(S[:rank])
    down = Vh[:rank, :]
    if clamp_quantile is not None and clamp_quantile < 1.0:
        limit = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up = up.clamp(-limit, limit)
        down = down.clamp(-limit, limit)
    return up, down


def _shape_factors(
    up: torch.Tensor, down: torch.Tensor, weight_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape factors to kohya's layout: conv down [r, in, k, k], up [out, r, 1, 1]."""
    if len(weight_shape) == 4:
        rank = down.shape[0]
        return up.reshape(weight_shape[0], rank, 1, 1), down.reshape(rank, *weight_shape[1:])
    return up, down


# --- extract -----------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    skipped_text_encoder: bool = False
    modules: int = 0


def extract_lora(
    base: Any,
    tuned: Any,
    *,
    rank: int = 4,
    conv_rank: int | None = None,
    clamp_quantile: float = CLAMP_QUANTILE,
    min_diff: float = 0.01,
    text_encoder: bool = True,
) -> ExtractResult:
    """A LoRA approximating ``tuned - base`` on kohya's target modules (alpha = rank, scale 1).

    Text encoders are skipped when no weight differs by more than ``min_diff`` (kohya's rule, so
    a UNet-only fine-tune does not produce noise TE modules). 3x3 convs are extracted only with
    ``conv_rank``. A fine-tune equal to the base everywhere is a :class:`ConfigError`: a file of zeros would
    load everywhere and change nothing.
    """
    check_ranks(rank=rank, conv_rank=conv_rank)
    check_quantile(clamp_quantile)
    if base.family != tuned.family:
        raise NetworkMismatchError(f"cannot extract between a {base.family} base and a {tuned.family} fine-tune")
    base_index = ModuleIndex.from_bundle(base)
    tuned_index = ModuleIndex.from_bundle(tuned)
    targets = base_index.select(text_encoder=text_encoder, conv=bool(conv_rank))
    deltas: dict[str, torch.Tensor] = {}
    for target in targets:
        other = tuned_index.resolve(target.name)
        if other is None or tuple(other.module.weight.shape) != tuple(target.module.weight.shape):
            raise NetworkMismatchError(f"{target.name}: the fine-tune has no matching module (different architecture?)")
        deltas[target.name] = other.module.weight.detach().float().cpu() - target.module.weight.detach().float().cpu()
    if base_index.kohya:  # SD3/Flux: one delta per kohya (SAI/BFL) module, fused as kohya's extractor sees it
        deltas = _kohya_deltas(base_index, deltas)
    te_names = [name for name in deltas if name.startswith("lora_te")]
    skipped = False
    if te_names and max(float(deltas[n].abs().max()) for n in te_names) <= min_diff:
        for name in te_names:
            del deltas[name]
        skipped = True
    if not any(bool(delta.any()) for delta in deltas.values()):  # an all-zero file would load and do nothing
        raise ConfigError(
            "the fine-tune's weights equal the base's in every module to extract: nothing to extract (the same "
            "model given twice?)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        shape = tuple(delta.shape)
        conv3x3 = len(shape) == 4 and shape[2:] != (1, 1)
        wanted = conv_rank if conv3x3 else rank
        if not wanted:
            continue
        flat = delta.flatten(1)
        r = min(wanted, flat.shape[0], flat.shape[1])
        up, down = _factor(flat, r, clamp_quantile)
        up, down = _shape_factors(up, down, shape)
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(r))
    variant = None
    if base_index.kohya:
        from .dit import variant_of_transformer

        variant = variant_of_transformer(base.family, base.components()["transformer"])
    meta = network_metadata(
        family=base.family,
        variant=variant,
        prediction_type=base.prediction_type,
        rank=rank,
        alpha=rank,
        conv_rank=conv_rank,
        conv_alpha=conv_rank,
        network_module=lora_module(base.family),
        extra={"ss_training_comment": "extracted with sdcore lora extract"},
    )
    return ExtractResult(tensors, meta, skipped, len(tensors) // 3)


def lora_module(family: str | None) -> str:
    """kohya's ``ss_network_module`` of a plain LoRA for ``family``: ``networks.lora_flux`` for Flux
    (``flux_extract_lora.py``), ``networks.lora_sd3`` for SD3, ``networks.lora`` otherwise."""
    return FAMILY_LORA_MODULE.get(family or "", "networks.lora")


def _kohya_deltas(index: ModuleIndex, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-module weight differences (``lora_transformer_<path>``) -> kohya's module names, the rows
    of fused modules stacked in SAI/BFL order (halves swapped where they order them otherwise)."""
    from .dit import swap_halves

    by_path = {index.targets[name].path: name for name in deltas if name in index.targets}
    out = {name: delta for name, delta in deltas.items() if name not in index.targets or name.startswith("lora_te")}
    for module in index.kohya.values():
        names = [by_path.get(part.path) for part in module.parts]
        if not any(names):
            continue
        rows = []
        for part, name in zip(module.parts, names, strict=True):
            if name is None:
                raise NetworkMismatchError(f"{module.name}: {part.path} is not among the extracted modules")
            rows.append(swap_halves(deltas[name]) if part.swap_halves else deltas[name])
        out[module.name] = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out


# --- resize ------------------------------------------------------------------------------------


#: kohya resize_lora.py: a module whose largest singular value is at most this is a zero matrix
MIN_SV = 1e-6


def _dynamic_index(S: torch.Tensor, method: str, param: float) -> int:
    """kohya's ``index_sv_*``: an index into ``S`` clamped to ``[1, len(S) - 1]``."""
    if method == "sv_ratio":
        index = int((S[0] / param < S).sum())
    elif method == "sv_fro":
        energy = torch.cumsum(S.double() ** 2, 0) / float((S.double() ** 2).sum())
        index = int(torch.searchsorted(energy, torch.tensor(param**2, dtype=energy.dtype))) + 1
    elif method == "sv_cumulative":
        total = torch.cumsum(S.double(), 0) / float(S.double().sum())
        index = int(torch.searchsorted(total, torch.tensor(param, dtype=total.dtype))) + 1
    else:
        raise ConfigError(f"--dynamic {method!r}: choose one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(index, S.numel() - 1))


def dynamic_rank(S: torch.Tensor, cap: int, method: str | None, param: float | None) -> int:
    """The rank kohya's ``resize_lora.py`` keeps for singular values ``S`` (of the whole ΔW).

    ``sv_ratio``/``sv_fro``/``sv_cumulative`` give ``index + 1``; the result is capped at ``cap``
    (``--new_rank``) and a zero matrix keeps rank 1.
    """
    new = cap if method is None else _dynamic_index(S, method, float(param)) + 1  # type: ignore[arg-type]
    if S.numel() == 0 or float(S[0]) <= MIN_SV:
        return 1
    return min(new, cap)


def lora_flat_delta(weights: ModuleWeights) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The unscaled ``ΔW`` of a LoRA/LoCon module as ``[out, in·k·k]`` plus the layer's weight shape
    (read from the factors: down ``[r, in(, k, k)]``, Tucker mid ``[r, r, k, k]``)."""
    shape = LoraVariant.shape(weights.tensors)
    assert shape is not None
    return LoraVariant.weight(weights.tensors, shape).flatten(1), shape


def lora_key(name: str) -> str:
    """The key a module keeps once it is a LoRA: kohya's OFT names (``oft_unet_``) become
    ``lora_unet_`` (the same layer), every other name stays as it is."""
    return "lora_unet_" + name[len("oft_unet_") :] if name.startswith("oft_unet_") else name


def layer_shape(
    name: str, weights: ModuleWeights, family: str | None, base: torch.Tensor | None = None
) -> tuple[int, ...]:
    """The adapted layer's weight shape: the base weight's when given, else what the tensors tell,
    with the kernel of a flattened conv (LoHa, factored LoKr) taken from the module name
    (:func:`module_shape`: SD's kxk convs are 3x3)."""
    if base is not None:
        return tuple(int(d) for d in base.shape)
    variant = weights.variant
    shape = variant.shape(weights.tensors) if variant is not None else None
    if shape is None:
        raise NetworkMismatchError(f"{name}: its layer's shape is not in the file; pass the base model")
    if len(shape) == 2:
        kind = module_shape(name, weights, family)
        if kind == "conv1x1":
            return (*shape, 1, 1)
        if kind == "conv3x3" and shape[1] % 9 == 0:
            return (shape[0], shape[1] // 9, 3, 3)
    return shape


@dataclass
class DenseModule:
    """One file module as a dense change ``scale · delta`` of its layer (what merge and resize
    re-factor), with DoRA's magnitude when it is kept."""

    key: str
    delta: torch.Tensor  # [out, in·k·k], fp32, unscaled
    scale: float
    shape: tuple[int, ...]
    dora_scale: torch.Tensor | None = None


def dense_module(
    lora: LoraFile,
    name: str,
    weights: ModuleWeights,
    *,
    family: str | None,
    base: torch.Tensor | None = None,
    keep_dora: bool = False,
) -> DenseModule:
    """The dense change of any variant (the variant's own formula, :mod:`sdplugin_lora.adapters`).

    LoRA, LoHa, LoKr and full modules need nothing else. DoRA, OFT, (IA)^3 and GLoRA change the weight
    relative to the base weight, so they need ``base`` and give ``W' - W`` (scale 1); with ``keep_dora`` a
    DoRA module instead keeps its magnitude and its inner ``ΔW`` is what gets re-factored.
    """
    t = weights.tensors
    variant = weights.variant
    if variant is None:
        raise NetworkMismatchError(f"{lora.label}: {name} has tensors {sorted(t)} of no known algorithm")
    if "diff_b" in t:
        raise NetworkMismatchError(f"{lora.label}: {name} also changes the bias (diff_b), which a LoRA cannot carry")
    if variant.algo == "norm":
        raise NetworkMismatchError(
            f"{lora.label}: {name} is a LyCORIS norm module (train_norm: w_norm/b_norm), which a LoRA cannot carry"
        )
    keep = keep_dora and "dora_scale" in t and not variant.multiplicative
    if base is None and needs_base(t) and not keep:
        kind = _ALGO_LABEL.get(variant.algo, variant.algo) if variant.multiplicative else "DoRA"
        raise NetworkMismatchError(
            f"{lora.label}: {name} is {kind}: its change depends on the base weights; pass --base-model"
        )
    shape = layer_shape(name, weights, family, base)
    if keep:
        delta, scale, dora = variant.weight(t, shape), variant.scale(t), t["dora_scale"].float()
    elif needs_base(t):
        assert base is not None
        delta, scale, dora = weight_change(t, shape, base.detach().float().cpu()), 1.0, None
    else:
        delta, scale, dora = variant.weight(t, shape), variant.scale(t), None
    return DenseModule(lora_key(name), delta.flatten(1), scale, shape, dora)


def base_weights(bundle: Any, lora: LoraFile) -> dict[str, torch.Tensor]:
    """The base weight of every module of ``lora`` found in ``bundle`` (by the file's key)."""
    from .format import check_family, resolve_key

    index = ModuleIndex.from_bundle(bundle)
    check_family(lora, index.family)
    out: dict[str, torch.Tensor] = {}
    for name in lora.modules:
        target = resolve_key(index, name)
        if target is not None:
            out[name] = target.module.weight.detach()
    return out


@dataclass
class ResizeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (old, new)
    fro_retained: dict[str, float] = field(default_factory=dict)


def resize_lora(
    lora: LoraFile,
    rank: int,
    *,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    dynamic_param: float | None = None,
    base: Any = None,
) -> ResizeResult:
    """Re-factor every module, whatever its algorithm, to a LoRA of ``rank`` (the cap, with
    ``dynamic``) keeping the effective ΔW scale.

    ``new_alpha = old_alpha/old_rank * new_rank`` as kohya's resize does, so the file applies at
    the same strength. LoHa/LoKr/full modules become LoRA of their dense ΔW; DoRA modules stay
    DoRA (their inner ΔW is re-factored, ``dora_scale`` kept); OFT modules need ``base`` (the
    model they were trained on) and become the LoRA of ``Rᵀ W - W``.

    A FLUX.1 control LoRA in BFL's layout (:func:`in_control_layout`) stays in it: ``lora_A``/``lora_B`` with the
    scale folded into ``lora_B`` and no alpha, ``lora_B.bias`` and the norm scales kept, the final layer's module
    as :func:`sdplugin_lora.dit.control_module` writes it; ComfyUI and diffusers recognise a control LoRA only in
    that layout.
    """
    from .dit import control_module, control_rank

    check_ranks(rank=rank, conv_rank=conv_rank)
    if dynamic is not None and dynamic_param is None:
        raise ConfigError(f"--dynamic {dynamic} needs --dynamic-param")
    control = in_control_layout(lora)
    if not control:  # XLabs' files under kohya's names, ComfyUI's linear1_qkv as kohya's linear1
        lora = for_writing(lora)
    if control and (dora_modules := [name for name, w in lora.modules.items() if w.is_dora]):
        raise NetworkMismatchError(
            f"{lora.label}: {len(dora_modules)} DoRA modules ({', '.join(dora_modules[:3])}) in a FLUX.1 control LoRA, whose layout "
            "(BFL's lora_A/lora_B) holds plain LoRA only"
        )
    family = detect_family(lora)[0]
    weights_of = base_weights(base, lora) if base is not None else {}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, int]] = {}
    retained: dict[str, float] = {}
    conv_keys: dict[str, bool] = {}
    for name, weights in lora.modules.items():
        dense = dense_module(lora, name, weights, family=family, base=weights_of.get(name), keep_dora=True)
        conv = len(dense.shape) == 4 and tuple(dense.shape[2:]) != (1, 1)
        conv_keys[dense.key] = conv
        cap = (conv_rank or rank) if conv else rank
        U, S, Vh = torch.linalg.svd(dense.delta, full_matrices=False)
        new = min(dynamic_rank(S, cap, dynamic, dynamic_param), S.numel())
        new_up, new_down = _shape_factors(U[:, :new] @ torch.diag(S[:new]), Vh[:new], dense.shape)
        bias = weights.tensors.get("lora_up.bias")
        old_rank = weights.rank
        if control:  # BFL's layout: the scale in lora_B (the new scale is 1), the bias as lora_B's
            tensors.update(control_module(dense.key, new_down, new_up * dense.scale))
            if bias is not None:
                tensors[f"{dense.key}.lora_B.bias"] = bias.float() * weights.scale
            if weights.kind == "lora":
                old_rank = control_rank(dense.key, weights.down.flatten(1))
        else:
            tensors[f"{dense.key}.lora_down.weight"] = new_down.contiguous()
            tensors[f"{dense.key}.lora_up.weight"] = new_up.contiguous()
            tensors[f"{dense.key}.alpha"] = torch.tensor(dense.scale * new)
            if dense.dora_scale is not None:
                tensors[f"{dense.key}.dora_scale"] = dense.dora_scale
            if bias is not None:  # s · b stays what it was: the new scale's
                tensors[f"{dense.key}.lora_up.bias"] = bias.float() * (weights.scale / (dense.scale or 1.0))
        ranks[dense.key] = (old_rank, new)
        total = float((S**2).sum())
        retained[dense.key] = math.sqrt(float((S[:new] ** 2).sum()) / total) if total > 0 else 1.0
    meta = dict(lora.metadata)
    meta.pop("sshs_model_hash", None)
    meta.pop("sshs_legacy_hash", None)
    # diffusers' PEFT layout stays in it (its header written for the new ranks and alphas); any other file's modules
    # carry their alphas, and a PEFT header of the old file would make diffusers build a LoraConfig of old ranks
    meta.pop("lora_adapter_metadata", None)
    # kohya resize_lora.py: the largest old rank of the tensors; dim/alpha "Dynamic" with a dynamic method,
    # else the new rank and the new alpha (kohya writes the last module's: here the Linear/1x1 modules'
    # when they share one, "Dynamic" when they do not)
    old_dim = max((old for old, _ in ranks.values()), default=0)
    if dynamic:
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
        note = f"Dynamic resize with {dynamic}: {dynamic_param} from {old_dim}"
    else:
        # a control LoRA's alpha is its rank (alpha/rank is in lora_B), as training writes it
        alphas = {float(rank)} if control else {float(tensors[f"{key}.alpha"]) for key in ranks if not conv_keys[key]}
        meta["ss_network_dim"] = str(rank)
        meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
        conv_note = f" (conv: {conv_rank})" if conv_rank and conv_rank != rank else ""
        note = f"dimension is resized from {old_dim} to {rank}{conv_note}"
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{note}; {comment}" if comment and comment != "None" else note
    raw = meta.get("ss_network_args")
    args = json.loads(raw) if raw not in (None, "", "None") else {}
    if (
        not all(w.kind == "lora" for w in lora.modules.values())
        or meta.get("ss_network_module") not in PLAIN_LORA_MODULES
    ):
        # now a LoRA (LoCon): kohya's module, or LyCORIS' when DoRA magnitudes are kept
        dora = any(key.endswith(".dora_scale") for key in tensors)
        args = {k: v for k, v in args.items() if k in ("conv_dim", "conv_alpha", "control_lora")}
        if dora:
            args.update({"algo": "lora", "dora_wd": "True"})
        meta["ss_network_module"] = "lycoris.kohya" if dora else lora_module(family)
    if conv_rank:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = "Dynamic"
    if args or raw is not None:
        meta["ss_network_args"] = json.dumps(args) if args else "None"
    if lora.layout == PEFT_LAYOUT and not control:
        tensors, header = peft_state_dict(tensors)
        meta.update(header)
    tensors.update(lora.norm_scales)  # full norm scales (BFL's control LoRAs) are set, not factored: kept as they are
    return ResizeResult(tensors, meta, ranks, retained)


def in_control_layout(lora: LoraFile) -> bool:
    """Whether ``lora`` is a FLUX.1 control LoRA in BFL's layout (BFL's ``flux1-depth-dev-lora`` /
    ``flux1-canny-dev-lora``, sdcore's ``--control-lora`` results): every module a Linear under BFL's dotted name,
    with full attention-norm scales (what diffusers' ``load_lora_weights`` recognises it by) or an ``img_in`` of
    :data:`~sdplugin_lora.format.CONTROL_WIDTH` inputs (ComfyUI: ``img_in.lora_A.weight``)."""
    from .dit import is_bfl_linear
    from .format import CONTROL_WIDTH, patch_input_width

    if not lora.modules or not all(is_bfl_linear(name) for name in lora.modules):
        return False
    return bool(lora.norm_scales) or patch_input_width(lora) == CONTROL_WIDTH


# --- merge -------------------------------------------------------------------------------------


def _warn_bundled_left_out(loras: Sequence[LoraFile], into: str) -> None:
    """Say which bundled embeddings (``bundle_emb.*``) a merge leaves out: they are no module weights, so neither a
    checkpoint nor a merged LoRA gets them, and without a word the prompt word would silently stop working."""
    import warnings

    from .apply import LoraWarning

    for lora in loras:
        if lora.bundled:
            names = ", ".join(repr(emb.name) for emb in lora.bundled)
            warnings.warn(
                f"{lora.label}: its bundled embedding{'s' if len(lora.bundled) != 1 else ''} {names} "
                f"{'are' if len(lora.bundled) != 1 else 'is'} not in {into} (only module weights merge); keep the "
                "LoRA file in the prompt to use them",
                LoraWarning,
                stacklevel=3,
            )


def merge_into_model(bundle: Any, loras: Sequence[tuple[str | Path | LoraFile, float]], *, strict: bool = False) -> int:
    """Bake LoRA-family files into ``bundle``'s weights (``W += ratio * (W' - W)``); returns modules touched.
    Bundled embeddings are left out, with a :class:`~sdplugin_lora.apply.LoraWarning`."""
    from .apply import LoraSpec, apply_loras

    check_ratios(loras)
    parsed = [(lora if isinstance(lora, LoraFile) else read_lora(lora), ratio) for lora, ratio in loras]
    _warn_bundled_left_out([lora for lora, _ in parsed], "the merged model")
    applied = apply_loras(bundle, [LoraSpec(lora, ratio) for lora, ratio in parsed], merge=True, strict=strict)
    touched = applied.touched
    applied.backups.clear()  # nothing to restore: the merge is permanent
    return touched


def merge_loras(
    loras: Sequence[tuple[LoraFile, float]],
    *,
    mode: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    base: Any = None,
    clamp_quantile: float | None = CLAMP_QUANTILE,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Several LoRA-family files into one LoRA.

    ``concat`` stacks ranks (exact: ΔW = Σ ratio·scale·up@down, alpha = total rank; plain
    LoRA/LoCon only); ``svd`` sums the dense ΔW each variant computes and re-factors the sum to
    ``rank`` (:data:`SVD_MERGE_RANK` when ``None``, and 3x3 convs to ``conv_rank`` or else ``rank``, as kohya's
    defaults; kohya ``svd_merge_lora``, its factors clamped to ``clamp_quantile`` as kohya's
    ``CLAMP_QUANTILE`` does; 1 or ``None`` = no clamp), for every algorithm: DoRA and OFT modules contribute
    ``W' - W`` against ``base`` (the model they were trained on), which they need. Modules are
    matched by layer name, so all inputs must use the same naming (the same family and trainer
    style; kohya's ``oft_unet_`` names count as ``lora_unet_``).
    """
    if mode not in ("concat", "svd"):
        raise ConfigError(f"merge mode {mode!r}: choose concat or svd")
    if mode == "svd" and rank is None:
        rank = SVD_MERGE_RANK
    check_ranks(rank=rank, conv_rank=conv_rank)
    check_quantile(clamp_quantile)
    check_ratios(loras)
    _warn_bundled_left_out([lora for lora, _ in loras], "the merged LoRA")
    # XLabs' files under kohya's names, ComfyUI's linear1_qkv as kohya's linear1 (merged with a kohya linear1)
    loras = [(for_writing(lora), ratio) for lora, ratio in loras]
    families = {family for family in (detect_family(lora)[0] for lora, _ in loras) if family is not None}
    if len(families) > 1:
        raise NetworkMismatchError(f"cannot merge LoRAs of different families: {', '.join(sorted(families))}")
    family = next(iter(families), None)
    for lora, _ratio in loras:  # a full norm scale replaces the model's: no ratio or sum of two makes one
        if lora.norm_scales:
            raise NetworkMismatchError(
                f"{lora.label}: it sets {len(lora.norm_scales)} attention norm scales in full ("
                f"{', '.join(list(lora.norm_scales)[:3])}...), which a merge of LoRAs cannot weight or add; "
                "apply the file as it is"
            )
    parts: dict[str, list[tuple[LoraFile, str, ModuleWeights, float]]] = {}
    written: dict[str, str] = {}  # a layer -> the name it is written under: the first file's
    for lora, ratio in loras:
        for name, weights in lora.modules.items():
            if mode == "concat" and (weights.kind != "lora" or weights.is_dora or weights.is_tucker):
                kind = "DoRA" if weights.is_dora else ("Tucker LoCon" if weights.is_tucker else weights.kind)
                raise NetworkMismatchError(f"{lora.label}: {name} is {kind}; merge it with --mode svd")
            # FLUX.1 under kohya's and BFL's dotted names (an XLabs file written under kohya's beside a ComfyUI one)
            # is one layer: two modules of it would be one too many for ComfyUI, which keeps one per weight
            layer = (kohya_name(name) if family in ("flux", "chroma") else None) or lora_key(name)
            written.setdefault(layer, lora_key(name))
            parts.setdefault(layer, []).append((lora, name, weights, ratio))
    weights_of: dict[int, dict[str, torch.Tensor]] = {}
    if base is not None and mode == "svd":
        weights_of = {id(lora): base_weights(base, lora) for lora, _ in loras}
    tensors: dict[str, torch.Tensor] = {}
    for layer, group in parts.items():
        key = written[layer]
        if mode == "concat":
            weight_shape = lora_flat_delta(group[0][2])[1]
            if any(LoraVariant.shape(w.tensors) != weight_shape for _, _, w, _ in group[1:]):
                raise NetworkMismatchError(f"{key}: the files give this layer different shapes")
            ups = [w.up.float().flatten(1) * (ratio * w.scale) for _, _, w, ratio in group]
            downs = [w.down.float().flatten(1) for _, _, w, _ in group]
            up, down = torch.cat(ups, 1), torch.cat(downs, 0)
            r = up.shape[1]
        else:
            denses = [
                (dense_module(lora, n, w, family=family, base=weights_of.get(id(lora), {}).get(n)), ratio)
                for lora, n, w, ratio in group
            ]
            weight_shape = denses[0][0].shape
            if any(d.delta.shape != denses[0][0].delta.shape for d, _ in denses):
                raise NetworkMismatchError(f"{key}: the files give this layer different shapes")
            delta = sum((d.delta * (ratio * d.scale) for d, ratio in denses), torch.zeros(()))
            assert isinstance(delta, torch.Tensor)
            conv = len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)
            cap = int((conv_rank or rank) if conv else rank)  # type: ignore[arg-type]
            r = min(cap, *delta.shape)
            up, down = _factor(delta, r, clamp_quantile)
        up, down = _shape_factors(up, down, weight_shape)
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(r))
        # lora_up biases (BFL's/PEFT's lora_B.bias) add ratio · s · b each; the merged module's scale is 1 (alpha = r)
        biases = [w.tensors["lora_up.bias"].float() * (ratio * w.scale) for _, _, w, ratio in group
                  if "lora_up.bias" in w.tensors]  # fmt: skip
        if biases:
            tensors[f"{key}.lora_up.bias"] = torch.stack(biases).sum(0).contiguous()
    downs = [t for k, t in tensors.items() if k.endswith(".lora_down.weight")]
    ranks = [int(t.shape[0]) for t in downs if not (t.dim() == 4 and tuple(t.shape[2:]) != (1, 1))]
    conv_ranks = [int(t.shape[0]) for t in downs if t.dim() == 4 and tuple(t.shape[2:]) != (1, 1)]
    meta = network_metadata(
        family=family or "sd1",
        rank=max(ranks) if ranks else 0,
        alpha=max(ranks) if ranks else 0,
        conv_rank=max(conv_ranks) if conv_ranks else None,
        conv_alpha=max(conv_ranks) if conv_ranks else None,
        network_module=lora_module(family),
        extra={
            "ss_training_comment": f"merged ({mode}) from "
            + ", ".join(f"{lora.label}:{ratio}" for lora, ratio in loras),
        },
    )
    meta["modelspec.merged_from"] = ", ".join(Path(lora.label).stem for lora, _ in loras)
    if all(lora.layout == PEFT_LAYOUT for lora, _ in loras):  # diffusers' files merge into one of their layout
        tensors, header = peft_state_dict(tensors)
        meta.update(header)
    return tensors, meta


# --- convert -----------------------------------------------------------------------------------


def oft_for_comfyui(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya OFT file rewritten so that ComfyUI applies the same rotations.

    ComfyUI's key map names UNet modules ``lora_unet_<name>`` (and ``lycoris_``/diffusers names)
    but never kohya's ``oft_unet_<name>``, so it skips every module of a kohya OFT file; and it
    clamps ``‖Q‖`` to ``alpha`` where kohya clamps to ``alpha · out``. The rewrite renames the
    modules to ``lora_unet_``, stores kohya's clamped ``Q`` itself (``oft_blocks = Q/2``, since
    ``Q/2 - (Q/2)ᵀ = Q``) and ``alpha · out`` as alpha, so that neither ComfyUI nor kohya's rule
    (nor sdcore, which reads both names) clamps again: all three give kohya's merged weights.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, weights in lora.modules.items():
        if weights.kind != "oft":
            raise NetworkMismatchError(
                f"{lora.label}: {name} is {weights.kind}, not OFT; ComfyUI loads such modules as they are"
            )
        t = weights.tensors
        if "oft_blocks" not in t:  # oft_flux's per-part block sets: ComfyUI's OFT reads one oft_blocks per layer
            raise NetworkMismatchError(
                f"{lora.label}: {name} is kohya networks.oft_flux's (oft_blocks.0, .1...: one block set per q/k/v/MLP "
                "part of a fused BFL Linear); ComfyUI reads no such module and has no form for it"
            )
        blocks = t["oft_blocks"]
        out_dim = int(blocks.shape[0]) * int(blocks.shape[1])
        key = lora_key(name)
        tensors[f"{key}.oft_blocks"] = (OftVariant.skew(t, out_dim) / 2).to(blocks.dtype)
        tensors[f"{key}.alpha"] = torch.tensor(OftVariant.constraint(t, out_dim))
    meta = dict(lora.metadata)
    meta.pop("sshs_model_hash", None)
    meta.pop("sshs_legacy_hash", None)
    meta["sdcore_oft_layout"] = "comfyui"
    note = "OFT renamed to lora_unet_ with kohya's constraint applied, for ComfyUI"
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{note}; {comment}" if comment and comment != "None" else note
    return tensors, meta


def flux_to_kohya(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A FLUX.1/Chroma file under BFL's dotted, ComfyUI's or XLabs' names rewritten under kohya's
    (:func:`sdplugin_lora.bfl_names.kohya_names`: ``lora_unet_double_blocks_0_img_attn_qkv``, XLabs' single-block
    ``qkv_lora`` as ``lora_unet_single_blocks_<i>_linear1`` with zero MLP rows), the same factors and an explicit
    alpha (x-flux's files have none: alpha = rank), so that kohya, Forge, ComfyUI and diffusers all read it. A file
    without kohya's ``ss_*`` header gets the one ``lora extract`` writes for its family."""
    renamed = kohya_names(lora)
    tensors = renamed.kohya_state_dict()
    meta = dict(lora.metadata)
    # the alphas are tensors now; diffusers would build its LoraConfig from a PEFT header (its r, alphas and target
    # names, all of the old file) instead of reading the kohya file
    for key in ("sshs_model_hash", "sshs_legacy_hash", "lora_adapter_metadata"):
        meta.pop(key, None)
    family = detect_family(lora)[0] or "flux"
    if "ss_network_module" not in meta:
        ranks = sorted({w.rank for w in renamed.modules.values() if w.rank})
        alphas = sorted({w.alpha for w in renamed.modules.values() if w.rank})
        meta = {
            **network_metadata(
                family=family,
                rank=ranks[-1] if ranks else 0,
                alpha=alphas[0] if len(alphas) == 1 else (ranks[-1] if ranks else 0),
                network_module=lora_module(family),
                title=Path(lora.label).stem,
            ),
            **meta,
        }
    note = "renamed to kohya's FLUX.1 module names with sdcore lora convert --to kohya"
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{note}; {comment}" if comment and comment != "None" else note
    return tensors, meta


# --- info --------------------------------------------------------------------------------------


_CONV3X3_NAMES = re.compile(
    r"(_conv1|_conv2|_in_layers_2|_out_layers_3|_0_op|samplers_0_conv|_2_conv|_1_conv|conv_in|conv_out|"
    r"input_blocks_0_0|_out_2)$"
)
_CONV1X1_NAMES = re.compile(r"(_conv_shortcut|_skip_connection)$")
_PROJ_NAMES = re.compile(r"_proj_(in|out)$")


def module_shape(name: str, weights: ModuleWeights, family: str | None) -> str:
    """``linear``, ``conv1x1`` or ``conv3x3`` for a file module.

    The tensors tell it when they are 4-D (LoRA factors, Tucker cores, full LoKr factors, diffs);
    LoHa and factored LoKr store convs flattened, so their module name decides (kohya/SGM names of
    ResNet convs and samplers are kxk; ``conv_shortcut``/``skip_connection`` 1x1; ``proj_in/out``
    are 1x1 convs on SD1 and Linear on SD2/SDXL).
    """
    t = weights.tensors
    for key in ("lora_mid.weight", "hada_t1", "lokr_t2", "lora_down.weight", "lokr_w2", "diff", "b2.weight"):
        if key in t and t[key].dim() == 4:
            return "conv1x1" if tuple(t[key].shape[2:]) == (1, 1) else "conv3x3"
    if "lora_down.weight" in t:
        return "linear"
    flat = name.replace(".", "_")
    if _CONV3X3_NAMES.search(flat) and not flat.startswith("lora_te"):
        return "conv3x3"
    if _CONV1X1_NAMES.search(flat):
        return "conv1x1"
    if _PROJ_NAMES.search(flat) and family == "sd1" and "transformer_blocks" not in flat:
        return "conv1x1"
    return "linear"


_ALGO_LABEL = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full", "oft": "OFT", "unknown": "unknown",
               "diag_oft": "Diag-OFT", "boft": "BOFT", "ia3": "(IA)^3", "glora": "GLoRA"}  # fmt: skip


def lora_info(path: str | Path, *, top_tags: int = 20) -> dict[str, Any]:
    """A summary of a LoRA file: family, algorithm, module counts per part and per layer kind,
    ranks (full-matrix modules as ``"full"``), DoRA/Tucker counts, kohya block dims, metadata.

    Zero placeholder modules (:func:`zero_placeholder`: the rank-1 all-zero modules a control LoRA carries for
    every Linear it did not train, because diffusers' BFL converter needs every module) count in ``modules``,
    ``parts``, ``kinds`` and ``shapes`` but not in ``ranks``, ``alphas`` or the block dims: ``zero_modules``
    says how many, so the ranks are what trained.

    A file of a layout sdcore cannot apply (:func:`~sdplugin_lora.format.unmappable`: Stable Cascade, XLabs
    IP-Adapters...) is described as well, with ``layout`` (its name) and ``cannot_apply`` (why, and the key that
    tells); both are ``None`` for every other file."""

    from .blocks import block_count, block_index
    from .format import no_modules_error, parse_state_dict, read_state, unmappable

    state, metadata = read_state(path)
    refused = unmappable(state)  # described all the same: info inspects, it applies nothing
    lora = parse_state_dict(state, metadata, Path(path))
    if refused is None and not lora.modules:
        raise no_modules_error(path, state)
    family, why = detect_family(lora)
    parts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    shapes: Counter[str] = Counter({"linear": 0, "conv1x1": 0, "conv3x3": 0})
    ranks: Counter[int | str] = Counter()
    alphas: Counter[float] = Counter()
    dora = tucker = full = zero = 0
    blocks = block_count(family) if family in ("sd1", "sd2", "sdxl") else 0
    block_dims = [0] * blocks
    conv_block_dims = [0] * blocks
    for key, weights in lora.modules.items():
        component = kohya_component(key) or ("unet" if key.startswith("oft_unet_") else None)
        if component is None:
            component = key.split(".", 1)[0] if "." in key else "other"
        parts[component] += 1
        kinds[weights.kind] += 1
        shape = module_shape(key, weights, family)
        shapes[shape] += 1
        dora += weights.is_dora
        tucker += weights.is_tucker
        if zero_placeholder(weights):
            zero += 1
            continue
        if weights.full_matrix or not weights.rank:
            full += 1
            ranks["full"] += 1
        else:
            ranks[weights.rank] += 1
            alphas[weights.alpha] += 1
        if blocks and family is not None and weights.rank:
            index = block_index(key, family)
            if 0 <= index < blocks:
                dims = conv_block_dims if shape == "conv3x3" else block_dims
                dims[index] = max(dims[index], weights.rank)
    labels = sorted({_ALGO_LABEL.get(kind, kind) for kind in kinds})
    if labels == ["LoRA"] and shapes["conv3x3"]:
        labels = ["LoCon"]
    algorithm = ("+".join(labels) or "none") + (" (DoRA)" if dora else "") + (" (Tucker)" if tucker else "")
    meta = lora.metadata
    tags: list[tuple[str, int]] = []
    raw = meta.get("ss_tag_frequency")
    raw_datasets = meta.get("ss_datasets")
    try:
        if raw and raw != "None":
            folders = json.loads(raw)
        elif raw_datasets and raw_datasets != "None":
            # a dataset-config file with ss_datasets alone: kohya's per-dataset tables, merged as kohya merges them
            folders = datasets_tag_frequency(raw_datasets)
        else:
            folders = {}
        counts: Counter[str] = Counter()
        for folder in folders.values():
            counts.update({tag: int(n) for tag, n in folder.items()})
        tags = counts.most_common(top_tags)
    except (ValueError, AttributeError, TypeError):
        tags = []
    has_blocks = any(block_dims) or any(conv_block_dims)
    return {
        "file": str(path),
        # a layout sdcore refuses to apply (read_lora's error): its name and why, None for every other file
        "layout": refused.layout if refused else None,
        "cannot_apply": f"{refused.why} (key {refused.key})" if refused else None,
        "family": family,
        "family_label": family_label(family),
        "family_from": why,
        "architecture": meta.get("modelspec.architecture"),
        "algorithm": algorithm,
        "modules": sum(parts.values()),
        "parts": dict(parts),
        "kinds": dict(kinds),
        "shapes": dict(shapes),
        "ranks": dict(sorted(ranks.items(), key=lambda item: (isinstance(item[0], str), item[0]))),
        "alphas": dict(sorted(alphas.items())),
        "conv3x3_modules": shapes["conv3x3"],
        "dora_modules": dora,
        "tucker_modules": tucker,
        "full_matrix_modules": full,
        "zero_modules": zero,
        "block_dims": block_dims if has_blocks else None,
        "conv_block_dims": conv_block_dims if any(conv_block_dims) else None,
        # lora_up biases and full norm scales (BFL's control LoRAs) apply with the file: said, not hidden
        "bias_modules": sum("lora_up.bias" in weights.tensors for weights in lora.modules.values()),
        "norm_scales": len(lora.norm_scales),
        # a widened img_in (BFL's Depth/Canny control LoRAs, sdcore's --control-lora results) needs a control image
        "control": _control_label(lora),
        "unknown_keys": lora.unknown_keys,
        # bundled embeddings (OneTrainer's pivotal tuning): their prompt words work while the LoRA is in the prompt
        "embeddings": [
            {"name": emb.name, "vectors": emb.num_vectors, "encoders": emb.parts, "description": emb.describe()}
            for emb in lora.bundled
        ],
        "title": meta.get("modelspec.title") or meta.get("ss_output_name"),
        "base_model": meta.get("ss_sd_model_name") or meta.get("sdcore_base_model"),
        "network_module": meta.get("ss_network_module"),
        "hash": meta.get("sshs_model_hash"),
        "top_tags": tags,
        "metadata": meta,
    }


def zero_placeholder(weights: ModuleWeights) -> bool:
    """Whether a module is a placeholder that changes nothing: plain LoRA whose ``lora_down`` and ``lora_up`` (and
    ``lora_up`` bias, if any) are all zero. A control LoRA writes one for each Linear ``--lora-layers`` left out
    (:func:`sdplugin_lora.dit.control_state_dict`); told by content, not by name, so BFL's, diffusers' and other
    tools' files read alike. A module with only ``lora_up`` zero (a LoRA saved before training) is not one."""
    if not weights.plain_lora or "lora_down.weight" not in weights.tensors or "lora_up.weight" not in weights.tensors:
        return False
    return not any(bool(weights.tensors[key].any()) for key in ("lora_down.weight", "lora_up.weight", "lora_up.bias")
                   if key in weights.tensors)  # fmt: skip


def _control_label(lora: LoraFile) -> str | None:
    """What ``lora info`` calls a FLUX.1 LoRA whose ``img_in`` is widened (None for every other file)."""
    from .format import CONTROL_LORA, CONTROL_WIDTH, widened_input

    width = widened_input(lora)
    if width is None:
        return None
    return CONTROL_LORA if width == CONTROL_WIDTH else f"a FLUX.1 LoRA whose img_in takes {width} inputs"


def effective_deltas(lora: LoraFile, base: Any = None) -> dict[str, torch.Tensor]:
    """``W' - W`` of every module, flattened to ``[out, in·k·k]`` and keyed as a LoRA names it
    (:func:`lora_key`); DoRA and OFT modules need ``base``, the model they apply to."""
    family = detect_family(lora)[0]
    weights_of = base_weights(base, lora) if base is not None else {}
    out: dict[str, torch.Tensor] = {}
    for name, weights in lora.modules.items():
        dense = dense_module(lora, name, weights, family=family, base=weights_of.get(name))
        out[dense.key] = dense.delta * dense.scale
    return out


__all__ = [
    "DYNAMIC_METHODS",
    "MIN_SV",
    "DenseModule",
    "ExtractResult",
    "ModuleWeights",
    "ResizeResult",
    "base_weights",
    "dense_module",
    "dynamic_rank",
    "effective_deltas",
    "extract_lora",
    "flux_to_kohya",
    "layer_shape",
    "lora_flat_delta",
    "lora_info",
    "lora_key",
    "merge_into_model",
    "merge_loras",
    "module_shape",
    "oft_for_comfyui",
    "resize_lora",
    "zero_placeholder",
]
