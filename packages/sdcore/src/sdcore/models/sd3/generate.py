"""Generation with SD3/SD3.5: diffusers' ``StableDiffusion3Pipeline`` over the bundle's own modules.

Samplers are the flow-matching ones every flow family shares (:mod:`sdcore.generate.flow_samplers`:
``euler``, SD3's reference sampler, ``euler_a``, ``heun``, ``dpm++2m``, ``unipc``), configured from the bundle's schedule (its
``shift``). Prompts are encoded by the family adapter (what training
uses) and handed to the pipeline as embeddings; A1111's ``clip_skip`` counts from the last layer
(1 = SD3's default, the penultimate hidden state of both CLIPs). A1111's prompt editing, alternation and
``AND`` render as on the SD families (:mod:`sdcore.generate.step_conditioning`: each transformer call gets
its evaluation's embeddings and pooled vectors). Skip Layer Guidance (``--slg-layers``, diffusers'
``skip_guidance_layers``) runs on every pass through one hook (:mod:`sdcore.generate.skip_layer_guidance`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from ...generate.conditioning import Conditioning
    from ...generate.hires import FlowStart
    from ...generate.inpaint import PreparedInpaint
    from ...generate.skip_layer_guidance import SkipLayerGuidance
    from ...generate.variation import ImageNoise
    from ..bundle import ModelBundle


def flow_scheduler_for(bundle: ModelBundle, sampler: str = "euler", *, img2img: bool = False) -> Any:
    """A fresh flow-matching scheduler for ``sampler`` with the bundle's shift (the shared table,
    :mod:`sdcore.generate.flow_samplers`)."""
    from ...generate.flow_samplers import flow_scheduler

    return flow_scheduler(bundle.noise_scheduler.config, sampler, family="SD3", img2img=img2img)


def build_sd3_pipeline(bundle: ModelBundle, *, img2img: bool = False, sampler: str = "euler") -> Any:
    """``StableDiffusion3Pipeline`` (or its img2img sibling) sharing the bundle's modules."""
    from ...generate.flow_samplers import quiet_pipeline_import

    quiet_pipeline_import()
    import diffusers

    clip_l, clip_g, t5 = bundle.text_encoders
    tok_l, tok_g, tok_t5 = bundle.tokenizers
    cls: Any = diffusers.StableDiffusion3Img2ImgPipeline if img2img else diffusers.StableDiffusion3Pipeline
    return cls(
        transformer=bundle.transformer,
        scheduler=flow_scheduler_for(bundle, sampler, img2img=img2img),
        vae=bundle.vae,
        text_encoder=clip_l,
        tokenizer=tok_l,
        text_encoder_2=clip_g,
        tokenizer_2=tok_g,
        text_encoder_3=t5,
        tokenizer_3=tok_t5,
    )


