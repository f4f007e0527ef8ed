"""``--clip-l/--clip-g/--t5xxl/--vae/--t5-tokenizer``: model parts in separate files, for the commands that load a model.

SD3 and Flux.1 checkpoints are often the denoiser alone (``sd3.5_large.safetensors`` without text encoders,
``flux1-dev.safetensors``); users keep the text encoders and the VAE beside it as ComfyUI/Forge/kohya name
them (``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors``, ``ae.safetensors``). These
options hand them to ``load_model`` as the family reader's keywords (click only), and ``sdcore train``'s options
(:class:`sdcore.train.options.TrainOptions`) are made from this table too. One table for every family: the
reader of a family refuses the parts it has no use for (CLIP-G for Flux); SD1/SD2/SDXL take ``--vae`` only,
as a replacement of the model's own VAE (kohya's ``--vae``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import click

#: (flags, load_model keyword, help); the aliases are kohya's names in its other scripts
#: (``--t5`` short for ``--t5xxl``, Flux's ``--ae`` for the VAE)
PART_OPTIONS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("--clip-l",), "clip_l", "CLIP-L text encoder file or folder, for a model file without it (clip_l.safetensors)."),
    (("--clip-g",), "clip_g", "CLIP-G text encoder file or folder, for an SD3 file without it (clip_g.safetensors)."),
    (("--t5xxl", "--t5"), "t5xxl", "T5-XXL encoder file or folder, for a model file without it (t5xxl_fp16.safetensors)."),
    (("--vae", "--ae"), "vae", "VAE file or folder, for a model file without it (Flux: BFL's ae.safetensors); for SD1/SD2/SDXL it replaces the model's own (kohya's --vae)."),
    (("--t5-tokenizer",), "t5_tokenizer", "T5 tokenizer folder (tokenizer.json or spiece.model) for a real T5."),
)  # fmt: skip


def part_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the part options to a click command (they arrive under their ``load_model`` keywords)."""
    for flags, name, text in reversed(PART_OPTIONS):
        option = click.option(*flags, name, default=None, type=click.Path(exists=True), metavar="PATH", help=text)
        command = option(command)
    return command


def part_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The given part options as ``load_model`` keywords (absent ones left out)."""
    return {name: params[name] for _, name, _ in PART_OPTIONS if params.get(name) is not None}
