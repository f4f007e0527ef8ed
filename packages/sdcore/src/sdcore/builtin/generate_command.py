"""``sdcore generate``: txt2img / img2img with A1111 prompt syntax and plugin networks.

Import-light on purpose (click only; torch, diffusers and the model loader are imported when the
command runs) so ``sdcore --help`` stays fast.

Plugins that need their own generation options (aesthetic gradients: ``--aesthetic``) have two
ways in, neither needing a new hook:

- every user can pass ``-O key=value`` (repeatable); the pairs reach every prompt-network handler
  as ``handler.options`` (strings);
- a plugin can add a real flag from its ``sdcore_register_commands`` hook with
  :func:`add_generate_option` (``add_generate_option("--aesthetic", help=..., default=None)``); its
  value lands in ``handler.options`` under the parameter name (``"aesthetic"``), typed by click.
  Options whose name ends in ``_dir`` are also offered as handler folders (like ``--lora-dir``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..cli_types import FINITE_FLOAT, FiniteFloatRange
from ..console import warn, warning_line
from ..devices import DEVICE, DEVICE_HELP
from ..hinted_command import HintedCommand, hint_key
from ..hookspecs import hookimpl
from .part_options import models_dir_given, models_dir_options, option_defaulted, part_kwargs, part_options

_SAMPLER_HELP = (
    "euler_a, euler, dpm++2m, dpm++2m_karras, ddim, lms, heun, pndm, unipc (A1111 names such as 'Euler a' work too)"
)
_AXIS_HELP = (
    "Seed, 'Var. seed', 'Var. strength', Steps, 'Hires steps', 'CFG Scale' (FLUX.1: the true CFG), "
    "'Distilled CFG Scale' (FLUX.1's guidance, --cfg), 'Prompt S/R', Sampler, 'Hires sampler', 'Clip skip', "
    "Denoising, 'Hires upscaler' (A1111's and Forge's names), 'SLG scale' (SD3's --slg-scale)."
)
_DIRECTORY_OPTIONS = ("lora_dir", "embeddings_dir", "hypernetwork_dir")


def _parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    text = value.lower().replace(" ", "")
    width, sep, height = text.partition("x")
    if not sep:
        width = height = text
    try:
        size = int(width), int(height)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT (for example 512x768) or a single number") from None
    from ..generate.hires import MAX_SIDE

    if max(size) > MAX_SIDE:  # before the model loads (the multiple of the model's factor is checked with it)
        raise click.BadParameter(f"{value!r}: sdcore makes image sides of at most {MAX_SIDE}")
    return size


def _parse_pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        pairs[key.strip().replace("-", "_")] = value
    return pairs


def _parse_fill(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A1111's "Masked content": its names, or the API's ``inpainting_fill`` numbers 0-3."""
    if value is None:
        return None
    from ..generate.inpaint import FILL_MODES

    text = value.strip().lower().replace("_", " ")
    if text.isdigit() and int(text) < len(FILL_MODES):
        return FILL_MODES[int(text)]
    if text not in FILL_MODES:
        raise click.BadParameter(f"{value!r}: choose one of {', '.join(FILL_MODES)} (or 0-3, A1111's API numbers)")
    return text


def _output_format(value: str) -> Path:
    """``-o`` checked as it is parsed: its suffix must be an image type sdcore writes, said before anything loads.

    A folder (one that exists, or a name ending in ``/``, A1111's ``--outdir`` habit) is refused with the file
    name to give: ``Path("outdir/")`` drops the slash, so ``-o outdir/`` used to write one PNG named ``outdir``."""
    from ..errors import ConfigError
    from ..generate.pnginfo import image_format

    output = Path(value)
    if value.endswith(("/", os.sep)) or output.is_dir():
        raise click.BadParameter(
            f"{value} is a folder; -o names the image file, e.g. -o {output / 'output.png'} "
            "(a batch writes output-0.png, output-1.png ...; missing folders are made)"
        )
    try:
        image_format(output)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    return output


def _save_options(params: dict[str, Any]) -> dict[str, Any]:
    """:func:`~sdcore.generate.pnginfo.save_image`'s format options from the command's (a warning on stderr)."""
    return {
        "jpeg_quality": params["jpeg_quality"],
        "webp_lossless": params["webp_lossless"],
        "overwrite": params["overwrite"],
        "warn": warn,
    }


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix or '.png'}") for index in range(count)]


_IN_THE_SAMPLER = "the schedule goes with the sampler's name, as A1111 wrote it before 1.9: --sampler 'DPM++ 2M Karras'"
_NO_REFINER = (
    "sdcore has no refiner switch inside one run: refine the image afterwards with --model the refiner, "
    "--init-image the image and a low --strength"
)
_NO_ETA = "sdcore has no eta setting: its samplers run A1111's defaults (eta 1 on Euler a, 0 on DDIM)"
_NO_CHURN = "sdcore has no sigma churn/noise settings: its samplers run A1111's defaults (s_churn 0, s_noise 1)"
#: what other tools' option names are here, keyed by :func:`~sdcore.hinted_command.hint_key` (plugins add theirs with
#: :func:`add_generate_option_hint`): click's nearest spelling can name an option that means something else
#: (``--cfg-scale`` got "did you mean --hr-scale, --slg-scale, --true-cfg-scale", none of them A1111's CFG Scale).
#: The names of A1111's API and prompts-from-file tags and of kohya's ``gen_img.py`` that sdcore spells otherwise.
_OPTION_HINTS: dict[str, str] = {
    "cfg-scale": "A1111's CFG Scale is --cfg",
    "scale": "kohya gen_img.py's --scale, the CFG scale, is --cfg",
    "guidance-scale": "the CFG scale is --cfg (FLUX.1: its embedded guidance; --true-cfg-scale its true CFG)",
    "prompt": 'the prompt is the command\'s argument: sdcore generate "a cat" (or --from-file for several)',
    "negative-prompt": "the negative prompt is --negative (-n)",
    "sampler-name": "A1111's sampler name is --sampler (its names too: --sampler 'DPM++ 2M Karras')",
    "width": "width and height are --size WIDTHxHEIGHT",
    "height": "width and height are --size WIDTHxHEIGHT",
    "w": "kohya gen_img.py's --W/--H are --size WIDTHxHEIGHT",
    "h": "kohya gen_img.py's --W/--H are --size WIDTHxHEIGHT",
    "batch-size": "A1111's batch size is --batch",
    "images-per-prompt": "kohya gen_img.py's images per prompt are --batch (image i has seed+i)",
    "ckpt": "the model is --model (-m): a file, a diffusers folder or a name in --models-dir",
    "outdir": "the output is a file, -o/--output NAME.png (a batch writes NAME-0.png, NAME-1.png ...)",
    "network-weights": "LoRA files are written in the prompt, <lora:NAME:WEIGHT>, found in --lora-dir",
    "network-mul": "a LoRA's weight is written in the prompt, <lora:NAME:WEIGHT>",
    "network-module": "LoRA files are written in the prompt, <lora:NAME:WEIGHT>; their kind is read from the file",
    "textual-inversion-embeddings": "embeddings are read from --embeddings-dir and used by their name in the prompt",
    "fp16": "half precision is --dtype fp16",
    "bf16": "bfloat16 is --dtype bf16",
    "xformers": "attention is torch's scaled_dot_product_attention, always: leave the flag out",
    "sdpa": "attention is torch's scaled_dot_product_attention, always: leave the flag out",
    "vae-batch-size": "the VAE decodes one batch of --batch images: leave the flag out",
    # A1111 1.9+/Forge's Schedule type, diffusers' and ComfyUI's names
    "scheduler": _IN_THE_SAMPLER,
    "schedule-type": _IN_THE_SAMPLER,
    "num-inference-steps": "the number of steps is --steps",
    "denoise": "ComfyUI's denoise is --strength with --init-image (the hires pass's: --denoising-strength)",
    "lora": "LoRA files are written in the prompt, <lora:NAME:WEIGHT>, found in --lora-dir",
    # A1111's API fields, CompVis txt2img.py's and diffusers' names click matched to options meaning something else
    # (--enable_hr got "did you mean --sampler", --num-images "--control-image, --init-image", --eta "--ae, --vae")
    "enable-hr": "A1111's enable_hr (Hires. fix) is --hires, or any --hr-* option",
    "hr-second-pass-steps": "A1111's hires steps are --hr-steps",
    "n-samples": "txt2img.py's --n_samples, images per batch, are --batch (image i has seed+i)",
    "num-images-per-prompt": "diffusers' num_images_per_prompt is --batch (image i has seed+i)",
    "num-images": "the number of images is --batch (one batch) times --n-iter (batches)",
    "restore-faces": "sdcore has no face restoration: leave the flag out",
    "face-restoration": "sdcore has no face restoration: leave the flag out",
    "refiner": _NO_REFINER,
    "refiner-checkpoint": _NO_REFINER,
    "refiner-switch-at": _NO_REFINER,
    "eta": _NO_ETA,
    "ddim-eta": _NO_ETA,
    "eta-ancestral": _NO_ETA,
    "eta-ddim": _NO_ETA,
    "s-churn": _NO_CHURN,
    "s-noise": _NO_CHURN,
    "s-tmin": _NO_CHURN,
    "s-tmax": _NO_CHURN,
}


def add_generate_option_hint(option: str, hint: str) -> None:
    """Make ``sdcore generate OPTION`` (no such option; another tool's name for one, e.g. the A1111 aesthetic
    extension's "Is negative text") say `` (HINT)`` instead of click's nearest spellings. Dashes, case and
    underscores do not matter (``--is_negative_text`` matches ``is-negative-text``)."""
    _OPTION_HINTS[hint_key(option)] = hint


class _GenerateCommand(HintedCommand):
    """``sdcore generate``: an unknown model-family flag (``--sdxl``, from kohya's tools and other UIs) says that the
    family is read from the model, where click would suggest a near option name (``--seed``); another tool's name
    registered with :func:`add_generate_option_hint`, or an option typed with underscores, names sdcore's option."""

    def option_hint(self, ctx: click.Context, option: str) -> str | None:
        from ..train.kohya import family_flag_hint

        return family_flag_hint(option) or self.table_hint(_OPTION_HINTS, option) or self.hyphenated_hint(ctx, option)


