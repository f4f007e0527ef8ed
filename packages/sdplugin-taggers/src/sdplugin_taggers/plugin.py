"""Import-light registration of sdplugin-taggers (no torch, numpy or onnxruntime here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sdcore
from sdcore import TaggerSpec

TAGGERS = (
    TaggerSpec(
        name="wd14",
        summary="WD14 / WD v3 ONNX tagger (SmilingWolf models) with onnxruntime",
        command="sdplugin_taggers.commands:wd14_command",
        tagger="sdplugin_taggers.wd14:WD14Tagger",
    ),
    TaggerSpec(
        name="deepdanbooru",
        summary="DeepDanbooru resnet_custom_v3 tagger (TorchDeepDanbooru .pt) in torch",
        command="sdplugin_taggers.commands:deepdanbooru_command",
        tagger="sdplugin_taggers.deepdanbooru:DeepDanbooruTagger",
    ),
    TaggerSpec(
        name="caption",
        summary="BLIP captions extended with CLIP-ranked phrases (clip-interrogator modes)",
        command="sdplugin_taggers.commands:caption_command",
        tagger="sdplugin_taggers.caption:CaptionTagger",
    ),
)


@sdcore.hookimpl
def sdcore_register_taggers(register: Callable[[TaggerSpec], None]) -> None:
    for spec in TAGGERS:
        register(spec)


@sdcore.hookimpl
def sdcore_register_commands(cli: Any) -> None:
    """``sdcore tag-tools watermark``: dataset checks that go with tagging but are not taggers."""
    from .hygiene_commands import tag_tools_group

    cli.add_command(tag_tools_group)
