"""The plugin manager: built-ins, entry points, isolation, switches, duplicates, typos."""

from __future__ import annotations

import json

import click
import pytest
import sdcore
from sdcore import MethodSpec, TaggerSpec
from sdcore.errors import PluginError
from sdcore.plugins import DEFAULT_PLUGINS, get_plugin_manager

GOOD_PLUGIN = """
import sdcore
from sdcore import MethodSpec

@sdcore.hookimpl
def sdcore_register_methods(register):
    register(MethodSpec(name="{name}", summary="{summary}", method="{module}:Method"))
"""


def _no_real_plugins(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Load only the fake plugins a test installs, not the first-party ones in this venv."""
    monkeypatch.setenv("SDCORE_LOAD_PLUGINS", ",".join(names))


class MethodPlugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @sdcore.hookimpl
    def sdcore_register_methods(self, register):
        register(MethodSpec(name=self.name, summary=f"summary of {self.name}", method="json:dumps"))


def test_builtins_are_registered_like_plugins():
    pm = get_plugin_manager(entrypoints=False)
    names = {name for name, _ in pm.list_name_plugin()}
    assert set(DEFAULT_PLUGINS) <= names
    assert pm.distributions["sdcore.builtin.core_commands"][0] == "sdcore"


def test_extra_plugin_method_is_listed_in_train_help(sd_pm_factory, sd_cli):
    pm = sd_pm_factory([MethodPlugin("alpha")])
    assert "alpha" in pm.methods()
    result = sd_cli(["train", "--help"], pm=pm)
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and "summary of alpha" in result.output


class AliasedMethodPlugin:
    @sdcore.hookimpl
    def sdcore_register_methods(self, register):
        register(MethodSpec(name="beta", summary="summary of beta", method="json:dumps", aliases=("b", "bee")))


def test_method_aliases_are_listed_in_train_help(sd_pm_factory, sd_cli):
    pm = sd_pm_factory([AliasedMethodPlugin()])
    result = sd_cli(["train", "--help"], pm=pm)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("beta "))
    assert "summary of beta" in row and "(aliases: b, bee)" in " ".join(result.output.split())
    assert not any(line.strip().startswith(("b ", "bee ")) for line in result.output.splitlines())


def test_entry_point_plugin_loads_with_distribution(fake_distribution, monkeypatch):
    fake_distribution(
        "sdplugin-good",
        {"good": "fake_good.plugin"},
        modules={"fake_good.plugin": GOOD_PLUGIN.format(name="good", summary="Good", module="fake_good.plugin")},
        version="1.2.3",
    )
    _no_real_plugins(monkeypatch, "good")
    pm = get_plugin_manager()
    assert pm.load_errors == []
    assert pm.distributions["good"] == ("sdplugin-good", "1.2.3")
    registration = pm.registrations("method")["good"]
    assert registration.distribution == "sdplugin-good" and registration.plugin == "good"


def test_import_error_is_isolated_and_reported(fake_distribution, monkeypatch, sd_cli):
    fake_distribution(
        "sdplugin-broken",
        {"broken": "fake_broken.plugin"},
        modules={"fake_broken.plugin": "raise RuntimeError('boom at import')\n"},
    )
    fake_distribution(
        "sdplugin-fine",
        {"fine": "fake_fine.plugin"},
        modules={"fake_fine.plugin": GOOD_PLUGIN.format(name="fine", summary="Fine", module="fake_fine.plugin")},
    )
    _no_real_plugins(monkeypatch, "broken", "fine")
    pm = get_plugin_manager()
    assert [e.plugin for e in pm.load_errors] == ["broken"]
    assert "boom at import" in pm.load_errors[0].error and pm.load_errors[0].distribution == "sdplugin-broken"
    assert "fine" in pm.methods()
    assert sd_cli(["--help"], pm=pm).exit_code == 0
    listing = sd_cli(["plugins"], pm=pm)
    assert listing.exit_code == 0
    assert "broken (sdplugin-broken): RuntimeError: boom at import" in listing.output
    data = json.loads(sd_cli(["plugins", "--json"], pm=pm).output)
    assert data["errors"][0]["plugin"] == "broken"


def test_strict_mode_turns_load_failures_into_errors(fake_distribution, monkeypatch):
    fake_distribution(
        "sdplugin-broken",
        {"broken": "fake_broken2.plugin"},
        modules={"fake_broken2.plugin": "import no_such_module_xyz\n"},
    )
    _no_real_plugins(monkeypatch, "broken")
    monkeypatch.setenv("SDCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"broken.*sdplugin-broken.*no_such_module_xyz"):
        get_plugin_manager()


def test_disabled_plugin_is_never_imported(fake_distribution, monkeypatch, tmp_path):
    marker = tmp_path / "imported"
    fake_distribution(
        "sdplugin-side",
        {"side": "fake_side.plugin"},
        modules={"fake_side.plugin": f"open({str(marker)!r}, 'w').close()\n"},
    )
    monkeypatch.setenv("SDCORE_DISABLE_PLUGINS", "side")
    pm = get_plugin_manager()
    assert not marker.exists()
    assert "side" not in pm.distributions
    monkeypatch.delenv("SDCORE_DISABLE_PLUGINS")
    _no_real_plugins(monkeypatch, "side")
    get_plugin_manager()
    assert marker.exists()


def test_load_plugins_allow_list(fake_distribution, monkeypatch):
    for name in ("one", "two"):
        fake_distribution(
            f"sdplugin-{name}",
            {name: f"fake_{name}.plugin"},
            modules={f"fake_{name}.plugin": GOOD_PLUGIN.format(name=name, summary=name, module=f"fake_{name}.plugin")},
        )
    monkeypatch.setenv("SDCORE_LOAD_PLUGINS", "two")
    assert set(get_plugin_manager().methods()) == {"two"}
    monkeypatch.setenv("SDCORE_LOAD_PLUGINS", "")
    pm = get_plugin_manager()
    assert pm.methods() == {} and all(d[0] == "sdcore" for d in pm.distributions.values())


def test_duplicate_names_name_both_distributions(fake_distribution, monkeypatch, sd_cli):
    for name in ("first", "second"):
        fake_distribution(
            f"sdplugin-{name}",
            {name: f"fake_dup_{name}.plugin"},
            modules={
                f"fake_dup_{name}.plugin": GOOD_PLUGIN.format(
                    name="clash", summary=name, module=f"fake_dup_{name}.plugin"
                )
            },
        )
    _no_real_plugins(monkeypatch, "first", "second")
    pm = get_plugin_manager()
    with pytest.raises(PluginError) as info:
        pm.methods()
    assert "sdplugin-first" in str(info.value) and "sdplugin-second" in str(info.value) and "'clash'" in str(info.value)
    # the CLI still starts and `plugins` shows the clash
    listing = sd_cli(["plugins"], pm=pm)
    assert listing.exit_code == 0 and "registered twice" in listing.output
    # running the clashing method fails with the message, not a traceback
    result = sd_cli(["train", "clash"], pm=pm)
    assert result.exit_code == 1 and "registered twice" in result.output


def test_misspelled_hook_is_reported(fake_distribution, monkeypatch):
    source = "import sdcore\n@sdcore.hookimpl\ndef sdcore_register_method(register):\n    pass\n"
    fake_distribution("sdplugin-typo", {"typo": "fake_typo.plugin"}, modules={"fake_typo.plugin": source})
    _no_real_plugins(monkeypatch, "typo")
    pm = get_plugin_manager()
    assert len(pm.load_errors) == 1
    assert "sdcore_register_method" in pm.load_errors[0].error
    assert not pm.has_plugin("typo")


def test_check_pending_rejects_unknown_hooks_from_extra_plugins():
    class Typo:
        @sdcore.hookimpl
        def sdcore_regster_methods(self, register):
            pass

    with pytest.raises(PluginError, match="does not define"):
        get_plugin_manager(entrypoints=False, extra=[Typo()])


def test_plugin_raising_in_registration_is_named(sd_pm_factory):
    class Bad:
        @sdcore.hookimpl
        def sdcore_register_taggers(self, register):
            raise ValueError("bad registration")

    pm = sd_pm_factory([Bad()])
    with pytest.raises(PluginError, match=r"Bad.*sdcore_register_taggers.*bad registration"):
        pm.taggers()


def test_plugin_raising_in_commands_hook_is_reported(sd_pm_factory, sd_cli):
    class BadCommands:
        @sdcore.hookimpl
        def sdcore_register_commands(self, cli):
            raise RuntimeError("no commands today")

    pm = sd_pm_factory([BadCommands()])
    result = sd_cli(["plugins", "--all"], pm=pm)
    assert result.exit_code == 0
    assert "no commands today" in result.output


def test_unknown_method_lists_available(sd_pm_factory, sd_cli):
    pm = sd_pm_factory([MethodPlugin("alpha")])
    result = sd_cli(["train", "nope"], pm=pm)
    assert result.exit_code == 2
    assert "unknown training method 'nope'" in result.output and "alpha" in result.output


def test_tagger_group_lists_and_loads_lazily(sd_pm_factory, sd_cli, tmp_path, monkeypatch):
    module = tmp_path / "fake_tagger_cmd.py"
    module.write_text(
        "import click\n@click.command()\n@click.argument('folder')\ndef command(folder):\n    click.echo('tagging ' + folder)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    class Taggers:
        @sdcore.hookimpl
        def sdcore_register_taggers(self, register):
            register(TaggerSpec(name="faketag", summary="A fake tagger", command="fake_tagger_cmd:command"))

    pm = sd_pm_factory([Taggers()])
    listing = sd_cli(["tag", "--help"], pm=pm)
    assert "faketag" in listing.output and "A fake tagger" in listing.output
    result = sd_cli(["tag", "faketag", "somewhere"], pm=pm)
    assert result.exit_code == 0 and "tagging somewhere" in result.output


def test_our_errors_print_one_line(sd_pm_factory, sd_cli):
    class Failing:
        @sdcore.hookimpl
        def sdcore_register_commands(self, cli):
            @cli.command(name="fail")
            def fail():
                raise sdcore.ConfigError("the option --x contradicts --y")

    result = sd_cli(["fail"], pm=sd_pm_factory([Failing()]))
    assert result.exit_code == 1
    assert result.output.strip() == "Error: the option --x contradicts --y"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad Name", "summary": "", "method": "a:b"}, "invalid method name"),
        ({"name": "ok", "summary": "", "method": "not an import string"}, "not an import string"),
    ],
)
def test_specs_validate_names_and_import_strings(kwargs, message):
    with pytest.raises(PluginError, match=message):
        MethodSpec(**kwargs)


def test_resolve_names_the_import_string():
    from sdcore.specs import resolve

    assert resolve("json:dumps") is json.dumps
    with pytest.raises(PluginError, match="no_such_mod_q"):
        resolve("no_such_mod_q:x")
    with pytest.raises(PluginError, match="has no attribute"):
        resolve("json:nope")


def test_registering_wrong_type_is_an_error(sd_pm_factory):
    class Wrong:
        @sdcore.hookimpl
        def sdcore_register_methods(self, register):
            register({"name": "x"})

    with pytest.raises(PluginError, match="expected MethodSpec"):
        sd_pm_factory([Wrong()]).methods()


def test_every_hook_is_documented():
    from pathlib import Path

    from sdcore import hookspecs

    doc = (Path(__file__).parents[3] / "docs" / "writing-a-plugin.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("sdcore_")]
    assert len(hooks) >= 9
    for name in hooks:
        assert f"`{name}(" in doc or f"{name}(" in doc, f"{name} missing from docs/writing-a-plugin.md"
        assert "Added in sdcore" in getattr(hookspecs, name).__doc__


def test_click_group_commands_from_plugins(sd_pm_factory, sd_cli):
    class Group:
        @sdcore.hookimpl
        def sdcore_register_commands(self, cli):
            @cli.group(name="extra")
            def extra():
                """Extra tools."""

            @extra.command(name="hi")
            def hi():
                click.echo("hi there")

    result = sd_cli(["extra", "hi"], pm=sd_pm_factory([Group()]))
    assert result.exit_code == 0 and "hi there" in result.output


def test_plugin_model_formats_are_asked_first(sd_pm_factory, tmp_path, monkeypatch):
    """A format registered by a plugin reads paths it claims; others fall through to the built-ins."""
    from sdcore import ModelFormatSpec
    from sdcore.models.load import load_model

    module = tmp_path / "fake_format_mod.py"
    module.write_text(
        "from sdcore.models.tiny import create_tiny_bundle\n"
        "def sniff(path):\n    return str(path).endswith('.myformat')\n"
        "def read(path, **options):\n    bundle = create_tiny_bundle('sd2')\n    bundle.source = 'mine:' + str(path)\n"
        "    return bundle\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    class Formats:
        @sdcore.hookimpl
        def sdcore_register_model_formats(self, register):
            register(
                ModelFormatSpec(
                    name="myformat", summary="test", sniff="fake_format_mod:sniff", reader="fake_format_mod:read"
                )
            )

    pm = sd_pm_factory([Formats()])
    pm.distributions["Formats"] = ("sdplugin-myformat", "1.0")
    bundle = load_model("model.myformat", pm=pm)
    assert bundle.source == "mine:model.myformat" and bundle.family == "sd2"
    assert load_model("tiny:sd1", pm=pm).family == "sd1"
    assert pm.model_formats()[0].name == "myformat"
