"""Import-light registration of sdplugin-lora (no torch here)."""

from __future__ import annotations

from typing import Any

import sdcore
from sdcore import MethodSpec, PromptNetworkSpec


@sdcore.hookimpl
def sdcore_register_methods(register: Any) -> None:
    register(
        MethodSpec(
            name="lora",
            summary="LoRA / LoCon (kohya C3Lier with --conv-rank): small kohya-format files every UI loads.",
            method="sdplugin_lora.method:LoraMethod",
        )
    )
    register(
        MethodSpec(
            name="locon",
            summary="LoCon: LoRA that also adapts ResNet 3x3 convs (--conv-rank defaults to --rank); kohya format.",
            method="sdplugin_lora.method:LoconMethod",
        )
    )


@sdcore.hookimpl
def sdcore_register_prompt_networks(register: Any) -> None:
    register(
        PromptNetworkSpec(
            name="lora",
            tag="lora",
            handler="sdplugin_lora.apply:LoraHandler",  # + a LyCORIS folder beside it (search_folders), as A1111
            directory_option="lora_dir",
            default_subdir="Lora",  # A1111's models/Lora
            more_subdirs=("loras",),  # ComfyUI's models/loras
            comfy_folder="loras",  # and the loras: folders of ComfyUI's extra_model_paths.yaml
        )
    )
    register(
        PromptNetworkSpec(
            name="lyco",
            tag="lyco",
            handler="sdplugin_lora.apply:LycoHandler",
            directory_option="lora_dir",
            default_subdir="Lora",  # A1111's models/Lora
            more_subdirs=("loras",),  # ComfyUI's models/loras
            comfy_folder="loras",  # and the loras: folders of ComfyUI's extra_model_paths.yaml
        )
    )


@sdcore.hookimpl
def sdcore_register_commands(cli: Any) -> None:
    from sdplugin_lora.commands import lora_group

    cli.add_command(lora_group)
