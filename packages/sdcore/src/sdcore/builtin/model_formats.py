"""Built-in model formats, registered through the same hook plugins use (no torch import here)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..specs import ModelFormatSpec

_LOAD = "sdcore.models.load"
_SAVE = "sdcore.models.save"

BUILTIN_FORMATS = (
    ModelFormatSpec(
        name="tiny",
        summary="tiny:sd1|sd2|sdxl random models with the real layout (tests, demos)",
        sniff=f"{_LOAD}:sniff_tiny",
        reader=f"{_LOAD}:read_tiny",
    ),
    ModelFormatSpec(
        name="toyworld",
        summary="toyworld: the toy world's base model that ships with sdcore (trained, 32x32; demos, learning checks)",
        sniff=f"{_LOAD}:sniff_toyworld",
        reader=f"{_LOAD}:read_toyworld",
    ),
    ModelFormatSpec(
        name="diffusers",
        summary="diffusers folder with model_index.json",
        sniff=f"{_LOAD}:sniff_diffusers",
        reader=f"{_LOAD}:read_diffusers",
        writer=f"{_SAVE}:write_diffusers",
    ),
    ModelFormatSpec(
        name="single-file",
        summary="ldm/SGM single file (.safetensors, .ckpt, .pt) as used by A1111/ComfyUI",
        sniff=f"{_LOAD}:sniff_single_file",
        reader=f"{_LOAD}:read_single_file",
        writer=f"{_SAVE}:write_single_file",
    ),
    ModelFormatSpec(
        name="hub",
        summary="Hugging Face Hub id already in the local cache (never downloads)",
        sniff=f"{_LOAD}:sniff_hub",
        reader=f"{_LOAD}:read_hub",
    ),
)


@hookimpl
def sdcore_register_model_formats(register: Callable[[ModelFormatSpec], None]) -> None:
    for spec in BUILTIN_FORMATS:
        register(spec)
