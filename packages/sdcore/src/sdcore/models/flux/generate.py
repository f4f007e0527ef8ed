"""``sdcore generate`` for Flux.1: diffusers' ``FluxPipeline`` over the bundle's own modules.

What differs from the SD families, as Forge and ComfyUI users know it: ``--cfg`` is the *distilled*
guidance a dev model embeds (Forge's "Distilled CFG Scale", 3.5 typical; schnell ignores it), there
is no negative prompt (one is an error rather than silently dropped), the sampler is the
flow-matching Euler of the model's scheduler (``euler``; A1111's default ``euler_a`` is read as it),
image sides are multiples of 16 (8x VAE, then 2x2 packing), and A1111 emphasis weights are dropped
(the text is encoded plainly by CLIP-L and T5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from ..bundle import ModelBundle

#: samplers a Flux model generates with (both mean the scheduler's flow-matching Euler)
FLUX_SAMPLERS = ("euler", "euler_a")


def build_flux_pipeline(bundle: ModelBundle, *, img2img: bool = False, sampler: str = "euler") -> Any:
    """A ``FluxPipeline`` (or ``FluxImg2ImgPipeline``) sharing the bundle's modules."""
    import diffusers

    from .adapter import require_complete

    if sampler not in FLUX_SAMPLERS:
        raise ConfigError(f"Flux models sample with the flow-matching Euler sampler (euler), not {sampler!r}")
    require_complete(bundle)
    if bundle.tokenizers[1] is None:
        from ..t5 import load_t5_tokenizer

        load_t5_tokenizer(vocab_size=bundle.text_encoders[1].config.vocab_size)  # the message naming the option
    cls: Any = diffusers.FluxImg2ImgPipeline if img2img else diffusers.FluxPipeline
    scheduler = type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config)
    return cls(
        scheduler=scheduler,
        vae=bundle.vae,
        text_encoder=bundle.text_encoders[0],
        tokenizer=bundle.tokenizers[0],
        text_encoder_2=bundle.text_encoders[1],
        tokenizer_2=bundle.tokenizers[1],
        transformer=bundle.transformer,
    )


def run_flux(
    pipe: Any,
    bundle: ModelBundle,
    prompts: list[str],
    negatives: list[str],
    *,
    seeds: list[int],
    steps: int,
    cfg: float,
    width: int,
    height: int,
    image: Any = None,
    strength: float = 0.75,
    **_: Any,
) -> list[Image.Image]:
    """One pipeline call for ``prompts`` (image ``i`` from a generator seeded ``seeds[i]``)."""
    import torch

    from ...generate.prompt_syntax import parse_emphasis, plain_text
    from .adapter import FluxAdapter

    if any(negative.strip() for negative in negatives):
        raise ConfigError("Flux.1 models have no negative prompt; leave --negative empty")
    if width % 16 or height % 16:
        raise ConfigError(f"Flux image sides must be multiples of 16, got {width}x{height}")
    texts = [plain_text(parse_emphasis(prompt)) for prompt in prompts]
    cond = FluxAdapter().encode_prompts(bundle, texts)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.hidden_states,
        "pooled_prompt_embeds": cond.pooled,
        "num_inference_steps": steps,
        "guidance_scale": cfg,
        "generator": generators,
        "output_type": "pil",
        "width": width,
        "height": height,
    }
    if image is not None:
        kwargs["image"] = [image] * len(prompts)
        kwargs["strength"] = strength
    return list(pipe(**kwargs).images)
