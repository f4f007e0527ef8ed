"""The tiny Chroma model and the released Chroma1 transformer config.

The tiny model keeps Chroma's structural traits: FLUX.1's double and single blocks without modulation
Linears, the approximator (``distilled_guidance_layer``: 64 input channels as released, so the
timestep/guidance/index embedding widths are the real ones), 2x2 packing, the FLUX.1 VAE and a T5 v1.1
encoder (the tiny one Flux uses).
"""

from __future__ import annotations

from typing import Any

#: T5 tokens per prompt: ChromaPipeline's ``max_sequence_length`` and kohya's default for Chroma
T5_MAX_LENGTH = 512


def transformer_config(*, tiny: bool = True) -> dict[str, Any]:
    """``ChromaTransformer2DModel`` config: tiny (2 heads of 16, 2 + 2 blocks) or Chroma1's released size
    (kohya's ``chroma_params``: FLUX.1's 19 + 38 blocks of 3072, approximator 64 -> 5120 x 5 layers)."""
    common = {"patch_size": 1, "in_channels": 64, "approximator_num_channels": 64}
    if not tiny:
        return {
            **common,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "axes_dims_rope": [16, 56, 56],
            "approximator_hidden_dim": 5120,
            "approximator_layers": 5,
        }
    return {
        **common,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # = tiny T5 d_model
        "axes_dims_rope": [4, 6, 6],
        "approximator_hidden_dim": 32,
        "approximator_layers": 2,
    }


def create_tiny_parts(*, seed: int = 0) -> dict[str, Any]:
    """Every component of a tiny Chroma under diffusers' ``ChromaPipeline`` component names."""
    import torch
    from diffusers import AutoencoderKL, ChromaTransformer2DModel

    from ..flux.load import scheduler_for
    from ..flux.tiny import vae_config
    from ..t5 import create_tiny_t5
    from .load import quiet_chroma_construction

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with quiet_chroma_construction():
            transformer = ChromaTransformer2DModel(**transformer_config())
        vae = AutoencoderKL(**vae_config())
        t5, t5_tokenizer = create_tiny_t5(seed=seed + 1)
    finally:
        torch.random.set_rng_state(state)
    modules: list[Any] = [transformer, vae, t5]
    for module in modules:
        module.eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": t5,
        "tokenizer": t5_tokenizer,
        "scheduler": scheduler_for("dev"),  # FLUX.1-dev's resolution-dependent shift (Chroma1-HD's scheduler)
    }
