"""Registration: three taggers whose import strings resolve to click commands and classes."""

from __future__ import annotations

import click
from sdcore import TaggerSpec
from sdplugin_taggers import plugin


def test_registers_three_taggers_that_resolve() -> None:
    specs: list[TaggerSpec] = []
    plugin.sdcore_register_taggers(specs.append)
    assert [s.name for s in specs] == ["wd14", "deepdanbooru", "caption"]
    for spec in specs:
        assert isinstance(spec.load_command(), click.Command)
        assert callable(spec.load_tagger())
    assert specs[0].load_tagger().__name__ == "WD14Tagger"


def test_registers_tag_tools_group() -> None:
    root = click.Group("sdcore")
    plugin.sdcore_register_commands(root)
    assert "watermark" in root.commands["tag-tools"].commands
