"""diffusers ``AutoencoderKL`` key <-> ldm ``first_stage_model.*`` key.

The decoder's up blocks are numbered in reverse in ldm (``decoder.up.{N-1-i}``); the mid-block
attention is a 1x1 conv in ldm (4-D weights) and Linear in diffusers (2-D), see :func:`ldm_shape`.
"""

from __future__ import annotations

import re

from ...errors import ModelFormatError

PREFIX = "first_stage_model."

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTN_LINEAR = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """The ldm name (without ``first_stage_model.``) of diffusers VAE key ``key``."""
    out = key
    match = re.match(
        r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key
    )
    if match:
        part, blocks, i, kind, j, rest = match.groups()
        index = int(i) if blocks == "down_blocks" else num_blocks - 1 - int(i)
        ldm_block = "down" if blocks == "down_blocks" else "up"
        if kind == "resnets":
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            return f"{part}.{ldm_block}.{index}.block.{j}.{rest}"
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{part}.{ldm_block}.{index}.{sampler}.{rest}"
    match = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if match:
        part, kind, j, rest = match.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(j) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        for name, target in _ATTN.items():
            if rest.startswith(name + "."):
                return f"{part}.mid.attn_1.{target}{rest[len(name) :]}"
        raise ModelFormatError(f"VAE key {key!r} has no ldm equivalent")
    if re.match(r"(encoder|decoder)\.conv_norm_out\.", key):
        return key.replace("conv_norm_out", "norm_out")
    if re.match(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.", key):
        return out
    raise ModelFormatError(f"VAE key {key!r} has no ldm equivalent (unsupported VAE layout)")


def vae_key_map(keys: list[str], num_blocks: int) -> dict[str, str]:
    """``{diffusers key: full ldm key}`` for a VAE with ``num_blocks`` down/up blocks."""
    return {key: PREFIX + vae_key_to_ldm(key, num_blocks) for key in keys}


def is_conv_attention(ldm_key: str) -> bool:
    """True for the mid-attention projections ldm stores as 1x1 convs."""
    return bool(_ATTN_LINEAR.search(ldm_key))
