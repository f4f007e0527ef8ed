"""SD3/SD3.5 MMDiT keys: Stability's original layout (``joint_blocks``) <-> diffusers ``SD3Transformer2DModel``.

One table of rules, built from the model's shape (layer count, dual-attention layers, QK norm), serves
both directions, so reading and writing can never disagree. Three kinds of rule:

* ``rename``: the same tensor under another name;
* ``qkv``: SAI stores the q, k and v projections as one fused ``qkv`` tensor (rows q, then k, then v);
  diffusers has three ``Linear`` layers;
* ``swap``: SAI's final ``adaLN_modulation`` (and the last block's context modulation, which is an
  ``AdaLayerNormContinuous`` in diffusers) produce ``shift, scale``; diffusers splits ``scale, shift``,
  so the two row halves are exchanged (an involution: the same operation in both directions).

The last joint block is "context pre-only": its context stream has q, k, v and a modulation but no
output projection and no MLP (nothing reads the text tokens after it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ...errors import ModelFormatError

#: prefix of the denoiser in SAI / ComfyUI checkpoints (diffusion-model-only files have none)
SAI_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

RuleKind = Literal["rename", "qkv", "swap"]
Getter = Callable[[str], Any]


@dataclass(frozen=True)
class Rule:
    sai: str  # key without the ``model.diffusion_model.`` prefix
    diffusers: tuple[str, ...]  # one key, or (q, k, v) for ``qkv``
    kind: RuleKind = "rename"


@dataclass(frozen=True)
class MMDiTShape:
    """What the key table depends on; read from a diffusers config or from a file's keys."""

    num_layers: int
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: bool = False


def shape_from_config(config: Mapping[str, Any]) -> MMDiTShape:
    return MMDiTShape(
        num_layers=int(config["num_layers"]),
        dual_attention_layers=tuple(int(i) for i in (config.get("dual_attention_layers") or ())),
        qk_norm=bool(config.get("qk_norm")),
    )


_BLOCK = re.compile(r"joint_blocks\.(\d+)\.")


def strip_prefix(keys: Collection[str]) -> tuple[str, list[str]]:
    """(prefix, denoiser keys without it): ``model.diffusion_model.`` for full checkpoints, ``""`` for
    diffusion-model-only files (ComfyUI's ``models/diffusion_models``)."""
    inner = [k[len(SAI_PREFIX) :] for k in keys if k.startswith(SAI_PREFIX)]
    if inner:
        return SAI_PREFIX, inner
    return "", [k for k in keys if k.startswith(("joint_blocks.", "x_embedder.", "final_layer.", "pos_embed"))]


def shape_from_keys(keys: Collection[str]) -> MMDiTShape:
    """The table's shape from SAI keys (with or without the ``model.diffusion_model.`` prefix)."""
    _, inner = strip_prefix(keys)
    blocks = {int(m.group(1)) for k in inner if (m := _BLOCK.match(k))}
    if not blocks:
        raise ModelFormatError("no SD3 joint_blocks in the file")
    if blocks != set(range(max(blocks) + 1)):
        raise ModelFormatError(f"SD3 joint_blocks are not numbered 0..{max(blocks)} (file incomplete?)")
    dual = sorted({int(m.group(1)) for k in inner if (m := _BLOCK.match(k)) and ".x_block.attn2." in k})
    qk_norm = any(k.endswith("attn.ln_q.weight") for k in inner)
    return MMDiTShape(len(blocks), tuple(dual), qk_norm)


#: keys only diffusers' ``SD3Transformer2DModel`` state dict has (Flux's has ``single_transformer_blocks``)
_DIFFUSERS_MARKERS = ("pos_embed.proj.weight", "context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight")
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def is_diffusers_mmdit(keys: Collection[str]) -> bool:
    """A transformer saved in diffusers' own names (``transformer/diffusion_pytorch_model.safetensors``)."""
    return all(k in keys for k in _DIFFUSERS_MARKERS) and not any(
        k.startswith("single_transformer_blocks.") for k in keys
    )


def shape_from_diffusers_keys(keys: Collection[str]) -> MMDiTShape:
    blocks = {int(m.group(1)) for k in keys if (m := _DIFFUSERS_BLOCK.match(k))}
    dual = sorted({int(m.group(1)) for k in keys if (m := _DIFFUSERS_BLOCK.match(k)) and ".attn2." in k})
    return MMDiTShape(max(blocks) + 1, tuple(dual), "transformer_blocks.0.attn.norm_q.weight" in keys)


