"""Whole-model conversion: diffusers/transformers modules <-> one ldm/SGM state dict.

``plan_*`` functions return, per module key, how to fetch its tensor from a single file, so the
loader can build modules on the meta device and assign the file's tensors directly (no random
init, no second copy). ``modules_to_ldm`` is the writer's direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import ModelFormatError
from ..detect import TEXT_ENCODER_PREFIXES
from .clip import clip_key_map, from_canonical, has_text_model_level, to_canonical
from .openclip import load_openclip, save_openclip
from .unet import unet_key_map
from .vae import is_conv_attention, vae_key_map

Getter = Callable[[str], Any]


def _config(module: Any) -> dict[str, Any]:
    return dict(module.config)


def unet_tensors(unet: Any, get: Getter) -> dict[str, Any]:
    mapping = unet_key_map(list(unet.state_dict().keys()), _config(unet))
    return {key: get(file_key) for key, file_key in mapping.items()}


def vae_tensors(vae: Any, get: Getter) -> dict[str, Any]:
    mapping = vae_key_map(list(vae.state_dict().keys()), len(vae.config.block_out_channels))
    return {key: get(file_key) for key, file_key in mapping.items()}


def text_encoder_tensors(module: Any, prefix: str, openclip: bool, get: Getter) -> dict[str, Any]:
    wrapped = has_text_model_level(module)
    keys = list(module.state_dict().keys())
    if openclip:
        canonical = load_openclip([to_canonical(k, wrapped) for k in keys], prefix, get)
        return {from_canonical(k, wrapped): v for k, v in canonical.items()}
    return {key: get(file_key) for key, file_key in clip_key_map(keys, prefix, wrapped).items()}


def modules_to_ldm(family: str, unet: Any, vae: Any, text_encoders: list[Any]) -> dict[str, Any]:
    """Every weight of the model under its ldm/SGM file key (tensors are not copied)."""
    out: dict[str, Any] = {}
    state = unet.state_dict()
    for key, file_key in unet_key_map(list(state), _config(unet)).items():
        out[file_key] = state[key]
    state = vae.state_dict()
    for key, file_key in vae_key_map(list(state), len(vae.config.block_out_channels)).items():
        value = state[key]
        if is_conv_attention(file_key) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[file_key] = value
    slots = TEXT_ENCODER_PREFIXES[family]
    if len(slots) != len(text_encoders):
        raise ModelFormatError(f"{family} needs {len(slots)} text encoder(s), the model has {len(text_encoders)}")
    for module, (prefix, openclip) in zip(text_encoders, slots, strict=True):
        wrapped = has_text_model_level(module)
        state = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        if openclip:
            canonical = {to_canonical(k, wrapped): v for k, v in state.items()}
            out.update(save_openclip(canonical, prefix, restore_penultimate=family == "sd2"))
        else:
            for key, file_key in clip_key_map(list(state), prefix, wrapped).items():
                out[file_key] = state[key]
    return out
