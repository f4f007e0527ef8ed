"""Import-light registration of sdplugin-ti (no torch here)."""

from __future__ import annotations

from collections.abc import Callable

import sdcore
from sdcore import MethodSpec, PromptNetworkSpec


@sdcore.hookimpl
def sdcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="ti",
            summary="Textual Inversion: train a new prompt word (A1111 .pt embedding; SD1, SD2, SDXL).",
            method="sdplugin_ti.method:TIMethod",
            aliases=("textual-inversion", "embedding"),
        )
    )


@sdcore.hookimpl
def sdcore_register_prompt_networks(register: Callable[[PromptNetworkSpec], None]) -> None:
    register(
        PromptNetworkSpec(
            name="embeddings",
            tag=None,
            handler="sdplugin_ti.apply:EmbeddingHandler",
            directory_option="embeddings_dir",
            default_subdir="embeddings",
            root_subdir="embeddings",  # A1111's stable-diffusion-webui/embeddings, beside models/
            comfy_folder="embeddings",  # and the embeddings: folders of ComfyUI's extra_model_paths.yaml
            file_suffixes=(".pt", ".bin", ".safetensors", ".png", ".webp"),
        )
    )
