"""``sdcore generate --from-png``: a PNG's infotext turned back into ``generate`` options (A1111's "PNG Info ->
Send to txt2img").

What A1111 restores from an infotext (``modules/infotext_utils.py`` ``parse_generation_parameters`` and the
txt2img paste fields; facts rewritten here): prompt, negative prompt, steps, sampler and "Schedule type", CFG
scale, seed, size (the first pass's with a hires fix), "Clip skip" (missing: 1), the "Hires ..." fields with
"Denoising strength", Forge's "Distilled CFG Scale" and hires CFG fields, and "Tiling". An old "Hypernet: name"
field with "Hypernet strength" (default 1.0) becomes ``<hypernet:name:strength>`` at the end of the prompt;
"Variation seed", "Variation seed strength" and "Seed resize from" set ``--subseed``, ``--subseed-strength``
and ``--seed-resize-from``. kohya's "AddNet Model N" fields become ``<lora:name:weight>`` tags after the prompt,
and "Lora hashes" find a LoRA saved under another name, as A1111's Lora extension does on paste
(:mod:`~sdcore.generate.recall_networks`).

sdcore maps each field onto the option that sets it (:attr:`Recalled.values`, keyed by the ``generate``
parameter names); options given on the command line win over them. What cannot be applied is said, not
dropped in silence: an unknown sampler is an error listing sdcore's; a model hash other than ``--model``'s
is a warning naming both (without ``--model`` the PNG's "Model hash"/"Model" pick the checkpoint:
:func:`~sdcore.generate.model_paths.find_png_model`), and so is a "VAE hash"/"VAE" other than ``--vae``'s (without
``--vae`` they pick the VAE file, or a warning says it was not found:
:func:`~sdcore.generate.model_paths.find_png_vae`); other fields (``ENSD``, "Schedule type" values sdcore's sampler
does not run, an ``RNG`` other than sdcore's CPU noise, a "Denoising strength" of an img2img image without
``--init-image``) are listed on one line as ignored (:meth:`Recalled.notes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..console import warning_line
from ..errors import ConfigError
from .pnginfo import (
    RNG_SOURCE,
    SCHEDULE_TYPE,
    VAE_FIELDS,
    GenerationParameters,
    is_module_field,
    read_png_parameters,
)
from .tiling import TILING_FIELD
from .variation import SEED_RESIZE_FROM, VARIATION_SEED, VARIATION_STRENGTH

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..models.bundle import ModelBundle

DISTILLED_CFG = "Distilled CFG Scale"
#: fields a hires fix consumes (hires.hires_from_fields) besides "Denoising strength"
_HIRES_FIELDS = (
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Hires sampler",
    "Hires prompt",
    "Hires negative prompt",
    "Hires CFG Scale",
    "Hires Distilled CFG Scale",
)
#: fields that say what was used but set nothing: the networks come from the prompt's tags ("Lora hashes" only
#: re-point them: recall_networks)
_INFORMATIONAL = frozenset({"Version", "Lora hashes", "TI hashes", "Hypernet hashes", "Hypernet strength"})
#: fields whose value is checked against what sdcore will do (see Recalled.notes)
_CHECKED = frozenset({SCHEDULE_TYPE, "Hires schedule type", "RNG", DISTILLED_CFG, "Denoising strength", "Hypernet",
                      *VAE_FIELDS})  # fmt: skip


@dataclass
class Recalled:
    """What an infotext sets. ``values``: ``generate`` parameter name -> value (only the ones it names);
    ``cfg``/``distilled_cfg``: its "CFG scale" and "Distilled CFG Scale", mapped by :meth:`cfg_values` once the
    model says whether it is guidance-distilled; ``strength``: its "Denoising strength" (the hires pass's, or
    an img2img image's, then also ``img2img_strength``), for ``--denoising-strength`` when the hires fix or
    ``--init-image`` uses it; ``ignored``: ``"Key: value"`` of fields sdcore has no option for."""

    parameters: GenerationParameters
    values: dict[str, Any] = field(default_factory=dict)
    cfg: float | None = None
    distilled_cfg: float | None = None
    strength: float | None = None
    img2img_strength: float | None = None
    ignored: list[str] = field(default_factory=list)
    #: a ComfyUI graph's flow-family schedule check (``comfy_recall.FlowSchedule.check``): its lines, and whether
    #: it replaces the "Schedule type" check (on a flow family)
    flow_schedule: Callable[[ModelBundle, str, tuple[int, int] | None], tuple[list[str], bool]] | None = None
    #: a ComfyUI graph's separate loaders mapped into ``values`` (its ignored-line text -> the part options set):
    #: they go with the graph's model, so a given ``--model`` drops them and the line is said instead
    model_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the ComfyUI loader input ``values["model"]`` came from (``ckpt_name``, or UNETLoader's ``unet_name``), for
    #: the lines that say where the model was taken from
    model_input: str = "ckpt_name"

    def cfg_values(self, distilled: bool) -> dict[str, float]:
        """``cfg``/``true_cfg_scale`` values: on a guidance-distilled family (FLUX.1) "CFG scale" is the true
        CFG and "Distilled CFG Scale" the embedded guidance (``--cfg``), as Forge writes and pastes them;
        elsewhere "CFG scale" is ``--cfg``."""
        found: dict[str, float] = {}
        if distilled:
            if self.distilled_cfg is not None:
                found["cfg"] = self.distilled_cfg
            if self.cfg is not None:
                found["true_cfg_scale"] = max(1.0, self.cfg)
        elif self.cfg is not None:
            found["cfg"] = self.cfg
        return found

    def notes(
        self,
        bundle: ModelBundle,
        *,
        sampler: str,
        hires_sampler: str | None,
        distilled: bool,
        model_hash: str | None,
        legacy_model_hash: str | None = None,
        init_image: bool = False,
        size: tuple[int, int] | None = None,
        reference_image: bool = False,
        mask: bool = False,
        control_image: bool = False,
    ) -> list[str]:
        """One line per thing the image will not follow: a different model hash, a FLUX.1 Kontext edit's
        reference image not given (``reference_image``: ``--reference-image`` is), an inpainting's mask not given
        (``mask``: ``--mask`` is), a FLUX.1 Depth/Canny image's control image not given (``control_image``:
        ``--control-image`` is), then the ignored fields. ``size``: the image's (width, height), which decides
        whether a flow family's sigmas are Forge's "Simple" (FLUX.1 dev's shift follows the token count)."""
        from ..models.flux.kontext import REFERENCE_FIELD

        lines: list[str] = []
        wanted = self.parameters.model_hash
        ours = legacy_model_hash if wanted is not None and len(wanted) == 8 else model_hash
        if wanted and ours and wanted.lower() != ours.lower():
            named = f" ({self.parameters.model_name})" if self.parameters.model_name else ""
            lines.append(warning_line(f"the PNG was made with model hash {wanted}{named}, --model has {ours}"))
        extra = self.parameters.extra
        if REFERENCE_FIELD in extra and not reference_image:
            lines.append(
                warning_line(
                    f"the PNG is a FLUX.1 Kontext edit of {extra[REFERENCE_FIELD]}; without --reference-image "
                    "this makes a new image instead"
                )
            )
        from ..models.flux.control import CONTROL_FIELD

        if CONTROL_FIELD in extra and not control_image:
            lines.append(
                warning_line(
                    f"the PNG is a FLUX.1 Depth/Canny image controlled by {extra[CONTROL_FIELD]}; give it (or "
                    "another) with --control-image: those models generate with one only"
                )
            )
        from .inpaint import CONDITIONAL_MASK_WEIGHT, FIELDS

        if not mask and any(name in extra for name in FIELDS if name != CONDITIONAL_MASK_WEIGHT):
            lines.append(
                warning_line(
                    "the PNG is an inpainting (A1111's Inpaint fields); without --init-image and --mask this "
                    "makes a whole new image instead"
                )
            )
        ignored = list(self.ignored)
        schedule = extra.get(SCHEDULE_TYPE)
        flow_lines, checked = self.flow_schedule(bundle, sampler, size) if self.flow_schedule else ([], False)
        ignored += flow_lines
        if schedule is not None and not checked and not _schedule_matches(bundle, sampler, schedule, size):
            ignored.append(f"{SCHEDULE_TYPE}: {schedule} ({_own_schedule(bundle, sampler, schedule)})")
        hires_schedule = extra.get("Hires schedule type")
        hires_sampler = hires_sampler or sampler
        if hires_schedule is not None and not _schedule_matches(bundle, hires_sampler, hires_schedule):
            ignored.append(f"Hires schedule type: {hires_schedule}")
        rng = extra.get("RNG")  # A1111 leaves the field out for its default GPU source: say that it is absent
        if rng is None:
            ignored.append("RNG: not given, A1111's default GPU noise (sdcore draws CPU noise, A1111's 'CPU' source)")
        elif rng != RNG_SOURCE:
            ignored.append(f"RNG: {rng} (sdcore draws CPU noise, A1111's 'CPU' source)")
        if DISTILLED_CFG in extra and not distilled:
            ignored.append(f"{DISTILLED_CFG}: {extra[DISTILLED_CFG]} (not a guidance-distilled model)")
        if self.img2img_strength is not None and not init_image:
            ignored.append(f"Denoising strength: {extra['Denoising strength']} (img2img: pass --init-image)")
        if ignored:
            lines.append("ignored from the PNG (sdcore has no option for them): " + ", ".join(ignored))
        return lines


def _own_schedule(bundle: ModelBundle, sampler: str, value: str) -> str:
    """Why a "Schedule type" is not followed: FLUX.1 dev's Euler is Forge's "Simple" at 1024x1024 only."""
    from .flow_samplers import forge_schedule_type

    if bundle.family_spec.denoiser != "unet" and forge_schedule_type(bundle, sampler, (1024, 1024)) == value:
        return (
            f"sdcore's {sampler} shifts the sigmas by the image's token count, as diffusers does; they are Forge's "
            f"{value}, whose shift is fixed, at 1024x1024 only"
        )
    return f"sdcore's {sampler} runs its own"


def _schedule_matches(bundle: ModelBundle, sampler: str, value: str, size: tuple[int, int] | None = None) -> bool:
    """Whether an infotext's "Schedule type" names the sigmas sdcore's ``sampler`` runs on ``bundle`` (at
    ``size`` on a flow family: see :func:`~sdcore.generate.flow_samplers.forge_schedule_type`)."""
    from .pipeline import _TIMESTEP_SAMPLERS, make_scheduler, sampler_id, schedule_type, schedule_type_field

    written = schedule_type_field(bundle, sampler, size)
    if bundle.family_spec.denoiser != "unet":  # Forge's Automatic there is neither diffusers' nor Simple/Normal
        return value == written
    if value == written or (written is None and value == "Automatic"):
        return True
    try:
        sid = sampler_id(sampler)
        return sid in _TIMESTEP_SAMPLERS or value == schedule_type(make_scheduler(bundle, sid))
    except ConfigError:
        return False


def recall_parameters(parameters: GenerationParameters, *, sampler_given: bool = False) -> Recalled:
    """The ``generate`` options an infotext sets (see the module docstring). ``sampler_given``: ``--sampler``
    is on the command line, so the infotext's sampler is not used (and one sdcore lacks is no error)."""
    from .pipeline import SAMPLERS, sampler_id

    recalled = Recalled(parameters)
    values = recalled.values
    extra = parameters.extra
    prompt = parameters.prompt
    if "Hypernet" in extra:  # A1111's parse_generation_parameters appends it to the prompt
        prompt += f"<hypernet:{extra['Hypernet']}:{extra.get('Hypernet strength', '1.0')}>"
    from .recall_networks import addnet_tags

    addnet, addnet_fields, _ = addnet_tags(extra)  # kohya's Additional Networks LoRAs, as A1111's paste adds them
    if addnet:
        prompt += "\n" + addnet
    values["prompt"] = prompt
    values["negative"] = parameters.negative_prompt
    if parameters.steps is not None:
        values["steps"] = parameters.steps
    if parameters.sampler is not None and not sampler_given:
        try:
            values["sampler"] = sampler_id(parameters.sampler)
        except ConfigError:
            raise ConfigError(
                f"the PNG's sampler {parameters.sampler!r} is not one sdcore has; pass --sampler with one of: "
                + ", ".join(SAMPLERS)
            ) from None
    if parameters.seed is not None:
        values["seed"] = parameters.seed
    if parameters.size is not None:
        values["size"] = parameters.size
    recalled.cfg = parameters.cfg
    try:
        values["clip_skip"] = int(extra.get("Clip skip", 1))
        if DISTILLED_CFG in extra:
            recalled.distilled_cfg = float(extra[DISTILLED_CFG])
        hires = parameters.hires_fix()
        if "Denoising strength" in extra:
            recalled.strength = float(extra["Denoising strength"])
            if hires is None:
                recalled.img2img_strength = recalled.strength
    except ValueError as exc:
        raise ConfigError(f"the PNG's infotext has an invalid value: {exc}") from None
    if extra.get(TILING_FIELD) is not None:
        values["tiling"] = extra[TILING_FIELD] == "True"
    from ..models.flux.control import CONTROL_FIELD
    from ..models.flux.kontext import REFERENCE_FIELD, REFERENCE_RESIZE_FIELD

    if extra.get(REFERENCE_RESIZE_FIELD) is not None:  # "none": --no-reference-resize
        values["reference_resize"] = extra[REFERENCE_RESIZE_FIELD] != "none"
    from .inpaint import FIELDS as INPAINT_FIELDS
    from .inpaint import inpaint_from_fields

    try:  # A1111's inpainting fields ("Mask blur", "Masked content" ...): the --mask options (not the mask)
        values.update(inpaint_from_fields(extra))
    except ValueError as exc:
        raise ConfigError(f"the PNG's infotext has an invalid value: {exc}") from None
    from .skip_layer_guidance import FIELDS as SLG_FIELDS
    from .skip_layer_guidance import SkipLayerGuidance

    try:  # sdcore's Skip Layer Guidance fields: --slg-layers and its options
        values.update(SkipLayerGuidance.option_values(extra))
    except ValueError as exc:
        raise ConfigError(f"the PNG's infotext has an invalid value: {exc}") from None
    variation = parameters.variation_seeds()  # A1111's "Variation seed" / "Seed resize from" fields
    if variation is not None:
        values.update(
            subseed=variation.subseed, subseed_strength=variation.strength, seed_resize_from=variation.resize_from
        )
    if hires is not None:
        values.update(
            hires=True,
            hr_scale=hires.scale,
            hr_resize_x=hires.resize_x,
            hr_resize_y=hires.resize_y,
            hr_upscaler=hires.upscaler,
            hr_steps=hires.steps,
            hr_prompt=hires.prompt,
            hr_negative=hires.negative_prompt,
            hr_sampler=hires.sampler,
            hr_cfg=hires.cfg,
            hr_distilled_cfg=hires.distilled_cfg,
        )
    used = {*_INFORMATIONAL, *_CHECKED, TILING_FIELD, "Clip skip", VARIATION_SEED, VARIATION_STRENGTH, SEED_RESIZE_FROM,
            REFERENCE_FIELD, REFERENCE_RESIZE_FIELD, CONTROL_FIELD, *INPAINT_FIELDS, *SLG_FIELDS, *addnet_fields}  # fmt: skip
    if hires is not None:
        used.update(_HIRES_FIELDS)
    if extra.get("Hires checkpoint", "Use same checkpoint") == "Use same checkpoint":
        used.add("Hires checkpoint")
    # Forge's "Module N": the part files, taken by generate (builtin/generate_command.py _modules_from_png)
    recalled.ignored = [
        f"{key}: {value}" for key, value in extra.items() if key not in used and not is_module_field(key)
    ]
    return recalled


def recall_png(path: str | os.PathLike[str], *, sampler_given: bool = False) -> Recalled:
    """:func:`recall_parameters` of an image's infotext (a PNG's ``parameters`` chunk, a JPEG's or WebP's EXIF
    UserComment: :func:`~.pnginfo.read_png_parameters`); without one, of a ComfyUI PNG's ``prompt`` graph (or a
    ComfyUI WebP's, in its EXIF: :func:`~.comfy_recall.read_comfy_prompt`)
    (:func:`~.comfy_recall.recall_comfy`); a one-line error when it has neither."""
    from .comfy_recall import read_comfy_prompt, recall_comfy

    try:
        parameters = read_png_parameters(path)
        graph = read_comfy_prompt(path) if parameters is None else None
    except OSError as exc:
        raise ConfigError(f"--from-png {path}: cannot read the image ({exc})") from None
    if parameters is None and graph is not None:
        from PIL import Image

        with Image.open(path) as image:  # the header only: a hires graph's size is checked against it
            size = image.size
        return recall_comfy(graph, sampler_given=sampler_given, image_size=size)
    if parameters is None:
        raise ConfigError(
            f"--from-png {path}: the image has no generation parameters (no 'parameters' PNG text, no EXIF "
            "UserComment, no ComfyUI 'prompt')"
        )
    return recall_parameters(parameters, sampler_given=sampler_given)


__all__ = ["DISTILLED_CFG", "VAE_FIELDS", "Recalled", "recall_parameters", "recall_png"]
