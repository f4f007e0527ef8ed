"""Tiny random-weight models with the real layout of each family.

They exist for demos, tests and plugin authors: a full training run on one takes seconds on a
CPU, and every key name, module path and conditioning input matches the real family so file
formats can be tested honestly. Only the widths and depths are small.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .bundle import ModelBundle
from .family import get_family

#: text-encoder kinds of the OpenCLIP family (gelu, "!" padding), as opposed to OpenAI's CLIP-L
OPENCLIP_KINDS = ("openclip-h", "clip-g")

TINY_TEXT_WIDTH = {"sd1": 32, "sd2": 32, "sdxl": (32, 64)}


def tiny_unet_config(family: str, *, inpainting: bool = False) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config shaped like ``family`` (``inpainting``: 9 input channels)."""
    common: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 9 if inpainting else 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "block_out_channels": [32, 64],
    }
    if family == "sd1":
        return {
            **common,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
        }
    if family == "sd2":
        return {
            **common,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
        }
    if family == "sdxl":
        return {
            **common,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 32 + 64,
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 64 + 6 * 8,
        }
    raise ValueError(f"unknown family {family!r}; choose sd1, sd2 or sdxl")


def tiny_vae_config(family: str) -> dict[str, Any]:
    """A 4-level AutoencoderKL (8x downsampling, as the real VAE) with few channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": get_family(family).latent.scaling_factor,
    }


def tiny_text_encoder_config(family: str, index: int = 0) -> dict[str, Any]:
    """The tiny CLIP text config of ``family``'s ``index``-th text encoder."""
    return tiny_clip_config(get_family(family).text_encoders[index].kind)


def tiny_clip_config(kind: str) -> dict[str, Any]:
    """A tiny CLIP text config of ``kind``: quick_gelu and ``<|endoftext|>`` padding for OpenAI CLIP-L,
    gelu and ``!`` padding for OpenCLIP (H, bigG), as the real models ship. CLIP-G is wider (64 vs 32)
    so that a wrong concatenation of two encoders shows in the shapes."""
    openclip = kind in OPENCLIP_KINDS
    width = 64 if kind == "clip-g" else 32
    return {
        "vocab_size": 49408,
        "hidden_size": width,
        "intermediate_size": width * 2,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if openclip else "quick_gelu",
        "projection_dim": width,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0 if openclip else 49407,
    }


def noise_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """The DDPM training schedule shared by SD1, SD2 and SDXL."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "clip_sample": False,
        "steps_offset": 1,
    }


def tiny_sd_inpainting(family: str, variant: str | None) -> bool:
    """Whether a tiny SD1/SD2/SDXL ``variant`` is the inpainting one (its UNet's ``conv_in`` takes 9 channels:
    the noisy latents, the mask and the masked image's latents); None is the plain model, anything else a
    :class:`~sdcore.errors.ConfigError`. The builder and the layout reader (``sdcore.models.layout``) both ask
    here, so the pre-flight sees the model that loads."""
    if variant not in (None, "inpainting"):
        raise ConfigError(f"unknown variant {variant!r} of {family}; the one there is: inpainting")
    return variant == "inpainting"


def create_tiny_bundle(
    family: str = "sd1", *, seed: int = 0, prediction_type: str | None = None, variant: str | None = None
) -> ModelBundle:
    """Build a tiny random model of ``family``, deterministic per seed: SD1, SD2 and SDXL here; any other
    family (``sd3``, ``flux``, ``chroma``, a plugin's) through its adapter, as ``load_model("tiny:<family>")``
    does, so the name exported as ``sdcore.create_tiny_bundle`` takes every family ``tiny:`` takes.
    ``variant="inpainting"``: an SD model's inpainting layout (the UNet's ``conv_in`` takes 9 channels, the
    layout of sd-v1-5-inpainting: ``tiny:sd1-inpainting``), for trying and testing inpainting without a
    download; other families take their own variants (``flux``: ``schnell``, ``fill`` ...). An unknown family or
    variant is a :class:`~sdcore.errors.ConfigError`."""
    if family not in ("sd1", "sd2", "sdxl"):
        from .family import family_adapter

        options: dict[str, Any] = {"seed": seed}
        if variant is not None:
            options["variant"] = variant
        if prediction_type is not None:
            options["prediction_type"] = prediction_type
        return family_adapter(family).create_tiny(**options)
    inpainting = tiny_sd_inpainting(family, variant)

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import EOS_TOKEN, OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer

    prediction = prediction_type or get_family(family).default_prediction_type
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config(family, inpainting=inpainting))
        vae = AutoencoderKL(**tiny_vae_config(family))
        encoders: list[Any] = []
        tokenizers: list[Any] = []
        for index, spec in enumerate(get_family(family).text_encoders):
            config = CLIPTextConfig(**tiny_text_encoder_config(family, index))
            openclip = spec.kind in OPENCLIP_KINDS
            model_cls = CLIPTextModelWithProjection if spec.kind == "clip-g" else CLIPTextModel
            encoders.append(model_cls(config))
            tokenizers.append(bundled_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN if openclip else EOS_TOKEN))
    finally:
        torch.random.set_rng_state(generator_state)
    for module in [unet, vae, *encoders]:
        module.eval()
    scheduler = DDPMScheduler(**noise_scheduler_config(prediction))
    return ModelBundle(
        family=family,
        prediction_type=prediction,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler,
        source=f"tiny:{family}-inpainting" if inpainting else f"tiny:{family}",
        source_format="tiny",
        inpainting=inpainting,
    )
