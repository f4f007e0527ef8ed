"""The tiny Flux.1 model (dev or schnell) and the configs of the released Flux.1 parts.

The tiny model keeps every structural trait of Flux.1: double- and single-stream blocks, QK RMSNorm,
rotary axes summing to the head width, 2x2 latent packing (``in_channels`` 64 = 16 x 4), the guidance
embedding for dev, a 16-channel VAE without quant convs, CLIP-L pooled output and a T5 v1.1 encoder.
Its text encoders use the conventions shape inference assumes (CLIP heads 64 wide -> one head at
width 32), so files in the users' layouts without our metadata still rebuild it exactly.
"""

from __future__ import annotations

from typing import Any

FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159
#: T5 tokens per prompt the released pipelines use (diffusers' FluxPipeline default is 512 for both)
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}


def scheduler_config(variant: str) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` config of FLUX.1-dev (resolution-dependent shift) or -schnell."""
    base = {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
    }
    if variant == "schnell":
        return {**base, "shift": 1.0, "use_dynamic_shifting": False}
    return {**base, "shift": 3.0, "use_dynamic_shifting": True}


def transformer_config(variant: str = "dev", *, tiny: bool = True) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config: tiny (2 heads of 16, 2 + 2 blocks) or the released size."""
    if not tiny:
        return {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": variant == "dev",
            "axes_dims_rope": [16, 56, 56],
        }
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # = tiny T5 d_model
        "pooled_projection_dim": 32,  # = tiny CLIP-L hidden size
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": [4, 6, 6],
    }


def vae_config(*, tiny: bool = True) -> dict[str, Any]:
    """The Flux ``AutoencoderKL``: 16 latent channels, no quant convs, scale 0.3611, shift 0.1159."""
    common = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 16,
        "scaling_factor": FLUX_VAE_SCALING,
        "shift_factor": FLUX_VAE_SHIFT,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "sample_size": 1024,
    }
    if tiny:
        return {**common, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
    return {**common, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}


def clip_config() -> dict[str, Any]:
    """A tiny OpenAI CLIP-L text config (quick_gelu, pad = eos) whose pooled output conditions Flux."""
    return {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def create_tiny_parts(variant: str = "dev", *, seed: int = 0) -> dict[str, Any]:
    """Every component of a tiny Flux.1 ``variant`` under diffusers' component names."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..t5 import create_tiny_t5
    from ..tokenizer import EOS_TOKEN, bundled_clip_tokenizer

    if variant not in ("dev", "schnell"):
        raise ValueError(f"unknown Flux variant {variant!r}; choose dev or schnell")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**transformer_config(variant))
        vae = AutoencoderKL(**vae_config())
        clip = CLIPTextModel(CLIPTextConfig(**clip_config()))
        t5, t5_tokenizer = create_tiny_t5(seed=seed + 1)
    finally:
        torch.random.set_rng_state(state)
    modules: list[Any] = [transformer, vae, clip, t5]
    for module in modules:
        module.eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": clip,
        "text_encoder_2": t5,
        "tokenizer": bundled_clip_tokenizer(pad_token=EOS_TOKEN),
        "tokenizer_2": t5_tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler_config(variant)),
    }
