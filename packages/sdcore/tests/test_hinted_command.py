"""The shared unknown-option hint of ``sdcore train`` and ``sdcore generate``."""

from __future__ import annotations

import re

import click
from click.testing import CliRunner
from sdcore.hinted_command import HintedCommand


class _Hinted(HintedCommand):
    def prepare_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return [arg.replace("_", "-") if arg.startswith("--") else arg for arg in args]

    def option_hint(self, ctx: click.Context, option: str) -> str | None:
        return " (the seed is --seed here)" if option == "--random-seed" else None


@click.command(cls=_Hinted)
@click.option("--seed", type=int, default=0)
@click.option("--steps", type=int, default=1)
def _command(seed: int, steps: int) -> None:
    click.echo(f"seed={seed} steps={steps}")


def test_a_hinted_name_gets_the_hint_and_no_traceback() -> None:
    result = CliRunner().invoke(_command, ["--random_seed", "3"])
    assert result.exit_code == 2
    assert "No such option: --random-seed (the seed is --seed here)" in result.output
    assert "Traceback" not in result.output


def test_other_names_keep_clicks_suggestion() -> None:
    result = CliRunner().invoke(_command, ["--stepz", "3"])
    assert result.exit_code == 2
    assert "--stepz" in result.output
    assert "'--steps'" in result.output  # click's nearest spellings
    assert "(the seed is" not in result.output


def test_prepared_arguments_are_what_click_parses() -> None:
    result = CliRunner().invoke(_command, ["--seed", "4", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "seed=4 steps=2" in result.output


#: a flag a hint names as sdcore's: written with hyphens in lower case, not another tool's ("kohya's --models",
#: "resize_lora.py --model", "--n_samples", "--W") and not a family of them ("--hr-*")
_SDCORE_FLAG = re.compile(r"(?<![\w'/-])(--[a-z][a-z0-9-]*[a-z0-9])(?![\w*-])")
_FOREIGN = re.compile(r"(?:'s|\.py) $")


def _named_flags(hint: str) -> list[str]:
    return [m.group(1) for m in _SDCORE_FLAG.finditer(hint) if not _FOREIGN.search(hint[: m.start()])]


def _flags(command: click.Command) -> set[str]:
    params = command.get_params(click.Context(command))
    return {
        flag for param in params if isinstance(param, click.Option) for flag in (*param.opts, *param.secondary_opts)
    }


def test_every_hint_table_names_options_its_command_has_and_never_shadows_one() -> None:
    """The hints of ``sdcore generate``, ``sdcore data check`` and the ``sdcore lora`` tools (train's NAME_HINTS has
    its own test) tell a user to type an sdcore option: each option a hint names must be one of its command's, and
    a key that is already an option of the command would be parsed, never hinted."""
    import sdplugin_lora.plugin
    from sdcore.builtin.data_commands import _CHECK_HINTS
    from sdcore.builtin.generate_command import _OPTION_HINTS
    from sdcore.cli import build_cli
    from sdcore.hinted_command import hint_key
    from sdcore.plugins import get_plugin_manager
    from sdplugin_lora.commands import _KOHYA_SCRIPT_HINTS

    assert _named_flags("kohya's --models is --mode concat; resize_lora.py --model, --n_samples, --hr-*") == ["--mode"]
    cli = build_cli(get_plugin_manager(entrypoints=False, extra=[sdplugin_lora.plugin]))
    ctx = click.Context(cli)
    data, lora = cli.get_command(ctx, "data"), cli.get_command(ctx, "lora")
    assert isinstance(data, click.Group) and isinstance(lora, click.Group)
    tables: list[tuple[click.Command | None, dict[str, str]]] = [
        (cli.get_command(ctx, "generate"), _OPTION_HINTS),
        (data.get_command(ctx, "check"), _CHECK_HINTS),
        *(
            (lora.get_command(ctx, name), {hint_key(k): v for k, v in t.items()})
            for name, t in _KOHYA_SCRIPT_HINTS.items()
        ),
    ]
    checked = 0
    for command, table in tables:
        assert command is not None
        flags = _flags(command)
        # --help aside: sdcore's -h is help, and kohya's --H (what the key "h" is for) still reaches the hint
        own = {hint_key(flag) for flag in flags - {"-h", "--help"}}
        for key, hint in table.items():
            assert key not in own, (command.name, key)
            missing = [flag for flag in _named_flags(hint) if flag not in flags]
            assert not missing, (command.name, key, missing)
            checked += len(_named_flags(hint))
    assert checked > 40  # the hints do name options