def encode_sd3_cond_uncond(
    bundle: ModelBundle,
    prompts: list[str],
    negatives: list[str],
    *,
    clip_skip: int = 1,
    **options: Any,
) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) for the pipeline's ``prompt_embeds``/``pooled_prompt_embeds`` and their negatives;
    ``options``: the adapter's ``encode_prompts`` options (T5's length and mask, the CLIP mask: a training run's
    own for its samples)."""
    from ...generate.conditioning import Conditioning
    from .adapter import Sd3Adapter

    adapter = Sd3Adapter()
    out = []
    for texts in (prompts, negatives):
        cond = adapter.encode_prompts(bundle, texts, clip_skip=clip_skip, **options)
        out.append(Conditioning(cond.hidden_states, cond.pooled))
    return out[0], out[1]


def generate_sd3(
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
    clip_skip: int = 1,
    sampler: str = "euler",
    true_cfg_scale: float = 1.0,
    output_type: str = "pil",
    hires_start: FlowStart | None = None,
    noise: ImageNoise | None = None,
    inpaint: PreparedInpaint | None = None,
    skip_layer_guidance: SkipLayerGuidance | None = None,
    text_encoding: Mapping[str, Any] | None = None,
    **_: Any,
) -> Any:
    """One image per prompt (``seeds[i]`` for image ``i``), as ``sdcore generate`` asks a family for them.

    ``output_type="latent"``: the batch's latents ``[B, 16, h, w]`` instead (a hires fix's first pass);
    ``hires_start``: this call is the hires fix's second pass from those latents upscaled
    (:func:`sdcore.generate.hires.flow_second_pass`); ``noise``: A1111's variation seeds
    (:mod:`sdcore.generate.variation`); ``inpaint`` (with ``image``): A1111's inpainting as Forge runs it
    (:mod:`sdcore.generate.flow_inpaint`); ``skip_layer_guidance``: SD3.5's Skip Layer Guidance on this pass
    (:mod:`sdcore.generate.skip_layer_guidance`; needs ``cfg`` above 1); ``text_encoding``: the adapter's
    ``encode_prompts`` options (a training run's T5 length, T5 and CLIP masks, all inside the encoders: SD3's
    transformer takes no text mask, kohya's sampler passes none either)."""
    import contextlib

    import torch

    from ...generate.flow_samplers import run_pipeline
    from ...generate.hires import flow_img2img_strength, flow_second_pass
    from ...generate.pipeline import posterior_mean
    from ...generate.prompt_editing import StepPrompts, schedule_steps
    from ...generate.step_conditioning import StepConditioning, TextSlots
    from ...generate.variation import maybe_swapped

    if true_cfg_scale != 1.0:
        raise ConfigError("--true-cfg-scale is for guidance-distilled models (Flux.1); SD3 takes --cfg")
    if width % 16 or height % 16:  # the pipeline's own check is a ValueError traceback
        raise ConfigError(f"SD3 image sides must be multiples of 16, got {width}x{height}")
    if skip_layer_guidance is not None:
        skip_layer_guidance.check(bundle, (cfg, "--cfg" if hires_start is None else "--hr-cfg"))
    pipe = build_sd3_pipeline(bundle, img2img=image is not None, sampler=sampler)
    pipe.set_progress_bar_config(disable=True)
    # A1111 prompt editing, alternation and AND: one encoding per point where a text changes, swapped into
    # each transformer call (the pipeline batches [uncond, cond] as the SD pipelines do)
    first_steps = None if hires_start is None else hires_start.first_steps  # a hires pass's prompt-editing offsets
    encoding = dict(text_encoding or {})
    per_call = StepConditioning(
        StepPrompts.build(prompts, negatives, schedule_steps(steps, pipe.scheduler), first_steps=first_steps),
        lambda texts, negatives: encode_sd3_cond_uncond(bundle, texts, negatives, clip_skip=clip_skip, **encoding),
    )
    if skip_layer_guidance is not None and per_call.edits.composed:
        raise ConfigError(
            "skip layer guidance (--slg-layers) does not combine with AND prompts (composable diffusion); drop one"
        )
    cond, uncond = per_call.first_parts(0)
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.embeds,
        "negative_prompt_embeds": uncond.embeds,
        "pooled_prompt_embeds": cond.pooled,
        "negative_pooled_prompt_embeds": uncond.pooled,
        "num_inference_steps": steps,
        "guidance_scale": cfg,
        "generator": [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds],
        "output_type": output_type,
        # img2img too: StableDiffusion3Img2ImgPipeline resizes its image to these, and without them to the
        # model's sample size (1024 on SD3), not to the init image's size
        "width": width,
        "height": height,
    }
    if image is not None:
        kwargs.update(image=[image] * len(prompts), strength=flow_img2img_strength(steps, strength))
    masking = None  # the starts as latents and the per-step blend
    if inpaint is not None:
        from ...generate.flow_inpaint import FlowInpainting

        masking = FlowInpainting.of(pipe, inpaint, seeds, cond.embeds.dtype)
        kwargs.update(masking.pipeline_kwargs())
    if noise is not None and image is None and hires_start is None:  # the pipeline takes it as it is
        factor = pipe.vae_scale_factor
        shape = (pipe.transformer.config.in_channels, height // factor, width // factor)
        kwargs["latents"] = noise.initial(shape, cond.embeds.dtype, kwargs["generator"])
    slots = TextSlots()
    second: Any = contextlib.nullcontext()
    if hires_start is not None:
        second = flow_second_pass(pipe, kwargs, hires_start, seeds, noise=noise)
    # img2img: the mean init latent and each seed's first draw as its noise (:func:`posterior_mean`)
    mean = posterior_mean(pipe.vae) if image is not None else contextlib.nullcontext()
    blend = masking.blending(pipe.scheduler) if masking is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def hooks(images: list[int]) -> Iterator[None]:
        # SLG inside the inpainting blend: the blend takes the guided output, SLG's term included
        guided = skip_layer_guidance.installed(pipe) if skip_layer_guidance is not None else contextlib.nullcontext()
        with per_call.select(images).installed(pipe.transformer, slots), guided:
            yield

    with second, maybe_swapped(noise if image is not None else None, pipe.scheduler), mean, blend:
        images = run_pipeline(pipe, kwargs, sampler, seeds, bundle.device, hooks=hooks)
    if masking is not None:
        return masking.finish(pipe, torch.stack(images), output_type)
    return torch.stack(images) if output_type == "latent" else images