@click.command("generate", cls=_GenerateCommand)
@click.argument("prompt", required=False)
@click.option(
    "-m",
    "--model",
    default=None,
    help="Model: diffusers folder, .safetensors/.ckpt file, a model's name in --models-dir's checkpoints/ "
    "(ComfyUI's ckpt_name: sub/name.safetensors, sub/name or name; A1111's Stable-diffusion/, ComfyUI's unet/ and "
    "diffusion_models/ too, and a folder with model_index.json below ComfyUI's diffusers/ by its relative path), an "
    "A1111 title (name [abcdef1234]: the hash is checked) or hash, a cached Hub id, "
    "tiny:<family> (sd1, sd2, sdxl, sd3, flux, ...) or toyworld:. An existing path wins over a name; a cached Hub "
    "id (org/name) over a name without extension. Required, except with --from-png: the PNG's Model hash/Model "
    "(a ComfyUI PNG: its graph's ckpt_name) picks the file below the model folders.",
)
@click.option("-n", "--negative", default="", help="Negative prompt.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000), help="Sampling steps.")
@click.option(
    "--cfg",
    default=None,
    type=FINITE_FLOAT,
    help="Classifier-free guidance scale (default 7, Chroma 5; FLUX.1: its embedded guidance, default 3.5, FLUX.1 "
    "Fill and Canny 30, Depth 10).",
)
@click.option(
    "--true-cfg-scale",
    default=1.0,
    show_default=True,
    type=FiniteFloatRange(min=1.0),
    help="Flux.1: true CFG (two passes a step), needed for --negative; --cfg is then the distilled guidance.",
)
@click.option(
    "--slg-layers",
    default=None,
    metavar="7,8,9",
    help="SD3/SD3.5: Skip Layer Guidance, skipping these transformer blocks in an extra pass on some steps "
    "(Stability's for SD3.5 Medium: 7,8,9); needs --cfg above 1. Default: none (off).",
)
@click.option(
    "--slg-scale",
    default=2.8,
    show_default=True,
    type=FINITE_FLOAT,
    help="Skip Layer Guidance scale (diffusers' default).",
)
@click.option(
    "--slg-start",
    default=0.01,
    show_default=True,
    type=FiniteFloatRange(0.0, 1.0),
    help="Skip Layer Guidance from this fraction of the steps (steps i with steps*start < i < steps*end).",
)
@click.option(
    "--slg-end",
    default=0.2,
    show_default=True,
    type=FiniteFloatRange(0.0, 1.0),
    help="Skip Layer Guidance up to this fraction of the steps.",
)
@click.option(
    "--no-slg",
    is_flag=True,
    default=False,
    help="No Skip Layer Guidance: leave out the SLG an image given with --from-png recalls (as --no-hires).",
)
@click.option(
    "--seed", default=-1, show_default=True, type=int, help="Seed (-1: random); image i of a batch uses seed+i."
)
@click.option(
    "--subseed",
    default=-1,
    show_default=True,
    type=int,
    help="A1111's variation seed (-1: random); image i of a batch uses subseed+i (and, with a strength, all --seed).",
)
@click.option(
    "--subseed-strength",
    default=0.0,
    show_default=True,
    type=FiniteFloatRange(0.0, 1.0),
    help="A1111's variation strength: 0 the seed's noise, 1 the variation seed's (slerp between them).",
)
@click.option(
    "--seed-resize-from",
    default=None,
    callback=_parse_size,
    help="A1111's 'Resize seed from' WIDTHxHEIGHT: draw the seed's noise at that size, centred in this one.",
)
@click.option(
    "--size",
    default=None,
    callback=_parse_size,
    help="WIDTHxHEIGHT (default: --init-image's or --control-image's size floored to the model's multiple, or "
    "the resized --reference-image's; without one the model's native size).",
)
@click.option(
    "--sampler",
    default=None,
    help=_SAMPLER_HELP + " (default: euler_a, or the family's own default: euler for Flux.1 and Chroma). "
    "SD3, Flux.1 and Chroma take euler, euler_a, heun, dpm++2m, unipc.",
)
@click.option(
    "--batch", default=1, show_default=True, type=click.IntRange(1, 64), help="Images per batch (A1111's Batch size)."
)
@click.option(
    "--n-iter",
    "--batch-count",
    "n_iter",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="A1111's Batch count (its slider stops at 100): this many batches of --batch one after the other, the model loaded once; image i "
    "of the whole run has seed+i (with --subseed-strength: all the seed, subseed+i).",
)
@click.option(
    "--from-file",
    default=None,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="One job per line (- reads stdin): A1111's 'Prompts from file or textbox' lines (--prompt \"...\" --steps 20 "
    "--seed 5 ...), kohya gen_img.py lines (prompt --n negative --w 512 --h 768 --d 5 --l 7 --s 20 --t 0.6), or "
    "plain prompts; every line is checked before the model loads. PROMPT, when given, joins each line's prompt.",
)
@click.option(
    "--prompt-position",
    default="start",
    show_default=True,
    type=click.Choice(["start", "end"]),
    help="--from-file: A1111's 'Insert prompts at the': a line's prompt (and negative) goes before or after PROMPT "
    "(and --negative).",
)
@click.option(
    "--iterate-seed",
    is_flag=True,
    help="--from-file: A1111's 'Iterate seed every line': line k has --seed + k * --batch * --n-iter (a -1 drawn once).",
)
@click.option(
    "--same-seed",
    is_flag=True,
    help="--from-file: A1111's 'Use same random seed for all lines': a --seed of -1 is drawn once for every line "
    "(without it, or --iterate-seed, each line draws its own).",
)
@click.option(
    "--init-image", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="img2img source image."
)
@click.option(
    "--mask",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Inpaint the init image where this mask is white (A1111's Inpaint upload; an RGBA mask's alpha). "
    "SD1/SD2/SDXL (regular and inpainting models), SD3/SD3.5, FLUX.1 (Fill too) and Chroma.",
)
@click.option(
    "--mask-blur", default=4, show_default=True, type=click.IntRange(0, 64), help="A1111's Mask blur (pixels)."
)
@click.option(
    "--inpainting-fill",
    default="original",
    show_default=True,
    callback=_parse_fill,
    help="A1111's Masked content: fill, original, 'latent noise', 'latent nothing' (or 0-3).",
)
@click.option(
    "--inpaint-full-res/--inpaint-whole-picture",
    default=False,
    help="A1111's Inpaint area: Only masked (generate the masked region at --size, paste it back) or Whole picture "
    "(the default, as A1111's).",
)
@click.option(
    "--inpaint-full-res-padding",
    default=32,
    show_default=True,
    type=click.IntRange(0, 256),
    help="A1111's Only masked padding, pixels.",
)
@click.option("--inpainting-mask-invert", is_flag=True, help="A1111's Mask mode 'Inpaint not masked'.")
@click.option(
    "--inpainting-mask-weight",
    default=1.0,
    show_default=True,
    type=FiniteFloatRange(0.0, 1.0),
    help="A1111's Inpainting conditioning mask strength (inpainting models: 1 hides the masked area from them).",
)
@click.option(
    "--reference-image",
    type=click.Path(dir_okay=False, path_type=Path),
    help="FLUX.1 Kontext: the image to edit (its tokens join the latents'; the output takes its size unless --size).",
)
@click.option(
    "--reference-resize/--no-reference-resize",
    default=True,
    help="Kontext: resize the reference to the trained resolution nearest its aspect ratio (diffusers', ComfyUI's "
    "FluxKontextImageScale; the default), or keep its own size (floored to 16).",
)
@click.option(
    "--control-image",
    type=click.Path(dir_okay=False, path_type=Path),
    help="FLUX.1 Depth/Canny [dev]: the depth map or canny edges to follow, made beforehand (stretched to the "
    "output size; the output takes its size unless --size or --init-image).",
)
@click.option(
    "--strength",
    "--denoising-strength",
    "strength",
    default=None,
    type=FiniteFloatRange(0.0, 1.0),
    help="Denoising strength: of img2img and inpainting (default 0.75, FLUX.1 Fill 1; 0 runs A1111's one step at the "
    "lowest noise) and of the hires pass (default 0.7; 0 only upscales).",
)
@click.option(
    "--hires/--no-hires",
    default=False,
    help="A1111's Hires. fix: txt2img at --size, upscale, img2img at the large size (also on SD3/Flux/Chroma, as Forge). "
    "Off by default; any --hr-* option turns it on too; --no-hires drops a --from-png image's.",
)
@click.option("--hr-scale", default=None, type=FiniteFloatRange(min=1.0), help="Hires: upscale by (default 2).")
@click.option(
    "--hr-resize-x",
    default=None,
    type=click.IntRange(min=0),
    help="Hires: resize width to (0: from the height, keeping the aspect ratio); overrides --hr-scale.",
)
@click.option(
    "--hr-resize-y",
    default=None,
    type=click.IntRange(min=0),
    help="Hires: resize height to (0: from the width); overrides --hr-scale.",
)
@click.option(
    "--hr-upscaler",
    default=None,
    help="Hires upscaler (default Latent): Latent, 'Latent (antialiased)', 'Latent (bicubic)', "
    "'Latent (bicubic antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', Lanczos, Nearest.",
)
@click.option(
    "--hr-steps",
    default=None,
    type=click.IntRange(min=0, max=1000),
    help="Hires steps (default 0: the first pass's --steps).",
)
@click.option("--hr-prompt", default=None, help="Hires pass prompt (default: PROMPT).")
@click.option("--hr-negative", default=None, help="Hires pass negative prompt (default: --negative).")
@click.option("--hr-sampler", default=None, help="Hires pass sampler (default: --sampler).")
@click.option(
    "--hr-cfg",
    default=None,
    type=FINITE_FLOAT,
    help="Forge's Hires CFG Scale: the hires pass's CFG (FLUX.1: its true CFG) (default: the first pass's).",
)
@click.option(
    "--hr-distilled-cfg",
    default=None,
    type=FINITE_FLOAT,
    help="Forge's Hires Distilled CFG Scale (FLUX.1): the hires pass's embedded guidance (default: --cfg).",
)
@click.option("--clip-skip", default=1, show_default=True, type=click.IntRange(1, 12), help="1 = last CLIP layer.")
@models_dir_options(networks=True)
@click.option(
    "--lora-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <lora:...> and <lyco:...> files (default: Lora/ below --models-dir, and ComfyUI's loras/ "
    "when it exists).",
)
@click.option(
    "--embeddings-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of embeddings (default: embeddings/ beside --models-dir, A1111's, and below it, ComfyUI's; both "
    "when both exist).",
)
@click.option(
    "--hypernetwork-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <hypernet:...> files (default: hypernetworks/ below --models-dir).",
)
@click.option(
    "-O",
    "--option",
    "extra_pairs",
    multiple=True,
    callback=_parse_pairs,
    metavar="KEY=VALUE",
    help="Extra option for network plugins (repeatable).",
)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    help="auto: fp16 on GPUs, fp32 on CPU.",
)
@click.option(
    "-o",
    "--output",
    default="output.png",
    show_default=True,
    type=click.Path(path_type=str),
    callback=lambda _ctx, _param, value: _output_format(value),
    help="Output image: .png, .jpg/.jpeg, .webp or .avif, with A1111's infotext (a PNG's 'parameters' text, "
    "else the EXIF UserComment); a batch writes NAME-0.png, NAME-1.png ... (the same suffix)",
)
@click.option("--overwrite", is_flag=True, help="Replace output files that already exist (else that is an error).")
@click.option(
    "--jpeg-quality",
    type=click.IntRange(1, 100),
    default=80,
    show_default=True,
    help="Quality of a .jpg, lossy .webp or .avif output (A1111's jpeg_quality setting).",
)
@click.option("--webp-lossless", is_flag=True, help="Write a .webp output losslessly (A1111's webp_lossless setting).")
@click.option(
    "--from-png",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take every generation parameter from this image's infotext (A1111's PNG Info -> Send to txt2img; "
    "Forge's and sdcore's too) or, without one, from the ComfyUI graph saved in it; options given here win. "
    "PROMPT is then optional, and so is --model: the file below the model folders with the image's Model hash "
    "(and Model name), or the graph's ckpt_name (UNETLoader's unet_name), is taken; without --vae, so is the VAE of its VAE hash (and VAE "
    "name) from the VAE folders, when it names one. LoRAs are found by the PNG's Lora hashes.",
)
@click.option(
    "--style", "styles", multiple=True, help="A1111 style from --styles-file, applied to the prompts (repeatable)."
)
@click.option(
    "--styles-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A1111 styles.csv (default: styles.csv in the parent of --models-dir, the A1111 root).",
)
@click.option(
    "--tiling/--no-tiling", default=False, help="A1111's Tiling: seamless textures (circular padding); default off."
)
@click.option(
    "--x-type",
    default=None,
    metavar="TYPE",
    help="A1111's X/Y/Z plot: what varies across the grid (-o is the grid): " + _AXIS_HELP,
)
@click.option(
    "--x-values",
    default=None,
    metavar="VALUES",
    help='Comma-separated (quote a value holding commas: a,"b, c"); numbers take ranges 1-5, 1-9 (+2), 0-1 [5].',
)
@click.option("--y-type", default=None, metavar="TYPE", help="X/Y/Z plot: what varies down the grid.")
@click.option("--y-values", default=None, metavar="VALUES", help="Y values (as --x-values).")
@click.option("--z-type", default=None, metavar="TYPE", help="X/Y/Z plot: one grid per value, side by side.")
@click.option("--z-values", default=None, metavar="VALUES", help="Z values (as --x-values).")
@click.option(
    "--keep-random-seeds",
    is_flag=True,
    help="A1111's 'Keep -1 for seeds': each plot cell draws its own random seed (else -1 is fixed once for all).",
)
@click.option(
    "--grid-legend/--no-grid-legend",
    default=True,
    help="A1111's 'Draw legend': label the plot's columns and rows (default: on).",
)
@click.option(
    "--grid-margin",
    default=0,
    show_default=True,
    type=click.IntRange(0, 500),
    help="A1111's 'Grid margins (px)' between the plot's cells.",
)
@click.option(
    "--grid-cells/--no-grid-cells",
    default=True,
    help="Also write each plot cell with its own infotext, as NAME-0.png, NAME-1.png ... (X varies fastest; "
    "default: on).",
)
@part_options(names=True)
def generate(**params: Any) -> None:
    """Generate images from PROMPT (A1111 syntax: (emphasis:1.2), [less], BREAK, <lora:name:0.8>)."""
    from ..errors import ConfigError

    written: list[Path] = []
    if params["model"] is None and params["from_png"] is None:  # optional with --from-png only
        context = click.get_current_context()
        raise click.MissingParameter(ctx=context, param=next(p for p in generate.params if p.name == "model"))
    try:  # Ctrl-C while --from-png or the styles file is read too
        recalled = _recall(params)
        try:
            styles, early = _chosen_styles(params), []
        except ConfigError as exc:  # reported with every other problem found before the model loads
            styles, early = [], [str(exc)]
        _run_generate(params, recalled, styles, early, written)
    except KeyboardInterrupt:  # Ctrl-C: what is on disk and where, instead of click's bare "Aborted!"
        click.echo(_interrupted_message(written), err=True)
        click.get_current_context().exit(130)  # 128 + SIGINT, what a shell reports for a process Ctrl-C ended


