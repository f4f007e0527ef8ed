"""A1111 infotext for the sample images rendered during training (the same ``parameters`` PNG
chunk ``sdcore generate`` writes, from :mod:`sdcore.generate.pnginfo`), so an image browser,
A1111's "PNG Info" tab or Civitai shows the prompt, seed and settings of each sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import TrainOptions
    from .sample_prompts import SamplePrompt

#: a PNG text chunk holding every sample's infotext (JSON list) when a grid holds several prompts;
#: the ``parameters`` chunk holds the first one, as A1111 does for its grids
ALL_PARAMETERS_KEY = "sdcore-sample-parameters"
#: sdcore's infotext fields of an inpainting sample: the image's file name and the mask's (kohya's ``--i``: its kind;
#: OneTrainer's: the mask file's name; ``full`` for OneTrainer's FLUX.1 Fill sample without ``sample_inpainting``,
#: a blank image under a full mask)
INPAINT_IMAGE, INPAINT_MASK, WOBBLY_ELLIPSE, FULL_MASK = "Inpaint image", "Inpaint mask", "wobbly ellipse", "full"


def sample_infotexts(
    options: TrainOptions,
    step: int,
    calls: list[tuple[list[SamplePrompt], int]],
    defaults: dict[str, Any],
    images: list[Any],
    extra: dict[str, Any],
    *,
    distilled: bool = False,
    bundle: Any = None,
) -> list[str]:
    """One infotext per rendered image, from the generation ``calls`` that rendered them
    (:func:`~sdcore.train.sample_prompts.generation_calls`) with the same arguments the renderer
    used (:func:`~sdcore.train.sample_prompts.generation_arguments`: a prompt line's own options,
    the method's sampling extras, the run's ``defaults``): prompt, negative prompt, steps, sampler,
    CFG, seed (A1111's ``seed + i`` batch rule), size, model name, clip skip, training step. On a
    guidance-distilled family (``distilled``, FLUX.1) "CFG scale" is the true CFG and the guidance is
    "Distilled CFG Scale", as ``sdcore generate`` and Forge write them. With the ``bundle`` that rendered
    them, "Schedule type" where A1111 1.9+ needs it (:func:`~sdcore.generate.pipeline.schedule_type_field`) and, on an
    SD inpainting model, "Conditional mask weight" (as ``sdcore generate`` and A1111 write it). A kohya inpainting
    sample (``--i``) adds sdcore's "Inpaint image" (the file's name) and "Inpaint mask" (``wobbly ellipse``, drawn
    from the Seed; a OneTrainer one the mask file's name): it is a txt2img on that conditioning, so none of A1111's img2img/inpaint fields (denoising
    strength, mask blur, masked content) apply. A control-LoRA run's sample adds "Control image" (its ``--cn`` file's
    name), as ``sdcore generate --control-image`` writes it. A separate ``--vae`` file on SD1/SD2/SDXL adds A1111's
    "VAE hash"/"VAE", and the part files of the flow families Forge's "Module N", as ``sdcore generate`` writes
    them for the same parts (so ``generate --from-png`` takes them again)."""
    from .. import __version__
    from ..generate.pnginfo import RNG_SOURCE, SCHEDULE_TYPE, format_parameters, module_fields, vae_fields
    from ..models.flux.variants import embeds_guidance
    from ..models.parts import given_parts
    from .sample_prompts import generation_arguments

    try:
        from ..generate.pipeline import schedule_type_field

        format_parameters("", sampler="euler_a")  # needs the generation pipeline's sampler table
    except ImportError:  # a partial install (or a test's stand-in pipeline): samples without infotext
        return []
    o = options
    model = str(o.model)
    model_name = model if model.startswith("tiny:") else Path(model).stem
    per_image: list[tuple[str, str, int, dict[str, Any], SamplePrompt]] = []
    for group, first_seed in calls:
        arguments = generation_arguments(group, defaults, extra, distilled=distilled)
        negatives = arguments.get("negative_prompt", "")
        for index, prompt in enumerate(group):
            negative = negatives if isinstance(negatives, str) else negatives[index]
            per_image.append((prompt.prompt, negative, first_seed + index, arguments, prompt))
    from .inpainting import bundle_kind, renders_on_blank

    kind = bundle_kind(bundle)
    takes_mask = kind is not None  # an SD inpainting UNet or FLUX.1 Fill
    from ..models.flux.control import CONTROL_FIELD
    from ..models.flux.variants import is_flux_control

    control = getattr(bundle, "family", None) == "flux" and is_flux_control(bundle)  # a control-LoRA run's --cn
    family = getattr(bundle, "family", None)
    vae = vae_fields(o.vae, family) if family else {}  # right after "Model", as generate writes them
    modules = module_fields(given_parts(o), family) if family else {}  # Forge's: last, after "Version"
    texts = []
    for (prompt_text, negative, seed, arguments, sample), image in zip(per_image, images, strict=False):
        fields: dict[str, Any] = {}
        if bundle is not None:
            fields[SCHEDULE_TYPE] = schedule_type_field(bundle, str(arguments["sampler"]))
        fields.update(vae)
        if bundle is not None and getattr(bundle, "inpainting", False):
            # an SD inpainting UNet renders on A1111's image conditioning at the default weight 1, and A1111
            # writes the weight whenever that conditioning is used (txt2img too), before "Clip skip"
            from ..generate.inpaint import CONDITIONAL_MASK_WEIGHT

            fields[CONDITIONAL_MASK_WEIGHT] = 1.0
        # a OneTrainer inpainting sample on a model without the mask input renders from text (as in OneTrainer)
        if sample.inpaint_image is not None and (sample.inpaint_mask is None or takes_mask):
            fields[INPAINT_IMAGE] = Path(sample.inpaint_image).name
            fields[INPAINT_MASK] = WOBBLY_ELLIPSE if sample.inpaint_mask is None else Path(sample.inpaint_mask).name
        elif renders_on_blank(sample, kind):  # under a full mask the image is cut away whole: no image to name
            fields[INPAINT_MASK] = FULL_MASK
        if sample.control_image is not None and control:  # as sdcore generate --control-image writes it
            fields[CONTROL_FIELD] = Path(sample.control_image).name
        if o.clip_skip > 1:
            fields["Clip skip"] = o.clip_skip
        fields["RNG"] = RNG_SOURCE
        if distilled and (bundle is None or embeds_guidance(bundle)):  # Forge: not on schnell
            fields["Distilled CFG Scale"] = float(arguments.get("cfg", 7.0))
        fields["Training step"] = step
        fields["Version"] = f"sdcore {__version__}"
        fields.update(modules)
        texts.append(
            format_parameters(
                prompt_text,
                negative,
                arguments["steps"],
                str(arguments["sampler"]),
                float(arguments.get("true_cfg_scale", 1.0) if distilled else arguments.get("cfg", 7.0)),
                seed,
                image.size,
                None,
                model_name,
                fields,
            )
        )
    return texts


def grid_pnginfo(texts: list[str]) -> Any:
    """The PNG text chunks of a sample grid: ``parameters`` (the first image's) and, for several
    images, :data:`ALL_PARAMETERS_KEY` with all of them."""
    from PIL.PngImagePlugin import PngInfo

    from ..generate.pnginfo import PARAMETERS_KEY

    info = PngInfo()
    if texts:
        add = info.add_text if texts[0].isascii() else info.add_itxt
        add(PARAMETERS_KEY, texts[0])
    if len(texts) > 1:
        info.add_itxt(ALL_PARAMETERS_KEY, json.dumps(texts, ensure_ascii=False))
    return info


__all__ = [
    "ALL_PARAMETERS_KEY",
    "FULL_MASK",
    "INPAINT_IMAGE",
    "INPAINT_MASK",
    "WOBBLY_ELLIPSE",
    "grid_pnginfo",
    "sample_infotexts",
]
