"""transformers CLIP text encoder <-> OpenCLIP layout (SD2 ``cond_stage_model.model.``, SDXL bigG).

OpenCLIP packs q/k/v into ``attn.in_proj_weight`` (``cat([q, k, v], 0)``), names layers
``transformer.resblocks.N``, and stores ``text_projection`` as the matrix P used as ``x @ P``, so
the HF Linear weight is ``P.T`` (diffusers' rule). SD2 conditions on the penultimate layer, so its
HF model has one layer fewer than the file; on save we restore that last block (a copy of the
previous one), ``text_projection`` and ``logit_scale`` so other tools find the keys they expect.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

SD2_PREFIX = "cond_stage_model.model."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."

_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.*)")
_SUB = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def file_source(canonical_key: str) -> tuple[str, int | None, bool]:
    """Where a canonical HF key lives in an OpenCLIP file: (key, q/k/v chunk index, transposed)."""
    if canonical_key in _TOP:
        return _TOP[canonical_key], None, False
    if canonical_key == "text_projection.weight":
        return "text_projection", None, True
    match = _LAYER.match(canonical_key)
    if match:
        layer, rest = match.groups()
        base = f"transformer.resblocks.{layer}."
        attn = re.match(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$", rest)
        if attn:
            return f"{base}attn.in_proj_{attn.group(2)}", _QKV[attn.group(1)], False
        for name, target in _SUB.items():
            if rest.startswith(name):
                return base + target + rest[len(name) :], None, False
    raise KeyError(canonical_key)


def load_openclip(canonical_keys: list[str], prefix: str, get: Callable[[str], Any]) -> dict[str, Any]:
    """Build ``{canonical key: tensor}`` from an OpenCLIP file via ``get(file key)``.

    Packed q/k/v are read once and split; the parts are cloned so no parameter shares storage
    with another (safetensors refuses to save shared tensors).
    """
    packed: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for key in canonical_keys:
        file_key, chunk, transposed = file_source(key)
        full = prefix + file_key
        if chunk is not None:
            if full not in packed:
                packed[full] = get(full)
            out[key] = packed[full].chunk(3, dim=0)[chunk].clone()
        elif transposed:
            out[key] = get(full).T.contiguous()
        else:
            out[key] = get(full)
    return out


def save_openclip(tensors: dict[str, Any], prefix: str, *, restore_penultimate: bool) -> dict[str, Any]:
    """``{file key: tensor}`` in OpenCLIP layout from ``{canonical key: tensor}``."""
    import torch

    out: dict[str, Any] = {}
    qkv: dict[str, list[Any]] = {}
    for key, value in tensors.items():
        file_key, chunk, transposed = file_source(key)
        if chunk is not None:
            qkv.setdefault(file_key, [None, None, None])[chunk] = value
        else:
            out[prefix + file_key] = value.T.contiguous() if transposed else value
    for file_key, parts in qkv.items():
        out[prefix + file_key] = torch.cat(parts, dim=0)
    layers = sorted({int(m.group(1)) for k in tensors if (m := _LAYER.match(k))})
    width = tensors["text_model.final_layer_norm.weight"].shape[0]
    dtype = tensors["text_model.final_layer_norm.weight"].dtype
    if restore_penultimate and layers:
        last = layers[-1]
        source = f"{prefix}transformer.resblocks.{last}."
        target = f"{prefix}transformer.resblocks.{last + 1}."
        for key in [k for k in out if k.startswith(source)]:
            out[target + key[len(source) :]] = out[key].clone()
    if prefix + "text_projection" not in out:
        out[prefix + "text_projection"] = torch.eye(width, dtype=dtype)
    out[prefix + "logit_scale"] = torch.tensor(math.log(100.0), dtype=dtype)
    return out