def _interrupted_message(written: Sequence[Path]) -> str:
    """The line ``sdcore generate`` ends with on Ctrl-C: how many images were written (each is complete:
    :func:`~sdcore.generate.pnginfo.save_image` writes atomically) and where."""
    if not written:
        return "Interrupted: no image was written"
    folders = list(dict.fromkeys(path.parent for path in written))
    if len(folders) == 1:
        names = [path.name for path in written]
        shown = ", ".join(names) if len(names) <= 5 else f"{names[0]} ... {names[-1]}"
        where = f"in {folders[0]}: {shown}"
    else:
        where = ", ".join(str(path) for path in written)
    return f"Interrupted: {len(written)} image{'s' if len(written) > 1 else ''} written {where}"


_CORE_PARAMS = frozenset(p.name for p in generate.params if p.name)


#: plugin options that do nothing without another generate option (:func:`add_generate_option`'s ``needs``):
#: option name -> the name of the option it needs
_NEEDS: dict[str, str] = {}


def add_generate_option(*param_decls: str, needs: str | None = None, **attrs: Any) -> click.Option:
    """Add a flag to ``sdcore generate`` for a plugin (call it from ``sdcore_register_commands``).

    The parsed value reaches every prompt-network handler as ``handler.options[name]``.
    Adding the same option twice is a no-op; clashing with a core option is an error.
    ``needs``: another generate option (``"--aesthetic"``) without which this one does nothing; giving it
    alone (typed, or as ``-O name=value``) is then a problem said before the model loads, as ``--iterate-seed``
    without ``--from-file`` is, instead of an option accepted and ignored in silence.
    """
    option = click.Option(list(param_decls), **attrs)
    if option.name in _CORE_PARAMS:
        raise click.UsageError(f"generate option {option.name!r} belongs to sdcore; choose another name")
    for existing in generate.params:
        if existing.name == option.name:
            return existing  # type: ignore[return-value]
    generate.params.append(option)
    if needs is not None and option.name:
        _NEEDS[option.name] = needs.lstrip("-").replace("-", "_")
    return option


def _flag_of(name: str) -> str:
    """The long flag of generate option ``name`` (``--aesthetic-weight``), for messages."""
    for param in generate.params:
        if param.name == name and isinstance(param, click.Option):
            return max(param.opts, key=len)
    return "--" + name.replace("_", "-")


def _needs_problems(params: dict[str, Any], cells: Sequence[dict[str, Any]]) -> list[str]:
    """Plugin options given without the option they need (:func:`add_generate_option`'s ``needs``), typed or
    ``-O name=value``, one line per needed option. The needed option counts as given when the command line, a
    ``-O`` pair or any cell (an X/Y/Z plot's, a ``--from-file`` line's) sets it; an option a cell sets counts
    as given too."""
    pairs: dict[str, Any] = params.get("extra_pairs") or {}
    typed = _given(params)
    wanting: dict[str, list[str]] = {}
    for name, needed in _NEEDS.items():
        set_by_cell = any(name in cell and cell[name] != params.get(name) for cell in cells)
        if name not in typed and name not in pairs and not set_by_cell:
            continue
        if params.get(needed) or pairs.get(needed) or any(cell.get(needed) for cell in cells):
            continue
        wanting.setdefault(needed, []).append(f"-O {name}" if name in pairs and name not in typed else _flag_of(name))
    return [
        f"{', '.join(names)} only act{'s' if len(names) == 1 else ''} with {_flag_of(needed)}; give "
        f"{_flag_of(needed)} or drop {'it' if len(names) == 1 else 'them'}"
        for needed, names in wanting.items()
    ]


def _plugin_manager() -> Any:
    ctx = click.get_current_context(silent=True)
    pm = getattr(ctx.obj, "pm", None) if ctx is not None else None
    if pm is None:
        from ..plugins import get_plugin_manager

        pm = get_plugin_manager()
    return pm


def _load_bundle(source: str, pm: Any, **parts: Any) -> Any:
    """Any model source ``load_model`` reads (plugin formats included); ``tiny:<family>`` too;
    ``parts``: components in separate files (``clip_l``, ``t5xxl``, ``ae``, ``t5_tokenizer``)."""
    from ..models.load import load_model

    return load_model(source, pm=pm, **parts)


def _model_from_png(params: dict[str, Any], recalled: Any, models_dir: Path | None) -> None:
    """``--from-png`` without ``--model``: the checkpoint the PNG's "Model hash" and "Model" name, found below the
    model folders (:func:`~sdcore.generate.model_paths.find_png_model`) and said on one line; not found is a
    pre-flight error (exit 2) before anything loads."""
    from ..errors import ConfigError
    from ..generate.model_paths import ExtraModelPaths, find_png_model, load_extra_model_paths, model_folders
    from ..train.preflight import PreflightError

    parameters = recalled.parameters
    trouble: list[str] = []
    try:
        if models_dir is None:
            raise ConfigError(
                f"--from-png: the PNG's model ({parameters.model_name or parameters.model_hash or 'not named'}) is "
                "looked for below --models-dir, and there is no models/ here; pass --models-dir or --model"
            )
        try:
            extra = load_extra_model_paths(models_dir, params["extra_model_paths"], [])
        except ConfigError as exc:  # the model is looked for without that file's folders; both are said
            extra, trouble = ExtraModelPaths(), [str(exc)]
        say = lambda line: click.echo(line, err=True)  # noqa: E731
        path, line = find_png_model(parameters.model_name, parameters.model_hash, model_folders(models_dir, extra), say)
    except ConfigError as exc:
        raise PreflightError(["; ".join([*trouble, str(exc)])]) from None
    click.echo(line, err=True)
    params["model"] = str(path)


def _vae_from_png(
    params: dict[str, Any], recalled: Any, models_dir: Path | None, extra: Any, given_vae: str | None
) -> str | None:
    """The PNG's VAE (A1111 writes ``VAE: name.safetensors, VAE hash: abcdef1234`` when it decodes with a VAE
    other than the model's own; its paste sets the ``sd_vae`` setting by that name): without ``--vae``, the file
    :func:`~sdcore.generate.model_paths.find_png_vae` finds (returned, with a line on stderr), or a warning line
    (the image is still made, with the model's own VAE), as is one found that does not fit the model (its latent
    channels: FLUX.1's ae named for an SD1 model); with ``--vae`` (``given_vae``: its file) of another hash or
    name, a warning naming both, as for the model hash. ``None`` where ``--vae`` stays as it is."""
    from ..generate.model_paths import find_png_vae, hash_of, is_model_hash
    from ..models.parts import vae_channel_mismatch

    fields = recalled.parameters.extra
    name, vae_hash = fields.get("VAE") or None, fields.get("VAE hash") or None
    if name is None and vae_hash is None:
        return None
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    shown = f"{name} ({vae_hash})" if name and vae_hash else (name or vae_hash)
    if params["vae"] is not None:  # given (or set by a ComfyUI graph's VAELoader): it stays; another VAE is said
        if "vae" not in _given(params) or given_vae is None:
            return None
        vae = Path(given_vae)
        if vae_hash and is_model_hash(vae_hash) and vae.is_file():
            try:
                ours = hash_of(vae, vae_hash)
            except OSError:  # the pre-flight says an unreadable --vae
                return None
            if ours != vae_hash.lower():
                named = f" ({name})" if name else ""
                warn(f"the PNG was made with VAE hash {vae_hash}{named}, --vae has {ours}")
        elif name and name not in (vae.name, vae.stem):
            warn(f"the PNG was made with VAE {shown}, --vae is {vae}")
        return None
    if models_dir is None:
        warn(
            f"the PNG's VAE {shown} is looked for below --models-dir, and there is no models/ here; the "
            "model's own VAE decodes: pass --models-dir or --vae"
        )
        return None
    path, line = find_png_vae(name, vae_hash, models_dir, extra, say)
    mismatch = None if path is None else vae_channel_mismatch(path, model=params["model"])
    if mismatch is not None:  # the PNG's VAE, but not one this model decodes with: made as without it
        warn(f"the PNG's VAE {path} is {mismatch}: the model's own VAE decodes; pass --vae to choose one")
        return None
    say(line)
    return None if path is None else str(path)


