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
from pathlib import Path
from typing import Any

import click

from ..console import warn

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


def models_dir_help(what: str = "--model", networks: bool = False) -> str:
    """``--models-dir``'s help: where ``what``'s names and the part options' names are looked up (and, for a
    command with prompt networks, where those are). One text for ``sdcore generate`` and the ``sdcore model``
    commands, so they say the same."""
    nets = "Lora/ (ComfyUI's loras/), hypernetworks/, " if networks else ""
    embeddings = ", embeddings/ beside it (the A1111 root's) and below it (ComfyUI's)" if networks else ""
    return (
        f"A1111's (or ComfyUI's) models folder: {nets}{what} names (checkpoints/, Stable-diffusion/, "
        f"unet/, diffusion_models/, diffusers/) and "
        f"--vae/--clip-l/--t5xxl names (vae/, text_encoders/, clip/) are looked up below it{embeddings}; an "
        "extra_model_paths.yaml beside it (in ComfyUI's root) is read as ComfyUI reads it."
    )


def extra_model_paths_help(networks: bool = False) -> str:
    """``--extra-model-paths``'s help (the folder kinds the command uses)."""
    nets = "loras, embeddings, hypernetworks, " if networks else ""
    return (
        "ComfyUI's extra_model_paths.yaml (repeatable; as its --extra-model-paths-config): the checkpoints, "
        f"{nets}unet/diffusion_models, diffusers, vae and clip/text_encoders folders it lists are searched too, in ComfyUI's "
        "order."
    )


def models_dir_options(
    command: Callable[..., Any] | None = None, *, what: str = "--model", networks: bool = False
) -> Any:
    """Add ``--models-dir`` (default ``models``, as A1111's and ComfyUI's root has it) and ``--extra-model-paths``
    to a click command that looks model names up (:func:`models_dir_given` tells whether to)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option(
            "--extra-model-paths",
            "extra_model_paths",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            metavar="FILE.yaml",
            help=extra_model_paths_help(networks),
        )(command)
        return click.option(
            "--models-dir",
            default="models",
            show_default=True,
            type=click.Path(file_okay=False, path_type=Path),
            help=models_dir_help(what, networks),
        )(command)

    return decorate(command) if command is not None else decorate


def option_defaulted(name: str) -> bool:
    """Whether option ``name`` of the running command has its default (not given on the command line or by the
    environment)."""
    from click.core import ParameterSource

    context = click.get_current_context(silent=True)
    return context is None or context.get_parameter_source(name) in (ParameterSource.DEFAULT, None)


def models_dir_given(models_dir: Path, extra_model_paths: tuple[Path, ...]) -> Path | None:
    """The models folder to look names up in: ``None`` (paths only, and the loader's own "not found" message, as
    every command had before names) when ``--models-dir`` was left at its default, there is no ``models/`` here
    and no ``--extra-model-paths`` was given."""
    if not extra_model_paths and not Path(models_dir).is_dir() and option_defaulted("models_dir"):
        return None
    return models_dir


def resolve_command_sources(model: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``sdcore model`` command's model and part options, names turned into their files as ``sdcore generate``
    does (:func:`sdcore.generate.model_paths.resolve_sources`; an existing path wins), before anything loads:
    ``(model, load_model part keywords)``. Every problem at once is one
    :class:`~sdcore.train.preflight.PreflightError` (exit 2); notes (the root's ``extra_model_paths.yaml`` unreadable, an A1111 title's other hash) are warnings
    on stderr."""
    from ..generate.model_paths import resolve_sources
    from ..models.parts import part_file_problems
    from ..train.preflight import PreflightError

    parts = {name: value for name, value in part_kwargs(params).items() if value != ""}
    models_dir = models_dir_given(params["models_dir"], params["extra_model_paths"])
    found = resolve_sources(model, parts, models_dir, params["extra_model_paths"],
                            say=lambda line: click.echo(line, err=True))  # fmt: skip
    problems = found.problems + part_file_problems(found.parts)
    if problems:  # exit status 2, one line each, as generate's and the training pre-flight's
        raise PreflightError(problems)
    for line in found.notes:
        warn(line)
    return found.model, {**parts, **found.parts}
