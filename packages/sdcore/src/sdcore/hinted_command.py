"""A click command whose "No such option" can say what the name means here.

Users arrive with other tools' names (kohya's ``--network_dim``, A1111's ``--learn-rate``, ``--sdxl`` from
scripts that need a family flag). click's own message only lists near spellings, which for those names point at
an unrelated option; a subclass says the option it means, or why there is none, and click's message stays for
every name it has nothing to say about. ``sdcore train <method>`` and ``sdcore generate`` share this so that the
error reads the same everywhere; each keeps its own table of names.
"""

from __future__ import annotations

from collections.abc import Mapping

import click


def hint_key(option: str) -> str:
    """The key a table of other tools' names is looked up by: dashes, case and underscores do not matter
    (``--Is_Negative_Text`` -> ``is-negative-text``), as users type them every way."""
    return option.strip().lstrip("-").lower().replace("_", "-")


class HintedCommand(click.Command):
    """``parse_args`` that turns :meth:`option_hint`'s text into click's unknown-option message."""

    def prepare_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """The arguments click parses (a subclass rewrites other tools' spellings here); unchanged by default."""
        return args

    def option_hint(self, ctx: click.Context, option: str) -> str | None:
        """`` (did you mean --rank?)`` or another note for the unknown ``option``; ``None`` keeps click's own
        message (its nearest spellings)."""
        return None

    @staticmethod
    def table_hint(table: Mapping[str, str], option: str) -> str | None:
        """`` (HINT)`` for ``option`` in ``table`` (keys as :func:`hint_key` writes them), else ``None``."""
        hint = table.get(hint_key(option))
        return f" ({hint})" if hint is not None else None

    def hyphenated_hint(self, ctx: click.Context, option: str) -> str | None:
        """For ``--x_y`` (kohya's and Python scripts' habit) when this command has ``--x-y``: that option."""
        if "_" not in option:
            return None
        flag = f"--{hint_key(option)}"
        if any(flag in param.opts for param in self.get_params(ctx)):
            return f" (did you mean {flag}? sdcore's options are written with hyphens)"
        return None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, self.prepare_args(ctx, args))
        except click.NoSuchOption as exc:
            hint = self.option_hint(ctx, exc.option_name)
            if hint is None:
                raise
            raise click.NoSuchOption(
                exc.option_name, message=f"No such option: {exc.option_name}{hint}", ctx=ctx
            ) from None


__all__ = ["HintedCommand", "hint_key"]