def _modules_from_png(
    params: dict[str, Any], recalled: Any, models_dir: Path | None, extra: Any, problems: list[str]
) -> dict[str, str]:
    """The PNG's Forge "Module N" fields (``Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16``: the stems of
    its VAE and text encoder files): each file found below the VAE and text encoder folders
    (:func:`~sdcore.generate.model_paths.find_png_module`), its part told by its header
    (:func:`~sdcore.models.parts.module_parts`, as Forge's loader sorts them by their tensors), for each part
    option not given (a given one stays); on a family without separate parts (SD1/SD2/SDXL, whose VAE Forge lists
    as a module too) the VAE only. One not found is a warning line (the model's own part, or a part option
    given, is used), or,
    where the model lacks a part nobody gives, a pre-flight problem naming the PNG's modules. An old-form "VAE"
    field is, for Forge's paste, the whole module list: the Module fields are then not read (the VAE is
    :func:`_vae_from_png`'s). Returns the parts to set (option name -> file)."""
    from ..generate.model_paths import find_png_module
    from ..generate.pnginfo import MODULE_PARTS, png_modules
    from ..models.parts import (
        PART_LABELS,
        flag,
        model_clip_widths,
        model_part_slots,
        module_parts,
        vae_channel_mismatch,
    )

    fields = recalled.parameters.extra
    modules = png_modules(fields)
    if not modules:
        return {}
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    if fields.get("VAE"):
        warn("the PNG's Module fields are not read: its VAE field is the module list (Forge's paste)")
        return {}
    found_files: dict[Path, tuple[str, str]] = {}
    missing: list[tuple[str, str, str]] = []
    for key, name in modules:
        if models_dir is None:
            missing.append((key, name, "is looked for below --models-dir, and there is no models/ here"))
            continue
        file, what = find_png_module(name, models_dir, extra)
        if file is None:
            missing.append((key, name, what))
        else:
            found_files[file] = (key, what)
    # a family without part slots (SD1/SD2/SDXL) takes a --vae: Forge lists an SD model's VAE as a module too
    accepted, lacking = model_part_slots(params["model"]) or (("vae",), ())
    parts, left = module_parts(list(found_files), accepted, *model_clip_widths(params["model"]))
    for file in left:
        key, rel = found_files[file]
        warn(
            f"the PNG's {key} {rel} is none of the parts this model takes (a CLIP: not of its CLIP-L's or "
            "CLIP-G's width), or one named twice: left out"
        )
    chosen: dict[str, str] = {}
    for part, file in parts.items():
        key, rel = found_files[file]
        if params.get(part) is not None:  # given (or set by a ComfyUI graph): it stays
            continue
        mismatch = vae_channel_mismatch(file, model=params["model"]) if part == "vae" else None
        if mismatch is not None:
            warn(f"the PNG's {key} {file} is {mismatch}: the model's own VAE decodes; pass {flag(part)}")
            continue
        say(f"{PART_LABELS[part]} from the PNG: {rel} ({key})")
        chosen[part] = str(file)
    flags = "/".join(flag(part) for part in MODULE_PARTS)
    still = [part for part in lacking if part in MODULE_PARTS and params.get(part) is None and part not in chosen]
    if missing and still:  # the model cannot load without them: said before anything loads
        named = "; ".join(f"the PNG's {key} {name!r} {what}" for key, name, what in missing)
        give = " ".join(f"{flag(part)} <file or folder>" for part in still)
        problems.append(
            f"{params['model']} has no {', '.join(PART_LABELS[part] for part in still)}: {named}; pass {give}"
        )
    else:  # a part option given (--t5xxl for a transformer-only file) is what stands in for the one not found
        given = [flag(part) for part in MODULE_PARTS if params.get(part) is not None]
        used = (
            f"the model's own part, or the {'/'.join(given)} given, is used"
            if given
            else "the model's own part is used"
        )
        for key, name, what in missing:
            warn(f"the PNG's {key} {name!r} {what}: {used}; pass {flags} to choose one")
    return chosen


def _model_names(params: dict[str, Any], pm: Any, problems: list[str], recalled: Any = None) -> Any:
    """Read ComfyUI's ``extra_model_paths.yaml`` files (the one of ``--models-dir``'s root, then
    ``--extra-model-paths``) and turn a ``--model`` name into its file below the model folders
    (:func:`~sdcore.generate.model_paths.resolve_model_name`), and the part options' names (``--vae ae``) into
    theirs (:func:`~sdcore.generate.model_paths.resolve_part_names`); what is wrong joins ``problems`` (said before
    the model loads), except a problem with the root's file, read unasked, which is a warning line. A source a plugin's model format claims is left to it. Returns the extra folders, for the
    network folders."""
    from ..generate.model_paths import resolve_sources
    from ..models.load import plugin_format_for
    from ..models.parts import flag, part_file_problems, vae_channel_mismatch
    from ..train.preflight import PreflightError

    for name in part_kwargs(params):  # --vae "" (an unset shell variable): not given, as train and kohya take it
        if params[name] == "":
            params[name] = None
    models_dir = models_dir_given(params["models_dir"], params["extra_model_paths"])
    if params["model"] is None and recalled is not None:  # --from-png without --model (nor a model the PNG names)
        _model_from_png(params, recalled, models_dir)
    # a ComfyUI graph's ckpt_name (the user typed no --model): its problems and the file it finds are said as such
    graph_model = recalled.values.get("model") if recalled is not None and option_defaulted("model") else None
    origin = None
    if graph_model is not None and params["model"] == graph_model:
        origin = f"--from-png: the model the PNG's graph loads ({recalled.model_input} {graph_model})"
        if models_dir is None:
            raise PreflightError([f"{origin} is looked for below --models-dir, and there is no models/ here; pass "
                                  "--models-dir or --model"])  # fmt: skip
    found = resolve_sources(params["model"], part_kwargs(params), models_dir, params["extra_model_paths"],
                            plugin_format=plugin_format_for(pm, params["model"]) is not None,
                            say=lambda line: click.echo(line, err=True), model_origin=origin)  # fmt: skip
    if origin is not None and found.model != params["model"]:
        click.echo(f"model from the PNG: {found.model} (the graph's {recalled.model_input} {graph_model})", err=True)
    params["model"] = found.model
    params.update(found.parts)
    parts = dict(found.parts)
    if recalled is not None:  # the PNG's "VAE"/"VAE hash" (A1111's): its file without --vae, a warning with another
        vae = _vae_from_png(params, recalled, models_dir, found.extra, found.parts.get("vae"))
        if vae is not None:
            params["vae"] = parts["vae"] = vae
        modules = _modules_from_png(params, recalled, models_dir, found.extra, problems)  # Forge's "Module N"
        params.update(modules)
        parts.update(modules)
    # each part found is checked as train's pre-flight checks it (there, readable, that part from its header),
    # and a --vae of another latent width (FLUX.1's ae for SD1) before the model loads, as train's part_problems
    file_problems = part_file_problems(parts)
    problems += _graph_part_problems(found.problems + file_problems, params, recalled)
    if parts.get("vae") and not any(line.startswith(f"{flag('vae')} ") for line in file_problems):
        mismatch = vae_channel_mismatch(parts["vae"], model=params["model"])
        if mismatch is not None:
            problems.append(f"{flag('vae')} {parts['vae']}: {mismatch}")
    problems += _lacking_part_problems(params, problems)
    for line in found.notes:
        warn(line)
    return found.extra


def _lacking_part_problems(params: dict[str, Any], problems: list[str]) -> list[str]:
    """A model file without a part it needs that no option gives (a transformer-only FLUX.1 file without
    ``--clip-l``/``--t5xxl``/``--ae``): one line with the other problems, before anything loads, in the words of
    train's pre-flight (:func:`~sdcore.models.parts.part_problems`), where the loader stopped later (exit 1).
    Nothing when the PNG's modules already said it, for a model that is not a file or folder here (``tiny:``, a Hub
    id, a missing file: the model's own line), or for a family whose adapter declares no part slots (SD1/SD2/SDXL)."""
    from ..models.parts import PART_LABELS, flag, model_part_slots

    model = str(params["model"])
    path = Path(model).expanduser()
    if any(line.startswith(f"{model} has no ") for line in problems) or not (path.is_file() or path.is_dir()):
        return []
    slots = model_part_slots(model)
    lacking = [part for part in (slots[1] if slots else ()) if params.get(part) is None]
    if not lacking:
        return []
    give = " ".join(f"{flag(part)} <file or folder>" for part in lacking)
    return [f"{model} has no {', '.join(PART_LABELS[part] for part in lacking)}: pass {give}"]


def _graph_part_problems(lines: list[str], params: dict[str, Any], recalled: Any) -> list[str]:
    """The problems of part options a ComfyUI graph's loaders set (``--t5xxl NAME: no such file ...`` where the user
    typed no ``--t5xxl``): each starts with the loader that named the file and ends saying to pass the option, as
    the graph's model's problem does (:func:`~sdcore.generate.model_paths.resolve_sources`' ``model_origin``)."""
    if recalled is None or not recalled.model_parts:
        return lines
    from ..models.parts import flag

    given = _given(params)
    loaders = {option: line for line, options in recalled.model_parts.items() for option in options
               if option not in given and params.get(option) is not None}  # fmt: skip
    said = []
    for line in lines:
        option = next((option for option in loaders if line.startswith(f"{flag(option)} ")), None)
        if option is not None:
            line = (f"--from-png: a file the PNG's graph loads ({loaders[option]}): {line}; pass {flag(option)} "
                    "(the file's path or name) to choose one")  # fmt: skip
        said.append(line)
    return said


def _device_and_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    from ..dtypes import torch_dtype

    if dtype == "auto":
        chosen = torch.float16 if device != "cpu" else torch.float32
    else:
        chosen = torch_dtype(dtype)
    return torch.device(device), chosen


