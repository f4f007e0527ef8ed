"""The shared unknown-option hint of ``sdcore train`` and ``sdcore generate``."""

from __future__ import annotations

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
