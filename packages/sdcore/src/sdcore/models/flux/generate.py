"""``sdcore generate`` for Flux.1: diffusers' ``FluxPipeline`` over the bundle's own modules.

What differs from the SD families, as Forge and ComfyUI users know it:

- ``--cfg`` is the *distilled* guidance a dev model embeds (Forge's "Distilled CFG Scale", ComfyUI's
  ``FluxGuidance``; 3.5 typical; schnell ignores it). It costs nothing and has no negative prompt.
- A negative prompt needs *true* CFG, ``--true-cfg-scale`` above 1 (diffusers' ``true_cfg_scale``, Forge's
  "CFG Scale", ComfyUI's KSampler ``cfg``): each step then runs the transformer on the prompt and on the
  negative and takes ``neg + s * (pos - neg)``, twice the work. People use it with dev (de-distilled
  fine-tunes want it); a negative prompt without it is an error rather than silently dropped.
- Samplers are the shared flow-matching ones (:mod:`sdcore.generate.flow_samplers`: ``euler``, the
  default, ``euler_a``, ``heun``, ``dpm++2m``, ``unipc``), each on dev's resolution-dependent shift.
- Image sides are multiples of 16 (8x VAE, then 2x2 packing), and A1111 emphasis weights are dropped
  (the text is encoded plainly by CLIP-L and T5).
- A1111 prompt editing, alternation and ``AND`` render as Forge renders them on Flux
  (:mod:`sdcore.generate.step_conditioning`).
- A reference image (``--reference-image``) makes the call FLUX.1 Kontext's: diffusers' ``FluxKontextPipeline``
  encodes it clean and appends its tokens to the latents' (:mod:`sdcore.models.flux.kontext`); the image comes
  already sized (:func:`~sdcore.models.flux.kontext.sized_reference`), so the pipeline's own resize is off and
  the output keeps the size asked for (its ``max_area`` is that size's area).
- An image conditioning (FLUX.1 Fill's training samples: kohya's ``--i``, OneTrainer's ``sample_inpainting``)
  makes the call a txt2img of FLUX.1 Fill on that conditioning: ``FluxPipeline`` from the seed's noise, the
  transformer given the rule's masked-image latent and mask beside the noisy latents (:func:`fill_conditioning`).
- A control image (``--control-image``) makes the call FLUX.1 Depth's or Canny's: diffusers' ``FluxControlPipeline``
  (``FluxControlImg2ImgPipeline`` from an init image) stretches it to the output size, encodes it and joins its
  latents to the noisy ones on the channels (:mod:`sdcore.models.flux.control`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from ...generate.hires import FlowStart
    from ...generate.inpaint import ImageConditioning, PreparedInpaint
    from ...generate.step_conditioning import TextRows
    from ...generate.variation import ImageNoise
    from ..bundle import ModelBundle


def flow_scheduler_for(bundle: ModelBundle, sampler: str = "euler", *, img2img: bool = False) -> Any:
    """The scheduler :func:`build_flux_pipeline` gives ``sampler``: ``FluxPipeline`` hands it its own sigmas
    and ``mu``, which rules out Heun from an init image and DPM++ 2M on schnell's fixed shift (one line each,
    :func:`~sdcore.generate.flow_samplers.flow_scheduler`). ``sdcore generate`` asks it for every X/Y/Z cell's
    sampler before the first cell renders."""
    from ...generate.flow_samplers import flow_scheduler

    return flow_scheduler(bundle.noise_scheduler.config, sampler, family="Flux.1", pipeline_sigmas=True,
                          img2img=img2img)  # fmt: skip


#: why a reference image and an init image do not go together (said before the model loads)
KONTEXT_INIT_IMAGE = (
    "--reference-image with --init-image: a Kontext edit starts from noise with the reference as its context "
    "(diffusers' FluxKontextPipeline has no img2img strength); drop --init-image (and its --mask: no inpainting "
    "with a reference)"
)

#: why a reference image and a control image do not go together (said before the model loads): a Kontext
#: reference joins the latents as tokens, a Depth/Canny control image on the channels; no FLUX.1 model (and no
#: diffusers pipeline) takes both
KONTEXT_CONTROL = (
    "--reference-image with --control-image: a reference is FLUX.1 Kontext's image to edit, a control image the "
    "depth map or canny edges FLUX.1 Depth/Canny follow, and no model takes both; drop one"
)


def build_flux_pipeline(
    bundle: ModelBundle,
    *,
    img2img: bool = False,
    sampler: str = "euler",
    kontext: bool = False,
    fill: bool = False,
    control: bool = False,
    conditioned: bool = False,
) -> Any:
    """A ``FluxPipeline`` (``FluxImg2ImgPipeline`` with ``img2img``, ``FluxKontextPipeline`` with ``kontext``,
    ``FluxFillPipeline`` with ``fill``: FLUX.1 Fill's inpainting, ``FluxControlPipeline`` or, with ``img2img``,
    ``FluxControlImg2ImgPipeline`` with ``control``: FLUX.1 Depth/Canny) sharing the bundle's modules.
    ``conditioned``: a ``FluxPipeline`` for FLUX.1 Fill, whose conditioning :func:`fill_conditioning` gives."""
    from ...generate.flow_samplers import quiet_pipeline_import

    quiet_pipeline_import()
    import diffusers

    from .adapter import require_complete
    from .variants import require_control, require_supported

    if control:  # before the generic refusal: a control image on dev says so
        require_control(bundle)
    if conditioned:
        from .variants import require_fill

        require_fill(bundle)
    require_supported(
        bundle,
        "generate with",
        given=(("mask",) if fill or conditioned else ()) + (("control image",) if control else ()),
    )
    scheduler = flow_scheduler_for(bundle, sampler, img2img=img2img)
    require_complete(bundle)
    if bundle.tokenizers[1] is None:
        from ..t5 import load_t5_tokenizer

        load_t5_tokenizer(vocab_size=bundle.text_encoders[1].config.vocab_size)  # the message naming the option
    if kontext and img2img:
        raise ConfigError(KONTEXT_INIT_IMAGE)
    if kontext and control:
        raise ConfigError(KONTEXT_CONTROL)
    cls: Any = diffusers.FluxImg2ImgPipeline if img2img else diffusers.FluxPipeline
    if kontext:
        cls = diffusers.FluxKontextPipeline
    if fill:
        cls = diffusers.FluxFillPipeline
    if control:
        cls = diffusers.FluxControlImg2ImgPipeline if img2img else diffusers.FluxControlPipeline
    return cls(
        scheduler=scheduler,
        vae=bundle.vae,
        text_encoder=bundle.text_encoders[0],
        tokenizer=bundle.tokenizers[0],
        text_encoder_2=bundle.text_encoders[1],
        tokenizer_2=bundle.tokenizers[1],
        transformer=bundle.transformer,
    )


def t5_text_encoder(
    adapter: Any,
    bundle: ModelBundle,
    text_encoding: Mapping[str, Any] | None,
    *,
    negatives: bool,
    **prompt_options: Any,
) -> Callable[[list[str], list[str]], tuple[TextRows, TextRows | None]]:
    """The ``encode`` that :class:`~sdcore.generate.step_conditioning.StepConditioning` calls on a T5 family's
    texts (FLUX.1, Chroma: one rule, so both render prompt editing's texts alike): each text's A1111 emphasis
    dropped, read after the schedule rendered it (its brackets are the schedule's first), then
    ``adapter.encode_prompts`` with ``text_encoding`` (a training run's T5 options) and, for the prompts only,
    ``prompt_options``; with ``negatives`` (true CFG), the negatives too, at the prompts' T5 length, as the
    pipelines require. Each side's rows carry the adapter's pooled vector and ``extra[T5_MASK]`` where it gives
    them (Chroma: no pooled vector, always the mask)."""
    from ...generate.prompt_syntax import parse_emphasis, plain_text
    from ...generate.step_conditioning import TextRows
    from .adapter import T5_MASK

    encoding = dict(text_encoding or {})

    def encode(texts: list[str], negative_texts: list[str]) -> tuple[TextRows, TextRows | None]:
        cond = adapter.encode_prompts(bundle, [plain_text(parse_emphasis(t)) for t in texts],
                                      **{**encoding, **prompt_options})  # fmt: skip
        rows = TextRows(cond.hidden_states, cond.pooled, cond.extra.get(T5_MASK))
        if not negatives:
            return rows, None
        uncond = adapter.encode_prompts(bundle, [plain_text(parse_emphasis(n)) for n in negative_texts],
                                        **{**encoding, "t5_max_length": cond.hidden_states.shape[1]})  # fmt: skip
        return rows, TextRows(uncond.hidden_states, uncond.pooled, uncond.extra.get(T5_MASK))

    return encode


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
    sampler: str = "euler",
    true_cfg_scale: float = 1.0,
    output_type: str = "pil",
    hires_start: FlowStart | None = None,
    noise: ImageNoise | None = None,
    reference: Any = None,
    inpaint: PreparedInpaint | None = None,
    control: Any = None,
    conditioning_image: ImageConditioning | None = None,
    text_encoding: Mapping[str, Any] | None = None,
    **_: Any,
) -> Any:
    """One pipeline call for ``prompts`` (image ``i`` from a generator seeded ``seeds[i]``, varied by ``noise``:
    :mod:`sdcore.generate.variation`); with
    ``true_cfg_scale`` > 1, true CFG against ``negatives`` (empty ones too, as Forge and ComfyUI do).
    ``output_type="latent"``: the batch's latents unpacked, ``[B, 16, h, w]`` (a hires fix's first pass);
    ``hires_start``: the hires fix's second pass from them upscaled, with the same guidance and true CFG
    (:func:`sdcore.generate.hires.flow_second_pass`). ``reference``: FLUX.1 Kontext's reference image, a PIL
    image already at its size (``pipe`` a ``FluxKontextPipeline``), shared by the batch and both hires passes.
    ``inpaint``: with ``pipe`` a ``FluxFillPipeline``, FLUX.1 Fill's inpainting: the prepared image and mask
    (:func:`sdcore.generate.inpaint.prepare`: A1111's blur, invert, only masked) go to the pipeline as they are,
    and its images are pasted back (A1111's overlay, as Forge does for every model); with a
    ``FluxImg2ImgPipeline`` (dev, schnell, Kontext), A1111's inpainting as Forge runs it
    (:mod:`sdcore.generate.flow_inpaint`: the masked start, the per-step blend, the paste-back). ``control``: FLUX.1
    Depth/Canny's control image, a PIL image (``pipe`` a ``FluxControlPipeline`` or ``FluxControlImg2ImgPipeline``,
    which stretches it to the output size), shared by the batch and both hires passes. ``conditioning_image``: with
    ``pipe`` a ``FluxPipeline`` (``conditioned``) over FLUX.1 Fill, a txt2img on that image conditioning (kohya's and
    OneTrainer's inpainting samples, :func:`fill_conditioning`), shared by the batch; no paste-back.
    ``text_encoding``: the adapter's ``encode_prompts`` options (a training run's T5 length and mask: with the
    mask, every transformer call hides T5's padding as training's prediction does, kohya's sampler's
    ``txt_attention_mask``).

    A1111 prompt editing, alternation and ``AND`` switch per transformer evaluation
    (:mod:`sdcore.generate.step_conditioning`): true CFG's prompt and negative calls count once, as Forge
    counts them; without true CFG, ``AND`` is Forge's ``sum(w_i * denoised_i)`` (see that module)."""
    import contextlib

    import torch

    from ...generate.hires import flow_img2img_strength
    from ...generate.pipeline import posterior_mean
    from ...generate.prompt_editing import StepPrompts, schedule_steps
    from ...generate.step_conditioning import FluxSlots, StepConditioning
    from .adapter import FluxAdapter
    from .variants import bundle_variant

    check_true_cfg(negatives, true_cfg_scale)
    fill = inpaint is not None and bundle_variant(bundle) == "fill"  # the adapter built a FluxFillPipeline
    if (fill or conditioning_image is not None) and true_cfg_scale > 1.0:
        raise ConfigError(FILL_TRUE_CFG)
    if control is not None and true_cfg_scale > 1.0:
        from .control import CONTROL_TRUE_CFG

        raise ConfigError(CONTROL_TRUE_CFG)
    if width % 16 or height % 16:
        raise ConfigError(f"Flux image sides must be multiples of 16, got {width}x{height}")
    true_cfg = true_cfg_scale > 1.0
    # `control` for the prompts only: true CFG, the only negative encoding, is refused with a control image above
    encode = t5_text_encoder(FluxAdapter(), bundle, text_encoding, negatives=true_cfg, control=control is not None)
    first_steps = None if hires_start is None else hires_start.first_steps
    per_call = StepConditioning(
        StepPrompts.build(prompts, negatives, schedule_steps(steps, pipe.scheduler), first_steps=first_steps), encode
    )
    cond, uncond = per_call.first_parts(0)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.embeds,
        "pooled_prompt_embeds": cond.pooled,
        "num_inference_steps": steps,
        "guidance_scale": cfg,
        "generator": generators,
        "output_type": output_type,
        "width": width,
        "height": height,
    }
    if true_cfg:
        kwargs.update(negative_prompt_embeds=uncond.embeds, negative_pooled_prompt_embeds=uncond.pooled,
                      true_cfg_scale=true_cfg_scale)  # fmt: skip
    if fill and inpaint is not None:
        image = inpaint.image  # the pipeline masks it and encodes it itself
        kwargs["mask_image"] = [inpaint.mask] * len(prompts)
    if image is not None:
        kwargs["image"] = [image] * len(prompts)
        kwargs["strength"] = flow_img2img_strength(steps, strength)
    masking = None  # A1111's inpainting on a regular model: the starts as latents, the per-step blend
    if inpaint is not None and not fill:
        from ...generate.flow_inpaint import FlowInpainting

        masking = FlowInpainting.of(pipe, inpaint, seeds, cond.embeds.dtype,
                                    pack=lambda latents: pipe._pack_latents(latents, *latents.shape))  # fmt: skip
        kwargs.update(masking.pipeline_kwargs())
    if reference is not None:
        if image is not None:
            raise ConfigError(KONTEXT_INIT_IMAGE)
        # sized already: the pipeline's Kontext resize off, and its output size the one asked for
        kwargs.update(image=reference, _auto_resize=False, max_area=width * height)
    if control is not None:  # one image for the batch: the pipeline repeats it (each sample's own VAE draw)
        kwargs["control_image"] = control
    conditioning = None  # FLUX.1 Fill's txt2img on a given conditioning: the seeds' noise as FluxPipeline draws it
    if conditioning_image is not None:
        from ...generate.rng import randn_float32

        conditioning = fill_conditioning_latents(pipe, conditioning_image)
        unit = pipe.vae_scale_factor * 2
        shape = (1, int(pipe.vae.config.latent_channels), 2 * (height // unit), 2 * (width // unit))
        cpu, dtype = torch.device("cpu"), cond.embeds.dtype
        start = torch.cat([randn_float32(shape, generator=g, device=cpu, dtype=dtype) for g in generators])
        kwargs["latents"] = pipe._pack_latents(start, *start.shape)  # variation seeds replace it: run_packed
    slots = FluxSlots(split=true_cfg, zero_uncond=not true_cfg)
    # plain img2img: the mean init latent and each seed's first draw as its noise (Fill and Depth/Canny encode
    # as their pipelines do, the posterior sampled from the seed's generator: see their docs)
    plain = image is not None and inpaint is None and control is None
    with (
        posterior_mean(pipe.vae) if plain else contextlib.nullcontext(),
        masking.blending(pipe.scheduler) if masking is not None else contextlib.nullcontext(),
        fill_conditioning(pipe.transformer, conditioning) if conditioning is not None else contextlib.nullcontext(),
    ):
        images = run_packed(pipe, kwargs, sampler, seeds, bundle, hires_start,
                            hooks=lambda images: per_call.select(images).installed(pipe.transformer, slots),
                            noise=noise)  # fmt: skip
    if masking is not None:
        return masking.finish(pipe, images, output_type)
    if inpaint is not None and output_type != "latent":
        return [inpaint.paste_back(generated) for generated in images]
    return images


#: why FLUX.1 Fill takes no true CFG (diffusers' FluxFillPipeline has none)
FILL_TRUE_CFG = "FLUX.1 Fill runs on its distilled guidance (--cfg, default 30); drop --true-cfg-scale"


def fill_conditioning_latents(pipe: Any, given: ImageConditioning) -> Any:
    """FLUX.1 Fill's packed conditioning ``[1, tokens, 320]`` of an image conditioning: the masked image's latent
    (posterior mean, shifted and scaled) packed, then its 64-channel mask packed, on the last axis, which is
    ``FluxFillPipeline``'s ``masked_image_latents`` (``cat(packed latents, packed mask)``); each piece by the
    conditioning's rule (:meth:`~sdcore.generate.inpaint.ImageConditioning.fill_mask`)."""
    import torch

    from ...generate.pipeline import _encode_pixels

    latent = _encode_pixels(pipe, given.conditioning_pixels()).float()
    mask = given.fill_mask().to(latent.device)
    if mask.shape[-2:] != latent.shape[-2:]:
        raise ConfigError(f"the image conditioning's mask is {tuple(mask.shape[-2:])} latents, its image "
                          f"{tuple(latent.shape[-2:])}")  # fmt: skip
    return torch.cat([pipe._pack_latents(latent, *latent.shape), pipe._pack_latents(mask, *mask.shape)], dim=-1)


@contextlib.contextmanager
def fill_conditioning(transformer: Any, conditioning: Any) -> Iterator[None]:
    """While inside, FLUX.1 Fill's ``transformer`` takes the packed noisy latents ``FluxPipeline`` gives it with
    ``conditioning`` (:func:`fill_conditioning_latents`, one for the batch) joined on the last axis, as
    ``FluxFillPipeline`` joins its ``masked_image_latents``. The forward itself is wrapped (not a hook), so the
    prompt-editing hooks' own extra calls get the same input; a call whose input is already full passes as it is."""
    import torch

    had_own = "forward" in vars(transformer)
    original = transformer.forward
    full = int(transformer.config.in_channels)

    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if hidden_states.shape[-1] + conditioning.shape[-1] == full:
            extra = conditioning.to(device=hidden_states.device, dtype=hidden_states.dtype)
            hidden_states = torch.cat([hidden_states, extra.expand(hidden_states.shape[0], -1, -1)], dim=-1)
        return original(hidden_states, *args, **kwargs)

    transformer.forward = forward
    try:
        yield
    finally:
        if had_own:
            transformer.forward = original
        else:
            del transformer.forward


def run_packed(pipe: Any, kwargs: dict[str, Any], sampler: str, seeds: list[int], bundle: ModelBundle,
               hires_start: FlowStart | None, hooks: Any, noise: ImageNoise | None = None) -> Any:  # fmt: skip
    """:func:`~sdcore.generate.flow_samplers.run_pipeline` for a pipeline that packs its latents 2x2 (Flux,
    Chroma): a hires fix's first pass comes back unpacked, its second pass starts from them packed.
    ``noise``: the variation seeds (:mod:`sdcore.generate.variation`), drawn unpacked as the pipeline draws
    its noise, then packed."""
    import contextlib

    import torch

    from ...generate.flow_samplers import run_pipeline
    from ...generate.hires import flow_second_pass
    from ...generate.variation import maybe_swapped

    def pack(latents: Any) -> Any:
        return pipe._pack_latents(latents, *latents.shape)

    img2img = "strength" in kwargs  # a Kontext reference is an "image" too, but the call is a txt2img's
    if noise is not None and not img2img and hires_start is None:  # the pipeline's draw: 2 * (side // 16)
        unit = pipe.vae_scale_factor * 2
        shape = (  # the latent channels (Depth/Canny's img_in also takes the control image's)
            int(pipe.vae.config.latent_channels),
            2 * (kwargs["height"] // unit),
            2 * (kwargs["width"] // unit),
        )
        kwargs["latents"] = pack(noise.initial(shape, kwargs["prompt_embeds"].dtype, kwargs["generator"]))
    second: Any = contextlib.nullcontext()
    if hires_start is not None:
        second = flow_second_pass(pipe, kwargs, hires_start, seeds, pack, noise=noise)
    with second, maybe_swapped(noise if img2img else None, pipe.scheduler):
        images = run_pipeline(pipe, kwargs, sampler, seeds, bundle.device, hooks=hooks)
    if kwargs["output_type"] != "latent":
        return images
    return pipe._unpack_latents(torch.stack(images), kwargs["height"], kwargs["width"], pipe.vae_scale_factor)


def check_true_cfg(negatives: list[str], true_cfg_scale: float) -> None:
    """A negative prompt only acts through true CFG: without it, say how to turn it on (not a silent drop)."""
    if true_cfg_scale < 1.0:
        raise ConfigError(f"--true-cfg-scale must be at least 1 (1 = off), got {true_cfg_scale}")
    if true_cfg_scale == 1.0 and any(negative.strip() for negative in negatives):
        raise ConfigError(
            "a negative prompt on Flux.1 needs true CFG: add --true-cfg-scale above 1 (e.g. 3.5; each step then "
            "runs the transformer twice); --cfg is the distilled guidance, which has no negative prompt"
        )