def _run_generate(
    params: dict[str, Any],
    recalled: Any = None,
    styles: Any = (),
    early: Sequence[str] = (),
    written: list[Path] | None = None,
) -> None:
    """Check, load and render; each image written is added to ``written`` (for the line said on Ctrl-C)."""
    written = [] if written is None else written
    import random

    from ..errors import ConfigError
    from ..generate.session import NetworkSession, handlers_from_plugin_manager

    problems: list[str] = list(early)  # found before this point (a styles file); all are said at once
    pm = _plugin_manager()
    extra_paths = _model_names(params, pm, problems, recalled)  # --model NAME becomes its file before anything reads it
    plot = _xyz_plot(params, problems)
    jobs = _prompt_jobs(params, plot, problems)  # --from-file's lines (none without it)
    if jobs is None and (plot is None or not plot.keep_random_seeds):  # A1111 fixes -1 seeds once, so every cell
        for name in ("seed", "subseed") if plot is not None else ("seed",):  # (and every batch) shares them
            if params[name] < 0:
                params[name] = random.randrange(2**32)
    extra_options = {name: value for name, value in params.items() if name not in _CORE_PARAMS}
    extra_options.update(params["extra_pairs"])

    directories: dict[str, Any] = {name: params[name] for name in _DIRECTORY_OPTIONS if params.get(name)}
    directories.update({k: v for k, v in extra_options.items() if k.endswith("_dir") and v})
    handlers = handlers_from_plugin_manager(pm, directories, models_dir=params["models_dir"], options=extra_options,
                                            extra_paths=extra_paths)  # fmt: skip
    session = NetworkSession(handlers)
    if jobs is not None:
        cells, owned, wheres = _job_cells(params, jobs, problems)
    else:
        cells = [params] if plot is None else _plot_cells(plot, params, problems)
        owned, wheres = [set() for _ in cells], ["" for _ in cells]
    if recalled is not None:  # the PNG's "Lora hashes" find its LoRAs saved under other names (after Prompt S/R)
        from ..generate.recall_networks import relink_recalled_loras

        relink_recalled_loras(params, cells, recalled, handlers, _given(params), lambda x: click.echo(x, err=True))
    for cell, own, where in zip(cells, owned, wheres, strict=True):  # after Prompt S/R, as A1111 applies styles in
        _apply_styles(cell, _line_styles(cell, where, problems) if "styles" in own else styles)  # process_images
    # Fail on unknown tags, malformed syntax and bad settings of any cell before spending time on loading the model.
    runs = []
    for cell, where in zip(cells, wheres, strict=True):  # a --from-file line's problems name the line
        found: list[str] = []
        runs.append(_prepare_run(cell, found))
        problems += [f"{where}{problem}" for problem in found]
    problems += _needs_problems(params, cells)  # a plugin's option without the one it needs (--aesthetic)
    problems += _reference_problems(params)
    problems += _mask_problems(params)
    problems += _control_problems(params)
    problems += _clip_skip_problems(cells, wheres)
    # every network file every prompt names, resolved as the session will resolve it, all missing ones at once
    problems += session.check(pair for run in runs for pair in _network_prompts(run))
    # a network that makes the model a FLUX.1 Depth/Canny one (BFL's control LoRAs) needs --control-image
    problems += session.control_problems([pair for run in runs for pair in _network_prompts(run)],
                                         control_image=params["control_image"] is not None)  # fmt: skip
    from ..io import output_problems

    # the images read: an output may never replace one (the --from-png image too, read before any is written)
    init = [str(params[name]) for name in ("init_image", "from_png", "reference_image", "mask", "control_image")
            if params[name] is not None]  # fmt: skip
    if plot is None:  # one numbered sequence over every batch of every line
        outputs = _output_paths(params["output"], sum(run.params["batch"] * run.params["n_iter"] for run in runs))
    else:
        problems += _plot_problems(plot, params)
        outputs = [params["output"], *(_cell_paths(params["output"], len(runs)) if params["grid_cells"] else [])]
    problems += output_problems(outputs, inputs=init, overwrite=params["overwrite"])
    if problems:  # a cell's problem once, not once per cell; exit status 2, as the training pre-flight's
        from ..train.preflight import PreflightError

        raise PreflightError(["; ".join(dict.fromkeys(problems))])

    bundle = _load_bundle(params["model"], pm, **part_kwargs(params))
    device, dtype = _device_and_dtype(params["device"], params["dtype"])
    if bundle.device != device or bundle.denoiser.dtype != dtype:
        bundle.to(device=device, dtype=dtype if bundle.denoiser.dtype != dtype else None)
    from ..models.family import family_adapter

    adapter = family_adapter(bundle.family_spec)
    # --cfg of a guidance-distilled family (Flux.1) is its embedded guidance: the infotext says it as Forge
    # does ("CFG scale" the true CFG, "Distilled CFG Scale" the guidance), so PNG Info restores both
    distilled = bool(getattr(adapter, "distilled_guidance", False))
    for line in _ignored_option_warnings(params, adapter, bundle, distilled):
        click.echo(line, err=True)
    if recalled is not None:  # the PNG's CFG fields, now that the family says what they mean
        before = dict(params)
        _recalled_cfg(params, recalled, bundle, runs[0].sampler or _default_sampler(adapter), distilled)
        axis_params = {axis.type.param for _, axis in plot.axes} if plot is not None else set()
        for run, own in zip(runs, owned, strict=True):  # an axis's own value wins over the PNG's, as a line's
            run.params.update(
                {k: v for k, v in params.items() if before.get(k) != v and k not in axis_params and k not in own}
            )

    if plot is not None:  # Forge's CFG Scale / Distilled CFG Scale axes, now that the family says what they set
        from ..generate.xyz_plot import guidance_axes
        from ..models.flux.variants import embeds_guidance

        label, guided = bundle.family_spec.label, embeds_guidance(bundle)
        if trouble := guidance_axes(
            plot, [run.params for run in runs], params["cfg"], distilled=distilled, family=label, guided=guided
        ):
            raise ConfigError("; ".join(trouble))
    # a LoRA every image (plot cell) names is merged once and stays merged until the set changes (A1111's rule)
    with session.keeping():
        if plot is None:
            from ..generate.pnginfo import save_image

            if jobs is not None and (trouble := _flow_sampler_problems(runs, bundle, adapter)):  # before line 1
                raise ConfigError("; ".join(dict.fromkeys(trouble)))
            paths = iter(outputs)
            for run in runs:
                for part in _iterations(run):  # A1111's batch count: one call per batch, seeds continuing
                    batch_paths = [next(paths) for _ in range(run.params["batch"])]
                    for image, path, text in _render(part, bundle, session, adapter, distilled, batch_paths):
                        path = save_image(image, path, text({}), **_save_options(params))
                        written.append(Path(path))
                        click.echo(str(path))
            return
        if trouble := _flow_sampler_problems(runs, bundle, adapter):  # before the first cell, not at its cell
            raise ConfigError("; ".join(dict.fromkeys(trouble)))
        _run_plot(plot, params, runs, written, bundle, session, adapter, distilled)


def _flow_sampler_problems(runs: list[_Run], bundle: Any, adapter: Any) -> list[str]:
    """The samplers (and hires samplers) of ``runs`` that a flow-matching family (SD3, FLUX.1, Chroma) cannot
    run, one line each: known only once the model is loaded, and checked for every plot cell before the first
    renders (A1111 confirms a Sampler axis's values before its first cell, xyz_grid.py confirm_samplers).

    Each pass's scheduler is built as the family's pipeline builds it (the adapter's ``flow_scheduler_for``:
    FLUX.1's and Chroma's pipelines hand it their own sigmas, so Heun cannot start from an init image there and
    DPM++ 2M cannot run schnell's fixed shift), so the rules are :func:`~sdcore.generate.flow_samplers.flow_scheduler`'s
    own. The hires pass starts from the first pass's latent, not from an image."""
    from ..models.sd_unet import SdUnetAdapter

    if isinstance(adapter, SdUnetAdapter) or bundle.family_spec.denoiser == "unet":
        return []
    from ..errors import ConfigError
    from ..generate.flow_samplers import flow_sampler_id

    build = getattr(adapter, "flow_scheduler_for", None)
    passes: dict[tuple[str, bool], None] = {}  # each sampler once per kind of start
    for run in runs:
        passes[(run.sampler or _default_sampler(adapter), run.params["init_image"] is not None)] = None
        if run.hires is not None and run.hires.sampler:
            passes[(run.hires.sampler, False)] = None
    problems = []
    for name, img2img in passes:
        try:
            if build is not None:
                build(bundle, name, img2img=img2img)
            else:  # a family without the hook: the table at least
                flow_sampler_id(name, bundle.family)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def _ignored_option_warnings(params: dict[str, Any], adapter: Any, bundle: Any, distilled: bool) -> list[str]:
    """One warning line for each option typed on the command line (or taken from --from-png) that the loaded
    model cannot use, where Forge, too, renders on without it: the distilled guidance on FLUX.1 schnell (no
    guidance embedding; Forge prints that it is ignored) and a clip skip on FLUX.1 and Chroma (the adapter's
    ``clip_skip_ignored``: no CLIP hidden states reach the transformer). The PNG still says them, as Forge's.
    Also a note where an A1111 VAE sits beside an SD file and no ``--vae`` is given (A1111 would decode with it)."""
    from ..models.detect import unused_a1111_vae
    from ..models.flux.variants import embeds_guidance

    given = _given(params)
    warnings = []
    if distilled and not embeds_guidance(bundle):
        typed = [f"--{name.replace('_', '-')}" for name in ("cfg", "hr_distilled_cfg") if name in given]
        if typed:
            warnings.append(
                warning_line(
                    f"{' and '.join(typed)} set the distilled guidance, which FLUX.1 schnell has not "
                    "(no guidance embedding): ignored, as Forge ignores it; --true-cfg-scale is its CFG"
                )
            )
    beside = unused_a1111_vae(bundle.source, bundle.source_format, bundle.family, bool(params.get("vae")))
    if beside is not None:  # A1111's Automatic VAE ("found near the checkpoint"); sdcore decodes with the model's
        warnings.append(
            f"note: {beside.name} is beside the model: A1111 (its Automatic VAE) decodes with it; sdcore uses the "
            f"model's own VAE: give --vae {beside} for A1111's images"
        )
    if params["clip_skip"] > 1 and getattr(adapter, "clip_skip_ignored", False):
        warnings.append(
            warning_line(
                f"--clip-skip {params['clip_skip']} changes nothing on {bundle.family_spec.label} models "
                "(no CLIP hidden states condition them; Forge ignores it too)"
            )
        )
    return warnings


def _default_sampler(adapter: Any) -> str:
    """The family's sampler when none is given (Flux: flow-matching Euler)."""
    from ..models.family import default_sampler

    return default_sampler(adapter)


class _Run:
    """One generation's settings: the parameters and what is derived from them before the model loads."""

    def __init__(self, params: dict[str, Any], sampler: str | None, seed: int, variation: Any, hires: Any,
                 slg: Any = None) -> None:  # fmt: skip
        self.params, self.sampler, self.seed, self.variation, self.hires = params, sampler, seed, variation, hires
        self.slg = slg  # its SkipLayerGuidance (None: off)


def _prepare_run(params: dict[str, Any], problems: list[str]) -> _Run:
    """Check one generation's settings (sampler, hires, img2img strength, variation seeds), adding each problem
    to ``problems``; a -1 seed becomes a random one. Its networks are checked with every run's
    (:func:`_network_prompts`)."""
    import random

    from ..errors import ConfigError
    from ..generate.pipeline import sampler_id

    sampler = None
    if params["sampler"]:
        try:
            sampler = sampler_id(params["sampler"])
        except ConfigError as exc:
            problems.append(str(exc))
    seed = params["seed"] if params["seed"] >= 0 else random.randrange(2**32)
    variation = _variation_seeds(params)
    hires = _hires_settings(params)
    if hires is not None:
        problems.extend(hires.problems())
        if params["init_image"] is not None and params["mask"] is None:  # with --mask: _mask_problems says it
            problems.append("the hires fix follows a txt2img pass (as in A1111); drop --init-image or the --hr options")
    problems += variation.problems() if variation is not None else []
    return _Run(params, sampler, seed, variation, hires, _skip_layer_guidance(params, hires, problems))


