"""Import-light registration of sdplugin-aesthetic (no torch here)."""

from __future__ import annotations

from typing import Any

import sdcore
from sdcore import PromptNetworkSpec


@sdcore.hookimpl
def sdcore_register_prompt_networks(register: Any) -> None:
    register(
        PromptNetworkSpec(
            name="aesthetic",
            handler="sdplugin_aesthetic.handler:AestheticHandler",
            tag=None,
            directory_option="aesthetic_dir",
            default_subdir="aesthetic_embeddings",
            file_suffixes=(".pt",),
        )
    )


@sdcore.hookimpl
def sdcore_register_commands(cli: Any) -> None:
    from .commands import aesthetic_group, register_generate_options

    cli.add_command(aesthetic_group)
    register_generate_options()
