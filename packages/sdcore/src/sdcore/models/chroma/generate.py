"""``sdcore generate`` for Chroma: diffusers' ``ChromaPipeline`` over the bundle's own modules.

Chroma has no distilled guidance: ``--cfg`` is real classifier-free guidance against the negative prompt
(an empty one when none is given), each step running the transformer twice, as ComfyUI and the pipeline
do; ``--cfg 1`` turns it off. The prompts are encoded by :class:`~sdcore.models.chroma.adapter.ChromaAdapter`
(the training encoding) and handed to the pipeline with boolean masks, so the joint attention hides T5's
padding as in training. Samplers and the resolution-dependent shift are Flux's
(:mod:`sdcore.generate.flow_samplers`); sides are multiples of 16; A1111 emphasis weights are dropped.
A1111 prompt editing, alternation and ``AND`` render as on the other real-CFG families
(:mod:`sdcore.generate.step_conditioning`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from ...generate.hires import FlowStart
    from ...generate.inpaint import PreparedInpaint
    from ...generate.variation import ImageNoise
    from ..bundle import ModelBundle


def flow_scheduler_for(bundle: ModelBundle, sampler: str = "euler", *, img2img: bool = False) -> Any:
    """The scheduler :func:`build_chroma_pipeline` gives ``sampler``: ``ChromaPipeline`` and its img2img sibling
    always hand it their own sigmas (no Heun from an init image; see
    :func:`~sdcore.generate.flow_samplers.flow_scheduler`). ``sdcore generate`` asks it for every X/Y/Z cell's
    sampler before the first cell renders."""
    from ...generate.flow_samplers import flow_scheduler

    return flow_scheduler(bundle.noise_scheduler.config, sampler, family="Chroma", pipeline_sigmas=True,
                          img2img=img2img)  # fmt: skip


def build_chroma_pipeline(bundle: ModelBundle, *, img2img: bool = False, sampler: str = "euler") -> Any:
    """A ``ChromaPipeline`` (or ``ChromaImg2ImgPipeline``) sharing the bundle's modules."""
    from ...generate.flow_samplers import quiet_pipeline_import

    quiet_pipeline_import()
    import diffusers

    from .adapter import require_complete

    scheduler = flow_scheduler_for(bundle, sampler, img2img=img2img)
    require_complete(bundle)
    cls: Any = diffusers.ChromaImg2ImgPipeline if img2img else diffusers.ChromaPipeline
    pipe = cls(scheduler=scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
               tokenizer=bundle.tokenizers[0], transformer=bundle.transformer)  # fmt: skip
    if img2img:  # an init image given as latents passes through unencoded, as FluxImg2ImgPipeline's (inpainting)
        from diffusers.image_processor import VaeImageProcessor

        pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2,
                                                 vae_latent_channels=pipe.latent_channels)  # fmt: skip
    return pipe


def run_chroma(
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
    sampler: str = "euler",
    output_type: str = "pil",
    hires_start: FlowStart | None = None,
    noise: ImageNoise | None = None,
    inpaint: PreparedInpaint | None = None,
    text_encoding: Mapping[str, Any] | None = None,
    **_: Any,
) -> Any:
    """One pipeline call for ``prompts`` (image ``i`` from a generator seeded ``seeds[i]``); A1111 prompt
    editing, alternation and ``AND`` switch per transformer evaluation, CFG's prompt and negative calls
    counting once (:mod:`sdcore.generate.step_conditioning`). ``output_type="latent"`` and ``hires_start``:
    a hires fix's passes, as :func:`sdcore.models.flux.generate.run_flux` has them (masks and CFG as here);
    ``noise``: A1111's variation seeds (:mod:`sdcore.generate.variation`); ``inpaint`` (with ``image``): A1111's
    inpainting as Forge runs it (:mod:`sdcore.generate.flow_inpaint`); ``text_encoding``: the adapter's
    ``encode_prompts`` options (a training run's T5 length; Chroma's T5 mask is always on)."""
    import contextlib

    import torch

    from ...generate.hires import flow_img2img_strength
    from ...generate.pipeline import posterior_mean
    from ...generate.prompt_editing import StepPrompts, schedule_steps
    from ...generate.step_conditioning import ChromaSlots, StepConditioning
    from ..flux.generate import run_packed, t5_text_encoder
    from .adapter import ChromaAdapter

    if width % 16 or height % 16:
        raise ConfigError(f"Chroma image sides must be multiples of 16, got {width}x{height}")
    first_steps = None if hires_start is None else hires_start.first_steps
    edits = StepPrompts.build(prompts, negatives, schedule_steps(steps, pipe.scheduler), first_steps=first_steps)
    guided = cfg > 1.0  # the pipeline's condition for CFG
    needs_uncond = guided or edits.composed  # AND without CFG runs the uncond itself, as A1111 does
    per_call = StepConditioning(edits, t5_text_encoder(ChromaAdapter(), bundle, text_encoding, negatives=needs_uncond))
    cond, uncond = per_call.first_parts(0)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.embeds,
        "prompt_attention_mask": cond.mask,
        "num_inference_steps": steps,
        "guidance_scale": cfg,
        "generator": generators,
        "output_type": output_type,
        "width": width,
        "height": height,
    }
    if guided:
        kwargs.update(negative_prompt_embeds=uncond.embeds, negative_prompt_attention_mask=uncond.mask)
    if image is not None:
        kwargs["image"] = [image] * len(prompts)
        kwargs["strength"] = flow_img2img_strength(steps, strength)
    masking = None  # the starts as latents and the per-step blend
    if inpaint is not None:
        from ...generate.flow_inpaint import FlowInpainting

        masking = FlowInpainting.of(pipe, inpaint, seeds, cond.embeds.dtype,
                                    pack=lambda latents: pipe._pack_latents(latents, *latents.shape))  # fmt: skip
        kwargs.update(masking.pipeline_kwargs())
    slots = ChromaSlots(split=guided)
    # img2img: the mean init latent and each seed's first draw as its noise (:func:`posterior_mean`)
    with (
        posterior_mean(pipe.vae) if image is not None else contextlib.nullcontext(),
        masking.blending(pipe.scheduler) if masking is not None else contextlib.nullcontext(),
    ):
        images = run_packed(pipe, kwargs, sampler, seeds, bundle, hires_start,
                            hooks=lambda images: per_call.select(images).installed(pipe.transformer, slots),
                            noise=noise)  # fmt: skip
    return images if masking is None else masking.finish(pipe, images, output_type)