#: the options that only mean something with --slg-layers
_SLG_OPTIONS = ("slg_scale", "slg_start", "slg_end")


def _skip_layer_guidance(params: dict[str, Any], hires: Any, problems: list[str]) -> Any:
    """The :class:`~sdcore.generate.skip_layer_guidance.SkipLayerGuidance` of ``--slg-layers`` and its options
    (``None`` without it), with every problem found before the model loads added to ``problems``: the layers'
    text, the window, a CFG (or hires CFG) of 1 or less, a model of another family than SD3 (when its headers
    tell), the options without ``--slg-layers``, ``--slg-layers`` with ``--no-slg``. Block indices the model lacks
    are found once it loads."""
    if params["no_slg"] and "slg_layers" in _given(params):
        problems.append("--no-slg turns skip layer guidance off: drop it or --slg-layers")
        return None
    if params["slg_layers"] is None:
        typed = [name for name in _SLG_OPTIONS if name in _given(params)]
        if typed:
            named = ", ".join("--" + name.replace("_", "-") for name in typed)
            problems.append(f"{named} set skip layer guidance: give --slg-layers (e.g. 7,8,9) or drop them")
        return None
    from ..generate.skip_layer_guidance import SkipLayerGuidance, family_problem, parse_layers
    from ..models.family import get_family
    from ..models.layout import peek_family

    try:
        layers = parse_layers(params["slg_layers"])
    except ValueError as exc:
        problems.append(str(exc))
        layers = ()
    slg = SkipLayerGuidance(layers, params["slg_scale"], params["slg_start"], params["slg_end"])
    problems += [line for line in slg.problems() if layers or not line.startswith("--slg-layers")]
    family = peek_family(params["model"])
    if family is not None and family != "sd3":
        problems.append(family_problem(get_family(family).label))
    cfgs = [(params["cfg"], "--cfg"), *([(hires.cfg, "--hr-cfg")] if hires is not None else [])]
    problems += [line for cfg, option in cfgs if (line := slg.cfg_problem(cfg, option)) is not None]
    return slg if layers else None


def _network_prompts(run: _Run) -> list[tuple[str, str]]:
    """The ``(prompt, negative prompt)`` pairs of ``run`` whose networks apply: the first pass's and the hires
    pass's own (``--hr-prompt``/``--hr-negative``; unset, they are the first pass's)."""
    pairs = [(run.params["prompt"], run.params["negative"])]
    if run.hires is not None:
        pairs.append((run.hires.prompt or "", run.hires.negative_prompt or ""))
    return pairs


def _render(
    run: _Run, bundle: Any, session: Any, adapter: Any, distilled: bool, paths: Sequence[Path] | None = None
) -> list[tuple[Any, Path, Any]]:
    """Generate ``run``'s images: ``(image, output path, infotext)`` each, the infotext a function of the
    fields to add before "Version" (the X/Y/Z plot's on its grid); ``paths``: the batch's files (default
    ``-o``'s numbering of this batch alone)."""
    from .. import __version__
    from ..generate.inpaint import CONDITIONAL_MASK_WEIGHT, FILL_GUIDANCE
    from ..generate.pipeline import generate_images, is_flux_control, is_flux_fill, schedule_type_field
    from ..generate.pnginfo import (
        RNG_SOURCE,
        SCHEDULE_TYPE,
        format_parameters,
        model_short_hash,
        module_fields,
        vae_fields,
    )
    from ..models.family import default_cfg

    params, seed, variation, hires = run.params, run.seed, run.variation, run.hires
    sampler = run.sampler or _default_sampler(adapter)  # a family may sample with something else by default
    fill_model = is_flux_fill(bundle)
    if params["cfg"] is None and params["control_image"] is not None:  # BFL's cli_control: Depth 10, Canny 30
        from ..models.flux.control import default_guidance

        if is_flux_control(bundle):
            params["cfg"] = default_guidance(bundle.source or params["model"])
        elif controls := session.control_networks(_network_prompts(run)):  # dev with a control LoRA: its name
            params["cfg"] = default_guidance(controls[0].path)
    if params["cfg"] is None:  # FLUX.1 Fill: BFL's and diffusers' guidance 30
        params["cfg"] = FILL_GUIDANCE if fill_model else default_cfg(adapter)
    width, height = params["size"] or (None, None)
    strength = params["strength"]
    if strength is None:  # FLUX.1 Fill repaints from pure noise, as BFL's and ComfyUI's workflows do
        strength = hires.denoising_strength if hires is not None else 1.0 if fill_model else 0.75
    inpaint = _inpaint_settings(params)
    infos: list[dict[str, str]] = []
    prompts = [params["prompt"]] * params["batch"]
    images = generate_images(
        bundle,
        prompts,
        negative_prompt=params["negative"],
        steps=params["steps"],
        cfg=params["cfg"],
        seed=seed,
        width=width,
        height=height,
        sampler=sampler,
        init_image=params["init_image"],
        strength=strength,
        clip_skip=params["clip_skip"],
        tiling=params["tiling"],
        networks=session,
        info=infos,
        true_cfg_scale=params["true_cfg_scale"],
        skip_layer_guidance=run.slg,
        hires=hires,
        variation=variation,
        **_reference_arguments(params),
        inpaint=inpaint,
        inpainting_mask_weight=params["inpainting_mask_weight"],
        **({"control_image": params["control_image"]} if params["control_image"] is not None else {}),
    )
    from ..generate.variation import VariationSeeds

    seeds, subseeds = (variation or VariationSeeds()).batch(seed, len(images))
    first_size = None
    if inpaint is not None and inpaint.full_res:  # A1111's "Size": the processing size, not the pasted-into image's
        from ..generate.pipeline import init_image_size

        first_size = params["size"] or init_image_size(bundle, params["init_image"])
    if hires is not None:  # A1111's "Size" is the first pass's
        from ..generate.pipeline import default_size

        first_size = (width or default_size(bundle), height or default_size(bundle))
        if params["reference_image"] is not None and params["size"] is None:  # the first pass's: the reference's
            from ..models.flux.kontext import open_reference, sized_reference

            first_size = sized_reference(open_reference(params["reference_image"]), _reference_mode(params)).size
        if params["control_image"] is not None and params["size"] is None:  # the first pass's: the control's
            from ..models.flux.control import control_size, open_control

            first_size = control_size(open_control(params["control_image"]))
    from ..models.flux.variants import embeds_guidance

    guided = distilled and embeds_guidance(bundle)  # "Distilled CFG Scale" is written (Forge: not on schnell)
    source = bundle.source or params["model"]
    model_hash = model_short_hash(source)
    model_name = Path(str(source)).stem if not str(source).startswith(("tiny:", "toyworld:")) else str(source)
    vae = vae_fields(params["vae"], bundle.family)  # A1111's "VAE hash"/"VAE": --from-png takes that VAE again
    modules = module_fields(params, bundle.family)  # Forge's "Module N" of the flow families' part files
    rendered: list[tuple[Any, Path, Any]] = []
    paths = _output_paths(params["output"], len(images)) if paths is None else paths
    for index, (image, path) in enumerate(zip(images, paths, strict=True)):
        # None: not written; a flow family's at the pass's size, not after a hires pass (another size's shift)
        pass_size = (first_size or image.size) if hires is None else None
        extra: dict[str, Any] = {SCHEDULE_TYPE: schedule_type_field(bundle, sampler, pass_size), **vae}
        if variation is not None:  # after "Model", before "Denoising strength" (A1111's order)
            extra.update(variation.infotext_fields(subseeds[index]))
        if params["init_image"] is not None or hires is not None:
            extra["Denoising strength"] = strength
        if bundle.inpainting:  # A1111: whenever an inpainting model's image conditioning is used
            extra[CONDITIONAL_MASK_WEIGHT] = params["inpainting_mask_weight"]
        if params["clip_skip"] > 1:
            extra["Clip skip"] = params["clip_skip"]
        extra["RNG"] = RNG_SOURCE  # every family's noise comes from seeded CPU generators
        if params["tiling"]:  # A1111 writes it after RNG (processing.py create_infotext)
            extra["Tiling"] = "True"
        if inpaint is not None:  # A1111's, after Tiling (its extra_generation_params)
            extra.update(inpaint.infotext_fields())
        extra.update(_reference_fields(params))
        if params["control_image"] is not None:  # FLUX.1 Depth/Canny: the control image's file name
            from ..models.flux.control import CONTROL_FIELD

            extra[CONTROL_FIELD] = Path(params["control_image"]).name
        if guided:  # Forge: only where the model takes it (not on schnell)
            extra["Distilled CFG Scale"] = params["cfg"]
        if run.slg is not None:  # sdcore's own fields (A1111 and Forge have no SLG)
            extra.update(run.slg.infotext_fields())
        if hires is not None:  # where A1111 writes them: after RNG, before the networks' hashes
            first_cfg = params["true_cfg_scale"] if distilled else params["cfg"]  # the "CFG scale" written
            extra.update(
                hires.infotext_fields(
                    params["prompt"],
                    params["negative"],
                    sampler,
                    bundle,
                    cfg=first_cfg,
                    distilled_cfg=params["cfg"] if guided else None,
                )
            )
        extra.update(infos[index] if index < len(infos) else {})

        def text(more: dict[str, Any], extra: dict[str, Any] = extra, index: int = index) -> str:
            # A1111: extra params, then Version; Forge: its "Module N" last
            fields = {**extra, **more, "Version": f"sdcore {__version__}", **modules}
            return format_parameters(
                params["prompt"],
                params["negative"],
                params["steps"],
                sampler,
                params["true_cfg_scale"] if distilled else params["cfg"],
                seeds[index],
                first_size or images[index].size,
                model_hash,
                model_name,
                fields,
            )

        rendered.append((image, path, text))
    return rendered


def _inpaint_settings(params: dict[str, Any]) -> Any:
    """The :class:`~sdcore.generate.inpaint.Inpaint` of ``--mask`` and its options (None without a mask)."""
    if params["mask"] is None:
        return None
    from ..generate.inpaint import Inpaint

    return Inpaint(
        params["mask"],
        blur=params["mask_blur"],
        fill=params["inpainting_fill"],
        full_res=params["inpaint_full_res"],
        padding=params["inpaint_full_res_padding"],
        invert=params["inpainting_mask_invert"],
        mask_weight=params["inpainting_mask_weight"],
    )