def sai_view(
    keys: Collection[str], shape: Callable[[str], tuple[int, ...]]
) -> tuple[set[str], Callable[[str], tuple[int, ...]]]:
    """The SAI key names and shapes a diffusers-layout transformer would have (for config inference)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in mmdit_rules(shape_from_diffusers_keys(keys)):
        first = shape(rule.diffusers[0])
        shapes[rule.sai] = (3 * first[0], *first[1:]) if rule.kind == "qkv" else first
    return set(shapes), shapes.__getitem__


def _linear(sai: str, diffusers: str, bias: bool = True) -> list[Rule]:
    names = ("weight", "bias") if bias else ("weight",)
    return [Rule(f"{sai}.{n}", (f"{diffusers}.{n}",)) for n in names]


def _qkv(sai: str, q: str, k: str, v: str) -> list[Rule]:
    return [Rule(f"{sai}.{n}", (f"{q}.{n}", f"{k}.{n}", f"{v}.{n}"), "qkv") for n in ("weight", "bias")]


def _swap(sai: str, diffusers: str) -> list[Rule]:
    return [Rule(f"{sai}.{n}", (f"{diffusers}.{n}",), "swap") for n in ("weight", "bias")]


def mmdit_rules(shape: MMDiTShape) -> list[Rule]:
    """Every tensor of the MMDiT: SAI name, diffusers name(s), and how they relate."""
    rules: list[Rule] = [
        Rule("pos_embed", ("pos_embed.pos_embed",)),
        *_linear("x_embedder.proj", "pos_embed.proj"),
        *_linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        *_linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        *_linear("context_embedder", "context_embedder"),
        *_linear("final_layer.linear", "proj_out"),
        *_swap("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ]
    for i in range(shape.num_layers):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        last = i == shape.num_layers - 1
        rules += _qkv(f"{x}.attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
        rules += _linear(f"{x}.attn.proj", f"{d}.attn.to_out.0")
        rules += _linear(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear")
        rules += _linear(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj")
        rules += _linear(f"{x}.mlp.fc2", f"{d}.ff.net.2")
        rules += _qkv(f"{c}.attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")
        if shape.qk_norm:
            rules += _linear(f"{x}.attn.ln_q", f"{d}.attn.norm_q", bias=False)
            rules += _linear(f"{x}.attn.ln_k", f"{d}.attn.norm_k", bias=False)
            rules += _linear(f"{c}.attn.ln_q", f"{d}.attn.norm_added_q", bias=False)
            rules += _linear(f"{c}.attn.ln_k", f"{d}.attn.norm_added_k", bias=False)
        if last:
            rules += _swap(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear")
        else:
            rules += _linear(f"{c}.attn.proj", f"{d}.attn.to_add_out")
            rules += _linear(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear")
            rules += _linear(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj")
            rules += _linear(f"{c}.mlp.fc2", f"{d}.ff_context.net.2")
        if i in shape.dual_attention_layers:
            rules += _qkv(f"{x}.attn2.qkv", f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v")
            rules += _linear(f"{x}.attn2.proj", f"{d}.attn2.to_out.0")
            if shape.qk_norm:
                rules += _linear(f"{x}.attn2.ln_q", f"{d}.attn2.norm_q", bias=False)
                rules += _linear(f"{x}.attn2.ln_k", f"{d}.attn2.norm_k", bias=False)
    return rules


#: an SAI x_block's tensors in the order kohya's own MMDiT lists them (library/sd3_models.py SingleDiTBlock:
#: attn (qkv, proj, ln_q, ln_k), attn2 likewise, mlp (fc1, fc2), adaLN_modulation; weight before bias)
_KOHYA_X_BLOCK_ORDER = ("attn.qkv.", "attn.proj.", "attn.ln_q.", "attn.ln_k.", "attn2.qkv.", "attn2.proj.",
                        "attn2.ln_q.", "attn2.ln_k.", "mlp.fc1.", "mlp.fc2.", "adaLN_modulation.1.")  # fmt: skip


def kohya_x_block_rules(shape: MMDiTShape) -> list[Rule]:
    """The image-stream (``x_block``) tensors of every joint block, in the order kohya's MMDiT
    ``named_parameters()`` gives them (block by block), which is what kohya's sd3_train.py
    ``--num_last_block_to_freeze`` counts from the end. A fused SAI ``qkv`` tensor is one entry that names
    its three diffusers tensors."""

    def order(rule: Rule) -> tuple[int, int, int]:
        match = _BLOCK.match(rule.sai)
        assert match is not None
        rest = rule.sai.split(".x_block.", 1)[1]
        part = next(i for i, prefix in enumerate(_KOHYA_X_BLOCK_ORDER) if rest.startswith(prefix))
        return int(match.group(1)), part, 0 if rest.endswith(".weight") else 1

    return sorted((rule for rule in mmdit_rules(shape) if ".x_block." in rule.sai), key=order)


def swap_halves(tensor: Any) -> Any:
    """``[a; b] -> [b; a]`` along rows: SAI's ``shift, scale`` <-> diffusers' ``scale, shift``."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_from_sai(shape: MMDiTShape, get: Getter, prefix: str = SAI_PREFIX) -> dict[str, Any]:
    """diffusers state dict of the transformer, reading SAI tensors through ``get(full key)``."""
    out: dict[str, Any] = {}
    for rule in mmdit_rules(shape):
        value = get(prefix + rule.sai)
        if rule.kind == "qkv":
            if value.shape[0] % 3:
                raise ModelFormatError(f"{prefix + rule.sai}: fused qkv has {value.shape[0]} rows, not a multiple of 3")
            out.update(zip(rule.diffusers, value.chunk(3, dim=0), strict=True))
        elif rule.kind == "swap":
            out[rule.diffusers[0]] = swap_halves(value)
        else:
            out[rule.diffusers[0]] = value
    return out


def mmdit_to_sai(shape: MMDiTShape, state: Mapping[str, Any], prefix: str = SAI_PREFIX) -> dict[str, Any]:
    """SAI-layout tensors (keys with ``prefix``) of a diffusers transformer state dict."""
    import torch

    out: dict[str, Any] = {}
    used: set[str] = set()
    for rule in mmdit_rules(shape):
        try:
            parts = [state[key] for key in rule.diffusers]
        except KeyError as exc:
            raise ModelFormatError(f"transformer has no tensor {exc} (not an SD3 MMDiT of this shape)") from None
        used.update(rule.diffusers)
        if rule.kind == "qkv":
            out[prefix + rule.sai] = torch.cat(parts, dim=0)
        elif rule.kind == "swap":
            out[prefix + rule.sai] = swap_halves(parts[0])
        else:
            out[prefix + rule.sai] = parts[0]
    left = sorted(set(state) - used)
    if left:
        raise ModelFormatError(f"transformer tensors with no SAI name: {', '.join(left[:3])}")
    return out
