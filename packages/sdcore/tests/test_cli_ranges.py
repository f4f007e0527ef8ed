"""Counts and sizes of the commands outside ``train`` are click ranges, so a value no run can use is refused when
the command line is read: ``data check --top -1`` showed all tags but the last, ``--dataset-repeats -1`` counted
a negative epoch, ``lora resize --dynamic-param -1`` ran."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from sdcore.cli import build_cli
from sdcore.plugins import get_plugin_manager

REFUSED = [
    ("data check", "--dataset-repeats", "0"),
    ("data check", "--batch-size", "0"),
    ("data check", "--top", "-1"),
    ("data preprocess", "--auto-size-min-dim", "-1"),
    ("data preprocess", "--auto-size-max-dim", "0"),
    ("data preprocess", "--auto-size-min-area", "-1"),
    ("data preprocess", "--auto-size-max-area", "-1"),
    ("lora resize", "--dynamic-param", "-1"),
    ("lora resize", "--dynamic-param", "0"),
]
ACCEPTED = [
    ("data check", "--top", "0"),
    ("data preprocess", "--auto-size-min-area", "0"),
    ("lora resize", "--dynamic-param", "0.5"),
]


def _option(command_path: str, flag: str) -> click.Option:
    cli = build_cli(get_plugin_manager())
    ctx = click.Context(cli)
    command: click.Command = cli
    for name in command_path.split():
        assert isinstance(command, click.Group)
        _, sub, _ = command.resolve_command(ctx, [name])
        assert sub is not None
        command, ctx = sub, click.Context(sub, parent=ctx, info_name=name)
    return next(p for p in command.params if isinstance(p, click.Option) and flag in p.opts)


@pytest.mark.parametrize(("command", "flag", "value"), REFUSED)
def test_out_of_range_values_are_refused(command: str, flag: str, value: str) -> None:
    param = _option(command, flag)
    with pytest.raises(click.BadParameter, match="not in the range"):
        param.type.convert(value, param, None)


@pytest.mark.parametrize(("command", "flag", "value"), ACCEPTED)
def test_values_that_mean_something_stay_legal(command: str, flag: str, value: str) -> None:
    param = _option(command, flag)
    assert param.type.convert(value, param, None) == float(value)  # no BadParameter


def test_data_check_says_which_option(tmp_path) -> None:
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["data", "check", str(tmp_path), "--top", "-1"])
    assert result.exit_code == 2
    assert "Invalid value for '--top': -1 is not in the range x>=0." in result.output
