"""Training a FLUX.1 control LoRA (BFL's Depth/Canny layout): what the runtime checks before anything loads.

A control LoRA makes FLUX.1 dev take a control image (a depth map, canny edges, a pose drawing ...) beside the
noisy latents: dev's ``img_in`` is widened from 64 to 128 inputs with zero columns for the run
(:func:`sdcore.models.flux.control.widen_img_in`), each training image's control image (paired by file stem as
FLUX.1 Kontext's are: :mod:`sdcore.train.kontext_data`) is VAE-encoded like the image and joined to the noisy
latents on the channels at every step (:func:`sdcore.models.flux.control.join_control`), and the LoRA (over the
Linears diffusers' script picks, ``--lora-layers``: ``img_in``'s widened input always) learns to use it. That is diffusers'
``examples/flux-control/train_control_lora_flux.py``; the method that trains it (``sdcore train lora
--control-lora``) declares :attr:`sdcore.train.method.Capabilities.control_channels`, and this module refuses in
the pre-flight what such a run cannot be, all problems at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..data.dataset import DatasetIndex
    from ..models.layout import ModelLayout
    from .options import TrainOptions

#: the flag, as the pre-flight's lines name it
FLAG = "--control-lora"

#: why a family other than FLUX.1 has no control LoRA
_OTHER_FAMILIES = {
    "chroma": "Chroma is built from schnell without the guidance embedding, and no control release exists for it",
    "sd3": "SD3's MMDiT has no control input on its patch embedding (SD3 ControlNets are separate models)",
}
_UNET = "its UNet takes no control image on its input (SD ControlNets are separate models)"


def control_lora_family_problems(layout: ModelLayout) -> list[str]:
    """The model a control LoRA is trained on must be FLUX.1 dev itself, read from its header: BFL's control
    LoRAs (and diffusers' trainer) widen dev's 64-wide ``img_in``; schnell has no guidance embedding (the
    Depth/Canny releases are distilled from dev), Fill's ``img_in`` already takes a mask and masked image,
    Depth/Canny's already take a control image. A Kontext [dev] single file reads as dev; its folder is refused
    when it loads (:func:`kontext_refusal`)."""
    head = f"{FLAG} trains a FLUX.1 [dev] control LoRA (dev's img_in widened to take a control image)"
    family = layout.family
    if family != "flux":
        why = _OTHER_FAMILIES.get(family, _UNET)
        return [f"{head}; this model is {family}: {why}"]
    config = layout.configs.get("transformer") or {}
    width = int(config.get("in_channels", 64))
    if width == 384:
        return [f"{head}; this model is FLUX.1 Fill, whose img_in already takes a mask and masked image"]
    if width == 128:
        return [
            f"{head}; this model is FLUX.1 Depth/Canny, whose img_in already takes a control image (train the "
            "control LoRA on FLUX.1 dev)"
        ]
    if width != 64:
        return [f"{head}; this model's img_in takes {width} inputs, not dev's 64"]
    if not config.get("guidance_embeds", True):
        return [
            f"{head}; this model is FLUX.1 schnell, which has no guidance embedding (the control releases and "
            "their LoRAs are distilled from dev)"
        ]
    return []


def kontext_refusal(source: str) -> str:
    """The line for a FLUX.1 Kontext model, known once it loads: its control images are references joined as
    tokens, and a control LoRA's on the channels; one model cannot take both."""
    return (
        f"{FLAG}: {source} is FLUX.1 Kontext, which takes its control image as a reference to edit (tokens beside "
        "the latents); a control LoRA joins it on the channels of FLUX.1 dev: train it on dev"
    )


def control_lora_problems(options: TrainOptions, index: DatasetIndex | None) -> list[str]:
    """What the run needs beside the model: control images (the missing ones are listed by
    :func:`sdcore.train.kontext_data.control_problems`). Its sample prompts are :func:`control_sample_checks`'."""
    from .kontext_data import has_control

    problems: list[str] = []
    if index is not None and index.entries and not any(has_control(e) for e in index.entries):
        problems.append(
            f"{FLAG} needs a control image beside every training image: give --control-dir (a folder of images "
            "named like the training images), or control_directory for each subset of a dataset TOML"
        )
    return problems


def control_sample_checks(options: TrainOptions, *, control: bool, family: str | None) -> tuple[list[str], list[str]]:
    """The pre-flight's ``(problems, notes)`` for the control images of the sample prompts (kohya's ``--cn``,
    :mod:`sdcore.train.sample_prompts`). A control-LoRA run (``control``) renders every sample on its control image,
    so each line needs a readable one (:func:`~sdcore.train.sample_prompts.control_image_problems`); any other run
    renders without it and a note says so (kohya reads ``--cn`` for a ControlNet only). A prompt file that cannot be
    read gives nothing here: :func:`sdcore.train.preflight.option_problems` reports it."""
    if not options.sample_prompts or not options.sample_prompts.strip():
        return [], []
    from ..errors import SdcoreError
    from .sample_prompts import control_image_problems, ignored_control_note, read_sample_prompts

    try:
        prompts = read_sample_prompts(options.sample_prompts, family)
    except SdcoreError:
        return [], []
    if control:
        return control_image_problems(prompts), []
    note = ignored_control_note(prompts)
    return [], [note] if note is not None else []


def control_lora_notes(options: TrainOptions) -> list[str]:
    """The guidance the run trains at and why (given, or diffusers' script's default), against what generation
    will use (no refusal: any value trains)."""
    from ..models.flux.control import CANNY_GUIDANCE, DEPTH_GUIDANCE
    from .objectives import CONTROL_TRAINING_GUIDANCE, training_guidance

    value = training_guidance(options, control=True)
    script = "diffusers' train_control_lora_flux.py"
    if options.guidance_scale is None:
        why = f"--guidance-scale not given: {script}'s default, which it trains and validates at"
    else:
        why = f"--guidance-scale given; {script}'s default is {CONTROL_TRAINING_GUIDANCE:g}"
    return [
        f"{FLAG}: the guidance embedding gets {value:g} while training and in samples without --g or --sample-cfg "
        f"({why}); sdcore generate runs a control LoRA at {DEPTH_GUIDANCE:g} ({CANNY_GUIDANCE:g} when its file "
        "name says canny) unless --cfg says otherwise"
    ]


__all__ = [
    "FLAG",
    "control_lora_family_problems",
    "control_lora_notes",
    "control_lora_problems",
    "control_sample_checks",
    "kontext_refusal",
]
