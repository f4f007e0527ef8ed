"""Stable Diffusion 3 / 3.5: the ``sd3`` model family (MMDiT, CLIP-L + CLIP-G + T5-XXL, 16-channel VAE,
flow matching).

The declaration below is torch-free (``sdcore --help`` reads it); behaviour lives in the adapter
(:mod:`.adapter`), the SAI <-> diffusers key converter (:mod:`.convert`), the readers (:mod:`.load`),
the writers (:mod:`.save`), detection (:mod:`.detect`), the tiny model (:mod:`.tiny`) and generation
(:mod:`.generate`). SD3 medium, SD3.5 large (and turbo) and SD3.5 medium are one family: they differ in
depth, QK norm and SD3.5 medium's dual attention, which the configs carry.
"""

from __future__ import annotations

from ..family import LatentFormat, ModelFamily, RoutedInputs, TextEncoderSpec

#: diffusers' default T5 sequence length for SD3 (``max_sequence_length``); SAI trained with 77 + 256 tokens
T5_MAX_LENGTH = 256

SD3 = ModelFamily(
    name="sd3",
    label="Stable Diffusion 3 / 3.5",
    denoiser="transformer",
    text_encoders=(
        TextEncoderSpec("text_encoder", "clip-l", 77),
        TextEncoderSpec("text_encoder_2", "clip-g", 77),
        TextEncoderSpec("text_encoder_3", "t5-xxl", T5_MAX_LENGTH),
    ),
    latent=LatentFormat(channels=16, scaling_factor=1.5305, shift_factor=0.0609),
    objective="flow-matching",
    native_resolution=1024,
    adapter="sdcore.models.sd3.adapter:Sd3Adapter",
    # kohya sd-scripts' SD3 LoRA names (networks/lora_sd3.py), which ComfyUI and Forge read
    lora_prefixes={
        "transformer": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",
    },
    inpaints=True,
    # kohya caches T5-XXL's outputs while CLIP trains (cache_text_encoder_outputs without network_train_unet_only)
    partial_text_cache=("text_encoder_3",),
    # JointTransformerBlock(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs) -> (context, image);
    # positions are added once by the patch embedding, so the blocks take no RoPE
    token_routing=RoutedInputs(patch=2),  # its patch_size: a token is a 2x2 latent square
)

__all__ = ["SD3", "T5_MAX_LENGTH"]
