"""Chroma (lodestones' Chroma1-HD / Chroma1-Base, 8.9B): the FLUX.1-schnell derivative with T5 only.

What differs from FLUX.1 (kohya's ``flux_train_network.py --model_type chroma``, diffusers'
``ChromaTransformer2DModel``/``ChromaPipeline``), and so what this family declares beside
:mod:`sdcore.models.flux`, whose code it reuses for everything that is the same (BFL key table, 2x2
latent packing, the VAE, T5, the single-file layouts):

- one text encoder, T5-XXL, under diffusers' name ``text_encoder`` (no CLIP-L, no pooled vector);
- the transformer has no modulation Linears, no timestep/vector/guidance embedders: one
  ``distilled_guidance_layer`` (an MLP "approximator") maps (timestep, guidance 0, block index) to
  every block's modulation;
- T5's padding is masked, always: in the encoder and in every joint attention, where one padding
  token past the prompt stays visible (kohya's ``attn_padding=1``, diffusers' ``mask <= length``);
- no distilled guidance: generation uses real CFG with a negative prompt (``ChromaPipeline``).
"""

from __future__ import annotations

from ..family import LatentFormat, ModelFamily, RoutedInputs, TextEncoderSpec

CHROMA = ModelFamily(
    name="chroma",
    label="Chroma",
    denoiser="transformer",
    # T5 tokens: 512, as ChromaPipeline's max_sequence_length and kohya's (not schnell) default
    text_encoders=(TextEncoderSpec("text_encoder", "t5-xxl", 512),),
    latent=LatentFormat(channels=16, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE
    objective="flow-matching",
    native_resolution=1024,
    adapter="sdcore.models.chroma.adapter:ChromaAdapter",
    # kohya's lora_flux with model_type chroma: T5 stays the third encoder (lora_te3), CLIP-L is a dummy
    lora_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te3"},
    context_tokens=512,
    inpaints=True,
    # diffusers' double blocks take (hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask)
    # and return (encoder_hidden_states, hidden_states); its single blocks take [text | image] as hidden_states
    # and return it; the mask is [B, T + N] (rows and columns), the RoPE rows [text | image]; each block gets
    # its own modulation slice (temb), so a forward is known by its RoPE tables
    token_routing=RoutedInputs(
        rope="image_rotary_emb",
        mask="attention_mask",
        patch=2,
        joint=("single_transformer_blocks",),
        key=("image_rotary_emb",),
    ),
)

__all__ = ["CHROMA"]
