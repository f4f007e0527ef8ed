"""A tiny random SD3/SD3.5 model with the real layout (MMDiT, CLIP-L, CLIP-G, T5, 16-channel VAE).

Widths are chosen so each conditioning path is visible in the shapes: CLIP-L (32) and CLIP-G (64)
hidden states are concatenated (96) and zero-padded to the T5 width (128 = ``joint_attention_dim``);
the pooled vector is CLIP-L's projection (identity, as in SD3: 32) plus CLIP-G's (64) = 96.
``variant="sd3.5-medium"`` adds dual attention in the first block and QK RMS norm, as SD3.5 medium.
"""

from __future__ import annotations

from typing import Any

from ..tiny import tiny_clip_config
from . import SD3

CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 64
T5_WIDTH = 128

VARIANTS = ("sd3", "sd3.5-large", "sd3.5-medium")


def tiny_transformer_config(variant: str = "sd3") -> dict[str, Any]:
    """An ``SD3Transformer2DModel`` config: 2 joint blocks, 2 heads of 8, patch 2, 16 latent channels."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; choose {', '.join(VARIANTS)}")
    config: dict[str, Any] = {
        "sample_size": 8,  # latent size (64 px images), the positional table allows 16 x 16 patches
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_WIDTH,
        "caption_projection_dim": 16,
        "pooled_projection_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,
        "pos_embed_max_size": 16,
        "dual_attention_layers": [],
        "qk_norm": None,
    }
    if variant != "sd3":
        config["qk_norm"] = "rms_norm"
    if variant == "sd3.5-medium":
        config["dual_attention_layers"] = [0]
    return config


def tiny_vae_config() -> dict[str, Any]:
    """SD3's VAE: ``AutoencoderKL`` with 16 latent channels, no (post-)quant conv, scale 1.5305 / shift 0.0609."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 16,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": SD3.latent.scaling_factor,
        "shift_factor": SD3.latent.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def flow_scheduler_config() -> dict[str, Any]:
    """SD3's training/inference schedule: flow matching, shift 3.0, 1000 steps."""
    return {"num_train_timesteps": 1000, "shift": 3.0}


def create_tiny_sd3(*, seed: int = 0, variant: str = "sd3") -> Any:
    """Build the tiny SD3 bundle (deterministic per seed); ``variant`` picks the SD3.5 block options."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ..t5 import create_tiny_t5
    from ..tokenizer import EOS_TOKEN, OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer
    from .load import make_bundle

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**tiny_transformer_config(variant))
        vae = AutoencoderKL(**tiny_vae_config())
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_clip_config("clip-l")))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_clip_config("clip-g")))
    finally:
        torch.random.set_rng_state(state)
    t5, t5_tokenizer = create_tiny_t5(seed=seed + 1, d_model=T5_WIDTH)
    with torch.no_grad():  # SD3's CLIP-L pooled output is unprojected: diffusers ships an identity projection
        clip_l.text_projection.weight.copy_(torch.eye(CLIP_L_WIDTH))
    modules: list[Any] = [transformer, vae, clip_l, clip_g, t5]
    for module in modules:
        module.eval()
    tokenizers = [
        bundled_clip_tokenizer(pad_token=EOS_TOKEN),
        bundled_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN),
        t5_tokenizer,
    ]
    bundle = make_bundle(
        transformer, vae, [clip_l, clip_g, t5], tokenizers, FlowMatchEulerDiscreteScheduler(**flow_scheduler_config())
    )
    bundle.source, bundle.source_format = f"tiny:sd3{'' if variant == 'sd3' else ':' + variant}", "tiny"
    return bundle
