"""Rebuild diffusers configs from the tensor shapes of an ldm/SGM single file.

Used when a file carries no ``sdcore.config`` entry and its layout is not the standard one of
its family (distilled or pruned variants such as SSD-1B or BK-SDM have fewer blocks or
transformer layers). Shapes give every size; what shapes cannot tell is filled with the SD
conventions: GroupNorm with 32 groups (or the largest power of two dividing every norm width),
8 attention heads for conv-projection UNets (SD1) and 64-wide heads otherwise (SD2/SDXL), 64-wide
heads in text encoders. A file that breaks those conventions needs ``config=<diffusers folder>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

from ..errors import ModelFormatError
from .convert.clip import SD1_PREFIX, SDXL_CLIP_L_PREFIX
from .convert.openclip import REFINER_BIGG_PREFIX, SD2_PREFIX, SDXL_BIGG_PREFIX
from .family import get_family

U = "model.diffusion_model."
V = "first_stage_model."


def _groups(widths: Collection[int]) -> int:
    for groups in (32, 16, 8, 4, 2, 1):
        if all(w % groups == 0 for w in widths):
            return groups
    return 1


def _count(keys: Collection[str], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def infer_unet(keys: Collection[str], shape: Callable[[str], tuple[int, ...]], family: str) -> dict[str, Any]:
    in_key = U + "input_blocks.0.0.weight"
    blocks: list[dict[str, Any]] = [{"channels": [], "attn": False, "depth": 1}]
    index = 1
    while U + f"input_blocks.{index}.0.op.weight" in keys or U + f"input_blocks.{index}.0.in_layers.0.weight" in keys:
        if U + f"input_blocks.{index}.0.op.weight" in keys:
            blocks.append({"channels": [], "attn": False, "depth": 1})
        else:
            block = blocks[-1]
            block["channels"].append(shape(U + f"input_blocks.{index}.0.out_layers.3.weight")[0])
            if U + f"input_blocks.{index}.1.proj_in.weight" in keys:
                block["attn"] = True
                block["depth"] = _count(keys, re.escape(U + f"input_blocks.{index}.1.transformer_blocks.") + r"(\d+)\.")
        index += 1
    if not blocks[0]["channels"]:
        raise ModelFormatError("UNet has no input blocks")
    mid_depth = _count(keys, re.escape(U + "middle_block.1.transformer_blocks.") + r"(\d+)\.") or 1
    if not blocks[-1]["attn"]:
        blocks[-1]["depth"] = mid_depth  # diffusers builds the mid block with the last block's depth
    layers = [len(b["channels"]) for b in blocks]
    channels = [b["channels"][-1] for b in blocks]
    linear = False
    cross = None
    for key in keys:
        if key.startswith(U) and key.endswith("proj_in.weight"):
            linear = len(shape(key)) == 2
        if key.startswith(U) and key.endswith("attn2.to_k.weight"):
            cross = shape(key)[1]
    down = ["CrossAttnDownBlock2D" if b["attn"] else "DownBlock2D" for b in blocks]
    up = [t.replace("Down", "Up") for t in reversed(down)]
    config: dict[str, Any] = {
        "sample_size": get_family(family).sample_size,
        "in_channels": shape(in_key)[1],
        "out_channels": shape(U + "out.2.weight")[0],
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": _groups([shape(in_key)[0], *channels]),
        "use_linear_projection": linear,
        "attention_head_dim": [max(1, c // 64) for c in channels] if linear else 8,
        "transformer_layers_per_block": [b["depth"] for b in blocks],
    }
    if cross is not None:
        config["cross_attention_dim"] = cross
    if U + "middle_block.1.proj_in.weight" not in keys:
        config["mid_block_type"] = "UNetMidBlock2D"
    if U + "label_emb.0.0.weight" in keys:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shape(U + "label_emb.0.0.weight")[1]
    return config


def infer_vae(keys: Collection[str], shape: Callable[[str], tuple[int, ...]], family: str) -> dict[str, Any]:
    count = _count(keys, re.escape(V + "encoder.down.") + r"(\d+)\.")
    if count == 0:
        raise ModelFormatError("VAE has no encoder blocks")
    channels = [shape(V + f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(count)]
    layers = _count(keys, re.escape(V + "encoder.down.0.block.") + r"(\d+)\.")
    return {
        "in_channels": shape(V + "encoder.conv_in.weight")[1],
        "out_channels": shape(V + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * count,
        "up_block_types": ["UpDecoderBlock2D"] * count,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": shape(V + "encoder.conv_out.weight")[0] // 2,
        "norm_num_groups": _groups(channels),
        "sample_size": get_family(family).native_resolution,
        "scaling_factor": get_family(family).latent.scaling_factor,
    }


def infer_text_encoder(
    keys: Collection[str], shape: Callable[[str], tuple[int, ...]], prefix: str, openclip: bool, family: str
) -> dict[str, Any]:
    if openclip:
        width = shape(prefix + "ln_final.weight")[0]
        layers = _count(keys, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\.")
        if family == "sd2":
            layers -= 1  # SD2 conditions on the penultimate layer; HF models drop the last block
        intermediate = shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        vocab, positions = shape(prefix + "token_embedding.weight")[0], shape(prefix + "positional_embedding")[0]
        projection = shape(prefix + "text_projection")[1] if prefix + "text_projection" in keys else width
    else:
        base = prefix + "text_model."
        width = shape(base + "final_layer_norm.weight")[0]
        layers = _count(keys, re.escape(base + "encoder.layers.") + r"(\d+)\.")
        intermediate = shape(base + "encoder.layers.0.mlp.fc1.weight")[0]
        vocab = shape(base + "embeddings.token_embedding.weight")[0]
        positions = shape(base + "embeddings.position_embedding.weight")[0]
        projection = width
    with_projection = openclip and family in ("sdxl", "sdxl-refiner")  # SGM's OpenCLIP-G has a text projection
    return {
        "_class_name": "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": positions,
        "hidden_act": "gelu" if openclip else "quick_gelu",
        "projection_dim": projection,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0 if openclip else 49407,
    }


PREFIXES = {
    "sd1": [(SD1_PREFIX, False)],
    "sd2": [(SD2_PREFIX, True)],
    "sdxl": [(SDXL_CLIP_L_PREFIX, False), (SDXL_BIGG_PREFIX, True)],
    "sdxl-refiner": [(REFINER_BIGG_PREFIX, True)],
}


def infer_configs(keys: Collection[str], shape: Callable[[str], tuple[int, ...]], family: str) -> dict[str, Any]:
    """``{"unet", "vae", "text_encoders"}`` configs from the shapes of a single file's tensors."""
    try:
        encoders = [infer_text_encoder(keys, shape, p, o, family) for p, o in PREFIXES[family]]
        unet = infer_unet(keys, shape, family)
        if "projection_class_embeddings_input_dim" in unet:
            pooled = encoders[-1]["projection_dim"]
            time_ids = 5 if family == "sdxl-refiner" else 6  # the refiner conditions on an aesthetic score, not a size
            unet["addition_time_embed_dim"] = max(
                1, (unet["projection_class_embeddings_input_dim"] - pooled) // time_ids
            )
        return {"unet": unet, "vae": infer_vae(keys, shape, family), "text_encoders": encoders}
    except KeyError as exc:
        raise ModelFormatError(f"cannot infer the model layout: tensor {exc} missing") from None


