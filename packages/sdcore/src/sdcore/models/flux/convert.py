"""Flux.1 transformer keys: Black Forest Labs' original layout <-> diffusers ``FluxTransformer2DModel``.

Why our own table: the files users have (``flux1-dev.safetensors``, ComfyUI checkpoints under
``model.diffusion_model.``) use BFL's layout, diffusers' converter only goes one way and assumes the
full-size model (``inner_dim = 3072``), and we need both directions (loading, and writing files
ComfyUI/Forge read) for every size including the tiny test model. Facts (from diffusers'
``convert_flux_transformer_checkpoint_to_diffusers``):

- double blocks fuse q, k, v into ``img_attn.qkv`` / ``txt_attn.qkv`` (three equal rows of ``dim``);
- single blocks fuse q, k, v and the MLP input into ``linear1`` (rows ``dim, dim, dim, 4 * dim``) and
  the attention output and MLP output into ``linear2`` (diffusers' ``proj_out``, unchanged);
- the final ``adaLN_modulation.1`` stores (shift, scale), diffusers' ``norm_out.linear`` (scale, shift);
- RMSNorm weights are ``*.norm.query_norm.scale`` / ``key_norm.scale``.

Chroma (lodestones' FLUX.1-schnell derivative) keeps BFL's names for everything it kept: it has no
modulation Linears (``img_mod``/``txt_mod``/``modulation``/``final_layer.adaLN_modulation``) and no
``time_in``/``vector_in``/``guidance_in``; one ``distilled_guidance_layer`` (the approximator) makes
every block's modulation instead (diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers``:
``layers.i.in_layer``/``out_layer`` -> ``linear_1``/``linear_2``, ``norms.i.scale`` -> ``norms.i.weight``).
The plan below is one table for both: ``approximator`` (its layer count) selects Chroma's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import ModelFormatError

#: ComfyUI / SAI all-in-one files keep the transformer under this prefix
COMFY_PREFIX = "model.diffusion_model."
#: the first double block's fused image qkv: present in every Flux.1 transformer file
PROBE = "double_blocks.0.img_attn.qkv.weight"
GUIDANCE_PROBE = "guidance_in.in_layer.weight"
#: Chroma's approximator input: present in every Chroma transformer file (BFL and diffusers names alike)
CHROMA_PROBE = "distilled_guidance_layer.in_proj.weight"
_APPROXIMATOR = "distilled_guidance_layer"
#: the rotary axes of the released models (head dim 128); not stored in the weights
RELEASED_AXES = (16, 56, 56)

_GLOBAL = (  # (diffusers module, BFL module); each has .weight and .bias
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("proj_out", "final_layer.linear"),
)
_GUIDANCE = (
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
)
_DOUBLE = (  # renamed modules of double block i: transformer_blocks.i <-> double_blocks.i
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
)
_DOUBLE_NORMS = (
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
)
_DOUBLE_FUSED = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv"),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv"),
)
_SINGLE = (("norm.linear", "modulation.lin"), ("proj_out", "linear2"))
_SINGLE_NORMS = (("attn.norm_q.weight", "norm.query_norm.scale"), ("attn.norm_k.weight", "norm.key_norm.scale"))
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # = linear1, rows dim, dim, dim, 4 dim


@dataclass(frozen=True)
class Group:
    """One BFL tensor and the diffusers tensor(s) it holds.

    ``op``: ``"same"`` (renamed), ``"cat"`` (diffusers parts stacked along rows in BFL) or
    ``"swap"`` (the two row halves exchanged: the final layer's shift/scale).
    """

    bfl: str
    diffusers: tuple[str, ...]
    op: str = "same"


#: modules a Chroma transformer lacks (its approximator makes the modulations; no time/vector/guidance input)
_NOT_IN_CHROMA = ("time_in.", "vector_in.", "guidance_in.", "img_mod.", "txt_mod.", "modulation.")


def key_plan(num_double: int, num_single: int, guidance: bool, approximator: int | None = None) -> list[Group]:
    """Every tensor of a Flux.1 transformer of this shape, as :class:`Group` s; with ``approximator``
    (its layer count), of a Chroma transformer (see the module doc)."""
    plan: list[Group] = []
    chroma = approximator is not None

    def linear(diff: str, bfl: str, op: str = "same") -> None:
        for kind in ("weight", "bias"):
            plan.append(Group(f"{bfl}.{kind}", (f"{diff}.{kind}",), op))

    for diff, bfl in _GLOBAL + (_GUIDANCE if guidance and not chroma else ()):
        if not (chroma and bfl.startswith(_NOT_IN_CHROMA)):
            linear(diff, bfl)
    if chroma:
        a = _APPROXIMATOR
        linear(f"{a}.in_proj", f"{a}.in_proj")
        linear(f"{a}.out_proj", f"{a}.out_proj")
        for i in range(approximator or 0):
            linear(f"{a}.layers.{i}.linear_1", f"{a}.layers.{i}.in_layer")
            linear(f"{a}.layers.{i}.linear_2", f"{a}.layers.{i}.out_layer")
            plan.append(Group(f"{a}.norms.{i}.scale", (f"{a}.norms.{i}.weight",)))
    else:
        linear("norm_out.linear", "final_layer.adaLN_modulation.1", "swap")
    for i in range(num_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for diff, bfl in _DOUBLE:
            if not (chroma and bfl.startswith(_NOT_IN_CHROMA)):
                linear(d + diff, b + bfl)
        plan += [Group(b + bfl, (d + diff,)) for diff, bfl in _DOUBLE_NORMS]
        for parts, bfl in _DOUBLE_FUSED:
            for kind in ("weight", "bias"):
                plan.append(Group(f"{b}{bfl}.{kind}", tuple(f"{d}{p}.{kind}" for p in parts), "cat"))
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for diff, bfl in _SINGLE:
            if not (chroma and bfl.startswith(_NOT_IN_CHROMA)):
                linear(d + diff, b + bfl)
        plan += [Group(b + bfl, (d + diff,)) for diff, bfl in _SINGLE_NORMS]
        for kind in ("weight", "bias"):
            plan.append(Group(f"{b}linear1.{kind}", tuple(f"{d}{p}.{kind}" for p in _SINGLE_FUSED), "cat"))
    return plan


def _count_blocks(keys: Collection[str], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    if found and found != set(range(len(found))):
        raise ModelFormatError(f"Flux transformer blocks are not numbered 0..{len(found) - 1}: {sorted(found)[:8]}")
    return len(found)


def bfl_counts(keys: Collection[str], prefix: str = "") -> tuple[int, int, bool]:
    """(double blocks, single blocks, has guidance embedding) of BFL-layout ``keys`` under ``prefix``."""
    p = re.escape(prefix)
    return (
        _count_blocks(keys, p + r"double_blocks\.(\d+)\."),
        _count_blocks(keys, p + r"single_blocks\.(\d+)\."),
        prefix + GUIDANCE_PROBE in keys,
    )


def approximator_layers(keys: Collection[str], prefix: str = "") -> int | None:
    """Chroma's approximator depth (``distilled_guidance_layer.layers.N``), or ``None`` for a Flux.1 transformer
    (the same in BFL and diffusers names)."""
    if prefix + CHROMA_PROBE not in keys:
        return None
    return _count_blocks(keys, re.escape(prefix) + re.escape(_APPROXIMATOR) + r"\.layers\.(\d+)\.")


def diffusers_counts(keys: Collection[str]) -> tuple[int, int, bool]:
    return (
        _count_blocks(keys, r"transformer_blocks\.(\d+)\."),
        _count_blocks(keys, r"single_transformer_blocks\.(\d+)\."),
        "time_text_embed.guidance_embedder.linear_1.weight" in keys,
    )


def _swap_halves(value: Any) -> Any:
    import torch

    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_to_diffusers(
    keys: Collection[str], get: Callable[[str], Any], prefix: str = "", *, inner_dim: int | None = None
) -> dict[str, Any]:
    """The diffusers state dict of a BFL-layout transformer whose tensors are ``get(prefix + key)``.

    Strict: a tensor the plan expects but the file lacks is a :class:`ModelFormatError`; tensors of
    other parts (VAE, text encoders under their own prefixes) are ignored, unknown tensors under
    ``prefix`` are an error. Split tensors are row views of the file's tensor (no copy).
    """
    num_double, num_single, guidance = bfl_counts(keys, prefix)
    if num_double == 0:
        raise ModelFormatError(f"not a Flux.1 transformer: no {prefix}{PROBE}")
    dim = inner_dim or _shape_rows(get(prefix + "img_in.weight"))
    plan = key_plan(num_double, num_single, guidance, approximator_layers(keys, prefix))
    wanted = {prefix + g.bfl for g in plan}
    if prefix:
        extra = sorted(k for k in keys if k.startswith(prefix) and k not in wanted)
    else:
        extra = sorted(k for k in keys if _is_transformer_key(k) and k not in wanted)
    if extra:
        raise ModelFormatError(f"unknown Flux transformer tensor(s): {', '.join(extra[:3])}")
    out: dict[str, Any] = {}
    for group in plan:
        key = prefix + group.bfl
        if key not in keys:
            raise ModelFormatError(f"Flux transformer tensor {key!r} missing from the file")
        value = get(key)
        if group.op == "same":
            out[group.diffusers[0]] = value
        elif group.op == "swap":
            out[group.diffusers[0]] = _swap_halves(value)
        else:
            sizes = [dim] * 3 if len(group.diffusers) == 3 else [dim, dim, dim, value.shape[0] - 3 * dim]
            if sum(sizes) != value.shape[0] or sizes[-1] <= 0:
                raise ModelFormatError(f"Flux tensor {key!r} has {value.shape[0]} rows, not a fused {sizes}")
            for name, part in zip(group.diffusers, value.split(sizes, dim=0), strict=True):
                out[name] = part
    return out


def diffusers_to_bfl(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """BFL-layout tensors (under ``prefix``) of a diffusers ``FluxTransformer2DModel`` state dict.

    Fused tensors are new tensors (``torch.cat``); renamed ones are the same tensor objects.
    """
    import torch

    num_double, num_single, guidance = diffusers_counts(state.keys())
    plan = key_plan(num_double, num_single, guidance, approximator_layers(state.keys()))
    used = {name for group in plan for name in group.diffusers}
    extra = sorted(set(state) - used)
    if extra:
        raise ModelFormatError(f"unknown diffusers Flux transformer tensor(s): {', '.join(extra[:3])}")
    out: dict[str, Any] = {}
    for group in plan:
        missing = [name for name in group.diffusers if name not in state]
        if missing:
            raise ModelFormatError(f"diffusers Flux transformer tensor {missing[0]!r} missing")
        parts = [state[name] for name in group.diffusers]
        if group.op == "same":
            out[prefix + group.bfl] = parts[0]
        elif group.op == "swap":
            out[prefix + group.bfl] = _swap_halves(parts[0])
        else:
            out[prefix + group.bfl] = torch.cat(parts, dim=0)
    return out


_TRANSFORMER_ROOTS = (
    "double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",
    f"{_APPROXIMATOR}.",
)  # fmt: skip


def _is_transformer_key(key: str) -> bool:
    return key.startswith(_TRANSFORMER_ROOTS)


def _shape_rows(value: Any) -> int:
    return int(value.shape[0])


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes (time/text, height, width) for a head width; not stored in the weights.

    The released models (head 128) use (16, 56, 56). Other widths (our tiny model: 16 -> (4, 6, 6))
    give a quarter to the first axis and split the rest evenly; a width that does not split into
    even parts needs the config of its own model (``config=``).
    """
    if head_dim == 128:
        return RELEASED_AXES
    first = head_dim // 4
    rest = head_dim - first
    if first % 2 or rest % 4:
        raise ModelFormatError(
            f"Flux head width {head_dim}: cannot tell its rotary axes; pass config=<diffusers folder> of the model"
        )
    return (first, rest // 2, rest // 2)


def transformer_config_from_bfl(
    keys: Collection[str], shape: Callable[[str], tuple[int, ...]], prefix: str = ""
) -> dict[str, Any]:
    """A diffusers ``FluxTransformer2DModel`` (or ``ChromaTransformer2DModel``) config from the shapes of a
    BFL-layout file.

    ``mlp_ratio`` is fixed at 4 in diffusers; ``patch_size`` 1 (Flux packs 2x2 latent patches
    outside the model, so ``in_channels`` is 4 x the latent channels).
    """
    num_double, num_single, guidance = bfl_counts(keys, prefix)
    if num_double == 0:
        raise ModelFormatError(f"not a Flux.1 transformer: no {prefix}{PROBE}")
    inner, in_channels = shape(prefix + "img_in.weight")
    head_dim = shape(prefix + "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    mlp_rows = shape(prefix + "double_blocks.0.img_mlp.0.weight")[0]
    out_channels = shape(prefix + "final_layer.linear.weight")[0]
    if mlp_rows != 4 * inner:
        raise ModelFormatError(f"Flux transformer MLP width {mlp_rows} is not 4 x {inner} (unsupported variant)")
    layers = approximator_layers(keys, prefix)
    if layers is not None:  # Chroma: no pooled projection or guidance embedding; the approximator's sizes
        hidden, channels = shape(prefix + CHROMA_PROBE)
        return {
            "_class_name": "ChromaTransformer2DModel",
            "patch_size": 1,
            "in_channels": in_channels,
            "out_channels": None if out_channels == in_channels else out_channels,
            "num_layers": num_double,
            "num_single_layers": num_single,
            "attention_head_dim": head_dim,
            "num_attention_heads": inner // head_dim,
            "joint_attention_dim": shape(prefix + "txt_in.weight")[1],
            "axes_dims_rope": list(rope_axes(head_dim)),
            "approximator_num_channels": channels,
            "approximator_hidden_dim": hidden,
            "approximator_layers": layers,
        }
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,  # None: as in_channels
        "num_layers": num_double,
        "num_single_layers": num_single,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shape(prefix + "txt_in.weight")[1],
        "pooled_projection_dim": shape(prefix + "vector_in.in_layer.weight")[1],
        "guidance_embeds": guidance,
        "axes_dims_rope": list(rope_axes(head_dim)),
    }
