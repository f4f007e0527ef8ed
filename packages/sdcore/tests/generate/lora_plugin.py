"""The plugin manager the generation tests that read ``<lora:>`` tags run with (one copy, beside the tests)."""

from __future__ import annotations

from typing import Any


def lora_pm() -> Any:
    """A plugin manager with the LoRA plugin only (no builtins, no entry points): the prompt's ``<lora:>`` tags."""
    import sdplugin_lora.plugin
    from sdcore.plugins import get_plugin_manager

    return get_plugin_manager(builtins=False, entrypoints=False, extra=[sdplugin_lora.plugin])
