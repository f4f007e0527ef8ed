"""Every float option of every command (but ``train``, whose values :func:`sdcore.train.config.coerce` checks with
its other problems) refuses nan and inf when the command line is read.

click's ``float`` and ``FloatRange`` take ``nan`` (it passes every bound) and ``inf``: ``sdcore generate --cfg nan``
wrote a black image and exited 0, ``--strength nan``, ``sdcore lora extract --min-diff nan`` ran.
"""

from __future__ import annotations

import click
import pytest
from sdcore.cli import build_cli
from sdcore.plugins import get_plugin_manager


def _float_options() -> list[tuple[str, click.Option]]:
    cli = build_cli(get_plugin_manager())
    found: list[tuple[str, click.Option]] = []

    def walk(command: click.Command, path: list[str], ctx: click.Context) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                if path == [] and name == "train":
                    continue
                _, sub, _ = command.resolve_command(ctx, [name])
                assert sub is not None
                walk(sub, [*path, name], click.Context(sub, parent=ctx, info_name=name))
            return
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, click.types.FloatParamType):
                found.append((" ".join([*path, param.opts[0]]), param))

    walk(cli, [], click.Context(cli))
    return found


FLOAT_OPTIONS = _float_options()


def test_the_walk_finds_the_float_options():
    names = {name for name, _ in FLOAT_OPTIONS}
    assert {"generate --cfg", "generate --strength", "lora extract --min-diff", "tag wd14 --general-threshold"} <= names
    assert len(names) > 25


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_every_float_option_refuses_nan_and_inf(value):
    accepted = []
    for name, param in FLOAT_OPTIONS:
        try:
            param.type.convert(value, param, None)
        except click.BadParameter as exc:
            assert "is not a finite number" in exc.message or "not in the range" in exc.message, (name, exc.message)
        else:
            accepted.append(name)
    assert accepted == []
