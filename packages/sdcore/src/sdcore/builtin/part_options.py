"""``--clip-l/--t5xxl/--ae/--t5-tokenizer``: model parts in separate files, for the commands that load a model.

Flux.1 checkpoints are often the transformer alone (``flux1-dev.safetensors``); users keep the text
encoders and the VAE beside it as ComfyUI/Forge/kohya name them (``clip_l.safetensors``,
``t5xxl_fp16.safetensors``, ``ae.safetensors``). These options hand them to ``load_model`` (click only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import click

#: (flag, load_model keyword, help)
PART_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--clip-l", "clip_l", "CLIP-L text encoder file or folder, for a model file without it (Flux: clip_l.safetensors)."),
    ("--t5xxl", "t5xxl", "T5-XXL encoder file or folder, for a model file without it (t5xxl_fp16.safetensors)."),
    ("--ae", "ae", "VAE file or folder, for a model file without it (Flux: BFL's ae.safetensors)."),
    ("--t5-tokenizer", "t5_tokenizer", "T5 tokenizer folder (tokenizer.json or spiece.model) for a real T5."),
)  # fmt: skip


def part_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the part options to a click command (they arrive as ``clip_l``, ``t5xxl``, ``ae``, ``t5_tokenizer``)."""
    for flag, name, text in reversed(PART_OPTIONS):
        command = click.option(flag, name, default=None, type=click.Path(exists=True), help=text)(command)
    return command


def part_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The given part options as ``load_model`` keywords (absent ones left out)."""
    return {name: params[name] for _, name, _ in PART_OPTIONS if params.get(name) is not None}
