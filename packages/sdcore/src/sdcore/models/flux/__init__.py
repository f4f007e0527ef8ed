"""Flux.1 (dev and schnell): the family declaration, model parts, file layouts and adapter.

Import-light (no torch here): ``convert`` maps BFL's original transformer keys to diffusers' and
back, ``tiny`` builds the tiny test model and holds the released configs, ``load`` reads folders
and the single files users have, ``adapter`` is the family's
:class:`~sdcore.models.family.FamilyAdapter` (prompt encoding, latent packing, prediction).
"""

from __future__ import annotations

from ..family import LatentFormat, ModelFamily, RoutedInputs, TextEncoderSpec

FLUX = ModelFamily(
    name="flux",
    label="FLUX.1",
    denoiser="transformer",
    # T5 tokens: 512 as FLUX.1-dev's pipeline; schnell models use 256 (the adapter picks per model)
    text_encoders=(TextEncoderSpec("text_encoder", "clip-l", 77), TextEncoderSpec("text_encoder_2", "t5-xxl", 512)),
    latent=LatentFormat(channels=16, scaling_factor=0.3611, shift_factor=0.1159),
    objective="flow-matching",
    native_resolution=1024,
    adapter="sdcore.models.flux.adapter:FluxAdapter",
    # kohya sd-scripts' Flux LoRA names (networks/lora_flux.py): T5 is lora_te3 as in SD3
    lora_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
    inpaints=True,
    # kohya caches T5-XXL's outputs while CLIP trains (cache_text_encoder_outputs without network_train_unet_only)
    partial_text_cache=("text_encoder_2",),
    # diffusers' double and single blocks both take (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
    # joint_attention_kwargs) and return (encoder_hidden_states, hidden_states); RoPE rows are [text | image]
    token_routing=RoutedInputs(rope="image_rotary_emb", mask="joint_attention_kwargs.attention_mask", patch=2),
)

__all__ = ["FLUX"]
