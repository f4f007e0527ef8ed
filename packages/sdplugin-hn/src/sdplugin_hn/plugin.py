"""Import-light registration of sdplugin-hn (no torch here)."""

from __future__ import annotations

from typing import Any

import sdcore
from sdcore import MethodSpec, PromptNetworkSpec


@sdcore.hookimpl
def sdcore_register_methods(register: Any) -> None:
    register(
        MethodSpec(
            name="hn",
            summary="A1111 hypernetworks: residual MLPs on the attention key/value inputs (.pt).",
            method="sdplugin_hn.method:HNMethod",
            aliases=("hypernetwork",),
        )
    )


@sdcore.hookimpl
def sdcore_register_prompt_networks(register: Any) -> None:
    register(
        PromptNetworkSpec(
            name="hypernet",
            tag="hypernet",
            handler="sdplugin_hn.apply:HypernetworkHandler",
            directory_option="hypernetwork_dir",
            default_subdir="hypernetworks",
            comfy_folder="hypernetworks",  # and the hypernetworks: folders of ComfyUI's extra_model_paths.yaml
            file_suffixes=(".pt",),
        )
    )