#: the options that only mean something with --mask
_MASK_OPTIONS = ("mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                 "inpainting_mask_invert")  # fmt: skip


def _mask_problems(params: dict[str, Any]) -> list[str]:
    """``--mask``'s problems before the model loads: no init image, a file that is not an image, a model of a
    family that does not inpaint (when its headers tell), the hires fix; the mask options without a mask."""
    if params["mask"] is None:
        typed = [name for name in _MASK_OPTIONS if name in _given(params)]
        if typed:
            named = ", ".join("--" + name.replace("_", "-") for name in typed)
            return [f"{named} set how --mask inpaints; give --mask (and --init-image) or drop them"]
        return []
    from ..errors import ConfigError
    from ..generate.inpaint import open_mask
    from ..generate.pipeline import MASK_WITH_CONTROL, mask_family_problem
    from ..models.family import get_family
    from ..models.layout import peek_family

    problems = []
    if params["init_image"] is None:
        problems.append("--mask repaints part of an init image: add --init-image")
    try:
        open_mask(params["mask"])
    except ConfigError as exc:
        problems.append(str(exc))
    family = peek_family(params["model"])
    if family is not None and not get_family(family).inpaints:
        problems.append(mask_family_problem(get_family(family).label))
    if params["control_image"] is not None:
        problems.append(MASK_WITH_CONTROL)
    if _hires_settings(params) is not None:
        problems.append("--mask inpaints an init image; the hires fix follows a txt2img pass: drop the --hr options")
    return problems


def _reference_mode(params: dict[str, Any]) -> str:
    """How ``--reference-image`` is sized (:data:`sdcore.models.flux.kontext.REFERENCE_RESIZE_MODES`)."""
    return "kontext" if params["reference_resize"] else "none"


def _reference_arguments(params: dict[str, Any]) -> dict[str, Any]:
    """``generate_images``' reference arguments (none without ``--reference-image``)."""
    if params["reference_image"] is None:
        return {}
    return {"reference_image": params["reference_image"], "reference_resize": _reference_mode(params)}


def _reference_fields(params: dict[str, Any]) -> dict[str, str]:
    """The infotext of a Kontext edit: the reference's file name, and "Reference resize: none" when it kept its
    size (:data:`sdcore.models.flux.kontext.REFERENCE_FIELD`; A1111 and Forge write none, having no Kontext)."""
    if params["reference_image"] is None:
        return {}
    from ..models.flux.kontext import REFERENCE_FIELD, REFERENCE_RESIZE_FIELD

    fields = {REFERENCE_FIELD: Path(params["reference_image"]).name}
    if not params["reference_resize"]:
        fields[REFERENCE_RESIZE_FIELD] = "none"
    return fields


def _reference_problems(params: dict[str, Any]) -> list[str]:
    """``--reference-image``'s problems before the model loads: a model of another family than Flux.1 (when its
    headers tell), an init image or a control image with it, a file that is missing, not an image or too small."""
    if params["reference_image"] is None:
        if not params["reference_resize"] and "reference_resize" in _given(params):
            return ["--no-reference-resize sizes a --reference-image; give one or drop it"]
        return []
    from ..errors import ConfigError
    from ..generate.pipeline import kontext_family_problem
    from ..models.family import get_family
    from ..models.flux.generate import KONTEXT_CONTROL, KONTEXT_INIT_IMAGE
    from ..models.flux.kontext import open_reference, sized_reference
    from ..models.layout import peek_family

    problems = []
    family = peek_family(params["model"])
    if family is not None and family != "flux":
        problems.append(kontext_family_problem(get_family(family).label))
    if params["init_image"] is not None:
        problems.append(KONTEXT_INIT_IMAGE)
    if params["control_image"] is not None:
        problems.append(KONTEXT_CONTROL)
    try:
        sized_reference(open_reference(params["reference_image"]), _reference_mode(params))
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def _clip_skip_problems(cells: Sequence[dict[str, Any]], wheres: Sequence[str]) -> list[str]:
    """Each cell's ``--clip-skip`` past its model's text-encoder depth (read from the model's configs: no weights),
    as train's pre-flight says it (:func:`sdcore.models.text.clip_skip_problem`), instead of once the encoder runs.
    A model whose layout cannot be read here is its loader's to refuse; Flux and Chroma ignore clip skip."""
    from ..errors import SdcoreError
    from ..models.family import family_adapter, get_family
    from ..models.layout import read_layout
    from ..models.text import clip_skip_problem

    problems: list[str] = []
    layouts: dict[str, Any] = {}
    for cell, where in zip(cells, wheres, strict=True):
        skip, model = cell.get("clip_skip") or 1, cell.get("model")
        if skip <= 1 or not model:
            continue
        if model not in layouts:
            try:
                layout = read_layout(model)
                ignored = getattr(family_adapter(get_family(layout.family)), "clip_skip_ignored", False)
                layouts[model] = None if ignored else layout
            except (SdcoreError, OSError):
                layouts[model] = None
        layout = layouts[model]
        line = (
            None
            if layout is None
            else clip_skip_problem(skip, layout.family, layout.configs.get("text_encoders") or [])
        )
        if line is not None and f"{where}{line}" not in problems:
            problems.append(f"{where}{line}")
    return problems


def _control_problems(params: dict[str, Any]) -> list[str]:
    """``--control-image``'s problems before the model loads: a model of another family than Flux.1 (when its
    headers tell), a file that is missing, not an image or too small. Whether the Flux model is Depth/Canny is
    known once it loads (a diffusers folder's transformer config; a single file's header would do, but one rule
    for both is simpler to read)."""
    if params["control_image"] is None:
        return []
    from ..errors import ConfigError
    from ..generate.pipeline import control_family_problem
    from ..models.family import get_family
    from ..models.flux.control import control_size, open_control
    from ..models.layout import peek_family

    problems = []
    family = peek_family(params["model"])
    if family is not None and family != "flux":
        problems.append(control_family_problem(get_family(family).label))
    try:
        control_size(open_control(params["control_image"]))
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


#: the options that only mean something with an X/Y/Z plot
_PLOT_OPTIONS = ("keep_random_seeds", "grid_legend", "grid_margin", "grid_cells")


def _xyz_plot(params: dict[str, Any], problems: list[str]) -> Any:
    """The X/Y/Z plot of ``--x-type``/``--x-values`` ... (``None`` without one, or when an axis is wrong: every
    axis problem goes to ``problems``, said with the others found before the model loads, exit status 2); the
    plot's options without a plot are a problem too (they would do nothing)."""
    from ..generate.xyz_plot import build_plot

    plot, found = build_plot(
        [(name, params[f"{name.lower()}_type"], params[f"{name.lower()}_values"]) for name in "XYZ"],
        keep_random_seeds=params["keep_random_seeds"],
    )
    if found:
        problems += found
        return None
    if plot is None:
        typed = [name for name in _PLOT_OPTIONS if name in _given(params)]
        if typed:
            named = ", ".join("--" + name.replace("_", "-") for name in typed)
            problems.append(f"{named} set how the X/Y/Z plot is drawn; give --x-type and --x-values or drop them")
    if plot is not None:
        plot.fix_seeds()
    return plot


#: the options that only mean something with --from-file
_FILE_OPTIONS = ("prompt_position", "iterate_seed", "same_seed")


def _prompt_jobs(params: dict[str, Any], plot: Any, problems: list[str]) -> Any:
    """``--from-file``'s jobs (:func:`~sdcore.generate.prompt_file.read_prompt_file`; ``None`` without it), every
    line's problem added to ``problems`` and each note said on stderr; its options without it, and an X/Y/Z
    plot with it, are problems (A1111 runs one script at a time)."""
    if params["from_file"] is None:
        typed = [name for name in _FILE_OPTIONS if name in _given(params)]
        if typed:
            named = ", ".join("--" + name.replace("_", "-") for name in typed)
            problems.append(f"{named} set how --from-file's lines run; give --from-file or drop them")
        return None
    from ..generate.prompt_file import read_prompt_file

    if plot is not None:
        problems.append("--from-file and the X/Y/Z plot are two A1111 scripts, which run one at a time: drop one")
    if params["iterate_seed"] and params["same_seed"]:
        problems.append("--iterate-seed already draws a -1 seed once for every line: drop --same-seed")
    text = sys.stdin.read() if params["from_file"] == "-" else None
    jobs, found = read_prompt_file(params["from_file"], text)
    problems += found
    for job in jobs:
        for note in job.notes:
            click.echo(f"note: {note}", err=True)
    return jobs


def _job_cells(params: dict[str, Any], jobs: Any, problems: list[str]) -> tuple[list[Any], list[set[str]], list[str]]:
    """Each ``--from-file`` line's parameters (:func:`~sdcore.generate.prompt_file.job_params`), its seed by
    A1111's rule (:func:`~sdcore.generate.prompt_file.line_seeds`) unless the line gives one; with the names of the
    parameters each line set (they win over a ``--from-png`` image's, as the options typed do) and the words
    naming the line in its problems."""
    import random

    from ..generate.prompt_file import job_params, line_seeds

    name = f"--from-file {params['from_file']}"
    seeds = line_seeds(params["seed"], len(jobs), params["batch"] * params["n_iter"], iterate=params["iterate_seed"],
                       same=params["same_seed"], draw=lambda: random.randrange(2**32))  # fmt: skip
    cells, owned, wheres = [], [], []
    for job, seed in zip(jobs, seeds, strict=True):
        cell, found = job_params({**params, "seed": seed}, job, params["prompt_position"])
        problems += [f"{name} {problem}" for problem in found]
        own = set(job.values)
        own |= {"size"} if own & {"width", "height"} else set()
        own |= {"seed_resize_from"} if own & {"seed_resize_from_w", "seed_resize_from_h"} else set()
        parts = _seed_list_cells(cell, f"{name} {job.where}")
        cells += parts
        own |= {"seed", "batch", "n_iter"} if "seeds" in own else set()  # a seed list splits the line's batches
        owned += [own] * len(parts)
        wheres += [f"{name} {job.where}: "] * len(parts)
    return cells, owned, wheres


def _seed_list_cells(cell: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """A line's cell, or with kohya's seed list (``--d 1,2,3``) the cells of its batches
    (:func:`~sdcore.generate.prompt_file.seed_list_parts`), each its images' seeds, and the list's note said. With a
    variation strength every image is its own batch, its variation seed the one of its place in the line:
    ``subseed + i``, a -1 drawn once for the line (A1111's ``all_subseeds = subseed + x`` of one drawn subseed),
    not once for each image."""
    import random

    seeds = cell.pop("seeds", None)
    if seeds is None:
        return [cell]
    from ..generate.prompt_file import seed_list_parts

    single = cell["subseed_strength"] != 0
    parts, note = seed_list_parts(seeds, cell["batch"] * cell["n_iter"], cell["batch"], single=single)
    if note:
        click.echo(f"note: {where}: {note}", err=True)
    subseed = cell["subseed"] if cell["subseed"] >= 0 else random.randrange(2**32)  # _variation_seeds' draw
    cells, done = [], 0
    for first, count in parts:
        part = {**cell, "seed": first, "batch": count, "n_iter": 1}
        if single:
            part["subseed"] = subseed + done
        cells.append(part)
        done += count
    return cells


def _line_styles(cell: dict[str, Any], where: str, problems: list[str]) -> list[Any]:
    """The styles a ``--from-file`` line names (A1111's ``--styles``, replacing ``--style``), from the styles
    file; an unknown name is a problem naming the line."""
    from ..errors import ConfigError

    try:
        return _chosen_styles(cell)
    except ConfigError as exc:
        problems.append(f"{where}{exc}")
        return []


def _iterations(run: _Run) -> list[_Run]:
    """A1111's batch count (``--n-iter``): the run's batches, one after the other, each with the seeds and
    variation seeds of its place in the whole run (image ``i`` of all ``n_iter * batch`` has A1111's seed
    ``seed + i``, or ``seed`` with a variation strength, and subseed ``subseed + i``:
    :meth:`~sdcore.generate.variation.VariationSeeds.batch`), so ``--n-iter 2 --batch 2`` makes the seeds of
    ``--batch 4``."""
    count, batch = run.params["n_iter"], run.params["batch"]
    if count == 1:
        return [run]
    from dataclasses import replace

    from ..generate.variation import VariationSeeds

    seeds, subseeds = (run.variation or VariationSeeds()).batch(run.seed, count * batch)
    runs = []
    for k in range(count):
        variation = replace(run.variation, subseed=subseeds[k * batch]) if run.variation is not None else None
        runs.append(_Run(run.params, run.sampler, seeds[k * batch], variation, run.hires, run.slg))
    return runs


def _plot_cells(plot: Any, params: dict[str, Any], problems: list[str]) -> list[dict[str, Any]]:
    """Every cell's parameters, in the plot's order (X fastest); a Prompt S/R search string that is not
    there is a problem (A1111's message)."""
    return [plot.cell_params(params, ix, iy, iz, problems) for ix, iy, iz in plot.cells()]


def _plot_problems(plot: Any, params: dict[str, Any]) -> list[str]:
    """What A1111 would quietly ignore and sdcore refuses: a setting axis that changes nothing."""
    from ..generate.xyz_plot import uses_hires

    problems = []
    if params["batch"] > 1:
        problems.append("an X/Y/Z plot makes one image per cell; drop --batch")
    if params["n_iter"] > 1:  # A1111 renders batch count x batch size images into each cell
        problems.append("an X/Y/Z plot makes one image per cell; drop --n-iter")
    labels = [axis.type.label for _, axis in plot.axes]
    hires = _hires_settings(params)  # the options', before an axis's --hr-* value turns it on
    if uses_hires(plot) and hires is None:
        problems.append("the Hires axes vary the hires fix: add --hires")
    if "Denoising" in labels and params["init_image"] is None and hires is None:
        problems.append("the Denoising axis varies img2img or the hires fix: add --init-image or --hires")
    if "SLG scale" in labels and params["slg_layers"] is None:
        problems.append("the SLG scale axis varies skip layer guidance: add --slg-layers")
    if "Var. seed" in labels and "Var. strength" not in labels and params["subseed_strength"] == 0:
        # A1111 draws the variation seed's noise only with a strength (modules/rng.py ImageRNG.first)
        problems.append(
            "the Var. seed axis varies the variation seed, which needs a strength: add --subseed-strength "
            "or a Var. strength axis"
        )
    return problems


def _cell_paths(output: Path, count: int) -> list[Path]:
    """The cells' images next to the grid: NAME-0.png, NAME-1.png ... in the plot's order."""
    return [output.with_name(f"{output.stem}-{index}{output.suffix or '.png'}") for index in range(count)]


def _run_plot(
    plot: Any, params: dict[str, Any], runs: list[_Run], written: list[Path], bundle: Any, *context: Any
) -> None:
    """Render every cell (one ``generate_images`` call each), write the cells when asked and the grid,
    which carries the first cell's infotext and the plot's fields (A1111's xyz_grid); each file written is
    added to ``written``."""
    from ..generate.pnginfo import save_image
    from ..generate.xyz_plot import xyz_grid

    nx, ny, nz = plot.shape
    click.echo(f"X/Y/Z plot will create {len(runs)} images on {nz} {nx}x{ny} grid{'s' if nz > 1 else ''}.", err=True)
    images, first_text = [], None
    for index, run in enumerate(runs):
        ((image, _, text),) = _render(run, bundle, *context)
        images.append(image)
        if first_text is None:
            first_text = text(plot.infotext_fields())
        if params["grid_cells"]:
            path = _cell_paths(params["output"], len(runs))[index]
            path = save_image(image, path, text({}), **_save_options(params))
            written.append(Path(path))
            click.echo(str(path))
    grid = xyz_grid(images, plot, legend=params["grid_legend"], margin=params["grid_margin"])
    grid_path = save_image(grid, params["output"], first_text, **_save_options(params))
    written.append(grid_path)
    click.echo(str(grid_path))


def _variation_seeds(params: dict[str, Any]) -> Any:
    """The :class:`~sdcore.generate.variation.VariationSeeds` of ``--subseed*``/``--seed-resize-from``
    (``None`` when neither a strength nor a resize is given; a random subseed for -1, as A1111)."""
    import random

    if params["subseed_strength"] == 0 and params["seed_resize_from"] is None:
        return None
    from ..generate.variation import VariationSeeds

    subseed = params["subseed"] if params["subseed"] >= 0 else random.randrange(2**32)
    return VariationSeeds(subseed, params["subseed_strength"], params["seed_resize_from"])


def _given(params: dict[str, Any]) -> set[str]:
    """The parameters typed on the command line (or set in the environment), not click defaults."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set(params)
    from ..train.cli import command_line_overrides

    return set(command_line_overrides(ctx, params))


def _recall(params: dict[str, Any]) -> Any:
    """``--from-png``: the PNG's parameters fill the options not given (the returned
    :class:`~sdcore.generate.recall.Recalled`, ``None`` without one); the ``--style`` texts join the prompts
    later, each plot cell's after its Prompt S/R (:func:`_apply_styles`)."""
    recalled = None
    if params["from_png"] is not None:
        from ..errors import ConfigError
        from ..generate.recall import recall_png
        from ..train.preflight import PreflightError

        given = _given(params)
        try:
            recalled = recall_png(params["from_png"], sampler_given="sampler" in given)
        except ConfigError as exc:  # found before the model loads: exit 2 as every such problem
            raise PreflightError(exc.problems) from None
        # as A1111's "Send to img2img", an --init-image leaves the hires fields out; so does --no-hires
        hires = (
            "hires" in recalled.values and params["init_image"] is None and ("hires" not in given or params["hires"])
        )
        skip = set() if hires else {"hires", *_HIRES_OPTIONS}
        if params["no_slg"]:  # the image's Skip Layer Guidance fields are left out
            skip.update(("slg_layers", *_SLG_OPTIONS))
        if "model" in given:  # a ComfyUI graph's loader files go with its model, not with the one given
            for line, options in recalled.model_parts.items():
                skip.update(options)
                recalled.ignored.append(line)
        for name, value in recalled.values.items():
            if name not in given and name not in skip:
                params[name] = value
        if "strength" not in given and recalled.strength is not None and (hires or params["init_image"] is not None):
            params["strength"] = recalled.strength
    if params["prompt"] is None and params["from_file"] is None:
        raise click.UsageError("Missing argument 'PROMPT' (or take it from an image with --from-png).")
    return recalled


def _chosen_styles(params: dict[str, Any]) -> list[Any]:
    """The ``--style`` entries of the styles file (an unknown name or a missing file is an error now)."""
    from ..errors import ConfigError

    if params["styles"]:
        from ..generate.styles import STYLES_FILE, read_styles, select_styles

        path = params["styles_file"] or Path(params["models_dir"]).parent / STYLES_FILE
        return list(select_styles(read_styles(path), params["styles"], path))
    if params["styles_file"] is not None and params["from_file"] is None:  # a --from-file line may name styles
        raise ConfigError("--styles-file needs --style NAME")
    return []


def _apply_styles(params: dict[str, Any], styles: Any) -> None:
    """The styles joined to one generation's prompts, negative prompts and hires prompts (A1111's order)."""
    if not styles:
        return
    from ..generate.styles import apply_styles

    for name, kind in (
        ("prompt", "prompt"),
        ("negative", "negative_prompt"),
        ("hr_prompt", "prompt"),
        ("hr_negative", "negative_prompt"),
    ):
        if params[name] is not None:
            params[name] = apply_styles(params[name], [getattr(style, kind) for style in styles])


def _recalled_cfg(params: dict[str, Any], recalled: Any, bundle: Any, sampler: str, distilled: bool) -> None:
    """The PNG's "CFG scale"/"Distilled CFG Scale" for the options not given, and one line for each thing
    the image will not follow (another model, fields sdcore has no option for)."""
    from ..generate.pipeline import default_size, sampler_id
    from ..generate.pnginfo import model_short_hash
    from ..models.hashes import legacy_hash

    given = _given(params)
    for name, value in recalled.cfg_values(distilled).items():
        if name not in given:
            params[name] = value
    model = Path(str(bundle.source or params["model"]))
    hires_sampler = sampler_id(params["hr_sampler"]) if params["hr_sampler"] else None
    for line in recalled.notes(
        bundle,
        sampler=sampler,
        hires_sampler=hires_sampler,
        distilled=distilled,
        model_hash=model_short_hash(model),
        legacy_model_hash=legacy_hash(model) if model.is_file() else None,
        init_image=params["init_image"] is not None,
        size=params["size"] or (default_size(bundle), default_size(bundle)),
        reference_image=params["reference_image"] is not None,
        mask=params["mask"] is not None,
        control_image=params["control_image"] is not None,
    ):
        click.echo(line, err=True)


_HIRES_OPTIONS = (
    "hr_scale",
    "hr_resize_x",
    "hr_resize_y",
    "hr_upscaler",
    "hr_steps",
    "hr_prompt",
    "hr_negative",
    "hr_sampler",
    "hr_cfg",
    "hr_distilled_cfg",
)


def _hires_settings(params: dict[str, Any]) -> Any:
    """The :class:`~sdcore.generate.hires.HiresFix` of ``--hires``/``--hr-*`` (``None`` when off), with
    A1111's txt2img defaults for what is not given."""
    if not params["hires"] and all(params[name] is None for name in _HIRES_OPTIONS):
        return None
    from ..generate.hires import DEFAULT_DENOISING_STRENGTH, DEFAULT_SCALE, DEFAULT_UPSCALER, HiresFix

    strength = params["strength"]
    return HiresFix(
        scale=params["hr_scale"] if params["hr_scale"] is not None else DEFAULT_SCALE,
        resize_x=params["hr_resize_x"] or 0,
        resize_y=params["hr_resize_y"] or 0,
        upscaler=params["hr_upscaler"] or DEFAULT_UPSCALER,
        steps=params["hr_steps"] or 0,
        denoising_strength=strength if strength is not None else DEFAULT_DENOISING_STRENGTH,
        prompt=params["hr_prompt"],
        negative_prompt=params["hr_negative"],
        sampler=params["hr_sampler"],
        cfg=params["hr_cfg"],
        distilled_cfg=params["hr_distilled_cfg"],
    )


@hookimpl
def sdcore_register_commands(cli: click.Group) -> None:
    cli.add_command(generate)


__all__ = ["add_generate_option", "add_generate_option_hint", "generate", "sdcore_register_commands"]
