"""Is a single file SD3/SD3.5, and which release: from its keys and shapes only (no tensor is read).

* SD3 (medium): no QK norm, no second attention in the image stream;
* SD3.5 large (and large turbo): QK RMS norm (``attn.ln_q``), no second attention;
* SD3.5 medium: QK norm plus ``x_block.attn2`` (dual attention, MMDiT-X) in its first blocks.

A file may hold the whole model (``model.diffusion_model.*``, ``first_stage_model.*``,
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``: SAI's releases and ComfyUI's checkpoint saves),
or the denoiser alone with bare ``joint_blocks.*`` keys (ComfyUI's ``models/diffusion_models``) or in
diffusers' own names (a ``transformer/`` folder's weights file).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .convert import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    SAI_PREFIX,
    T5_PREFIX,
    VAE_PREFIX,
    is_diffusers_mmdit,
    shape_from_keys,
)

_MARKERS = (SAI_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.weight")


def is_sd3_file(keys: Collection[str]) -> bool:
    """``joint_blocks`` (SAI's MMDiT) or diffusers' ``SD3Transformer2DModel`` names => SD3/SD3.5."""
    return any(marker in keys for marker in _MARKERS) or is_diffusers_mmdit(keys)


@dataclass(frozen=True)
class Sd3Contents:
    variant: str  # "sd3", "sd3.5-large", "sd3.5-medium"
    num_layers: int
    has_vae: bool
    has_clip_l: bool
    has_clip_g: bool
    has_t5: bool

    @property
    def label(self) -> str:
        return VARIANT_LABELS[self.variant]


VARIANT_LABELS = {"sd3": "SD3 medium", "sd3.5-large": "SD3.5 large", "sd3.5-medium": "SD3.5 medium"}


def release_label(config: Any) -> str:
    """The release a transformer config is shaped like (``SD3.5 medium``...), for ``model info``."""
    dual = bool(config.get("dual_attention_layers"))
    return VARIANT_LABELS[variant_of(int(config["num_layers"]), dual, bool(config.get("qk_norm")))]


def variant_of(num_layers: int, dual_attention: bool, qk_norm: bool) -> str:
    if dual_attention:
        return "sd3.5-medium"
    if qk_norm:
        return "sd3.5-large"
    return "sd3"


def sd3_contents(keys: Collection[str]) -> Sd3Contents:
    shape = shape_from_keys(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    return Sd3Contents(
        variant=variant_of(shape.num_layers, bool(shape.dual_attention_layers), shape.qk_norm),
        num_layers=shape.num_layers,
        has_vae=has(VAE_PREFIX),
        has_clip_l=has(CLIP_L_PREFIX),
        has_clip_g=has(CLIP_G_PREFIX),
        has_t5=has(T5_PREFIX),
    )
