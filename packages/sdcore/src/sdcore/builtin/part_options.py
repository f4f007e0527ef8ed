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


def name_help(name: str) -> str:
    """The help's sentence on looking up a part option's NAME (empty for a part without folders): the folders
    of :data:`sdcore.generate.model_paths.PART_FOLDERS` and the ``extra_model_paths.yaml`` key."""
    from ..generate.model_paths import PART_FOLDERS

    if name not in PART_FOLDERS:
        return ""
    kind, subdirs = PART_FOLDERS[name]
    folders = ", ".join(f"{folder}/" for folder in subdirs)
    return f" Or a file's name in --models-dir's {folders} (and extra_model_paths.yaml's {kind}:)."


def part_options(command: Callable[..., Any] | None = None, *, names: bool = False) -> Any:
    """Add the part options to a click command (they arrive under their ``load_model`` keywords). With ``names``
    (a command with ``--models-dir``, which resolves them with
    :func:`sdcore.generate.model_paths.resolve_part_names` before the model loads) a part may also be a name in
    the models folder, so the value is text; otherwise click checks the path exists."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for flags, name, text in reversed(PART_OPTIONS):
            extra = name_help(name) if names else ""
            kind: Any = click.STRING if extra else click.Path(exists=True)
            metavar = "PATH|NAME" if extra else "PATH"
            option = click.option(*flags, name, default=None, type=kind, metavar=metavar, help=text + extra)
            command = option(command)
        return command

    return decorate(command) if command is not None else decorate


def part_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The given part options as ``load_model`` keywords (absent ones left out)."""
    return {name: params[name] for _, name, _ in PART_OPTIONS if params.get(name) is not None}
