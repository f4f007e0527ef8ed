"""``sdcore generate --help`` says the default of every folder and on/off option whose default applies (the
network folders are looked up below --models-dir when not given; a user coming from A1111 needs to know where)."""

from __future__ import annotations

import click
import pytest


def _generate_options():
    import sdplugin_aesthetic.plugin
    import sdplugin_hn.plugin
    import sdplugin_lora.plugin
    import sdplugin_ti.plugin
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    plugins = [sdplugin_lora.plugin, sdplugin_ti.plugin, sdplugin_hn.plugin, sdplugin_aesthetic.plugin]
    cli = build_cli(get_plugin_manager(entrypoints=False, extra=plugins))
    command = cli.commands["generate"]
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("lora_dir", "default: Lora/ below --models-dir"),
        ("embeddings_dir", "default: embeddings/ beside --models-dir"),
        ("hypernetwork_dir", "default: hypernetworks/ below --models-dir"),
        ("aesthetic_dir", "default: aesthetic_embeddings/ below --models-dir"),
        ("inpaint_full_res", "Whole picture (the default"),
        ("hires", "Off by default"),
        ("tiling", "default off"),
        ("grid_legend", "default: on"),
        ("grid_cells", "default: on"),
        ("reference_resize", "the default), or keep"),
        ("slg_layers", "Default: none (off)"),
    ],
)
def test_the_help_says_the_default(name, says):
    option = _generate_options()[name]
    assert says in " ".join((option.help or "").split()), option.help


def test_the_folder_defaults_are_the_registered_ones():
    """The help's folder names are the plugins' ``default_subdir`` (one source would drift from the other)."""
    import sdplugin_aesthetic.plugin
    import sdplugin_hn.plugin
    import sdplugin_lora.plugin
    import sdplugin_ti.plugin
    from sdcore.generate.session import collect_prompt_network_specs
    from sdcore.plugins import get_plugin_manager

    plugins = [sdplugin_lora.plugin, sdplugin_ti.plugin, sdplugin_hn.plugin, sdplugin_aesthetic.plugin]
    pm = get_plugin_manager(entrypoints=False, extra=plugins)
    options = _generate_options()
    for spec in collect_prompt_network_specs(pm):
        assert f"{spec.default_subdir}/" in (options[spec.directory_option].help or ""), spec.name