STRUCTURE = {
    "unet": ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
             "use_linear_projection", "transformer_layers_per_block", "projection_class_embeddings_input_dim"),
    "vae": ("block_out_channels", "layers_per_block", "latent_channels"),
    "text_encoders": ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"),
}  # fmt: skip


_DEFAULTS = {"transformer_layers_per_block": 1, "use_linear_projection": False}


def _norm(value: Any, length: int, key: str = "") -> Any:
    if value is None:
        value = _DEFAULTS.get(key)
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool) and length:
        return [value] * length
    return value


def same_structure(standard: dict[str, Any], inferred: dict[str, Any]) -> bool:
    """Do the bundled configs describe the tensors the file has (sizes only)?"""
    for part in ("unet", "vae"):
        blocks = len(inferred[part]["block_out_channels"])
        for key in STRUCTURE[part]:
            a, b = _norm(standard[part].get(key), blocks, key), _norm(inferred[part].get(key), blocks, key)
            if key == "transformer_layers_per_block" and isinstance(a, list) and isinstance(b, list):
                types = inferred[part]["down_block_types"]
                used = [i for i, t in enumerate(types) if "CrossAttn" in t or i == len(types) - 1]
                a, b = [a[i] for i in used if i < len(a)], [b[i] for i in used if i < len(b)]
            if a != b:
                return False
    if len(standard["text_encoders"]) != len(inferred["text_encoders"]):
        return False
    for a, b in zip(standard["text_encoders"], inferred["text_encoders"], strict=True):
        if any(a.get(k) != b.get(k) for k in STRUCTURE["text_encoders"]):
            return False
    return True
