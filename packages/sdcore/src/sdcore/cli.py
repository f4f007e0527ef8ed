"""The ``sdcore`` command line.

:func:`build_cli` is a factory: it takes a plugin manager and returns the root click group, so
tests build a CLI around any manager they like and nothing runs at import time. ``train`` and
``tag`` are lazy groups: ``--help`` lists methods and taggers from their specs without importing a
single plugin module beyond ``plugin.py`` (so torch is never imported for ``--help``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import click

from . import __version__
from .console import warn
from .errors import PluginError, SdcoreError, debug_enabled, expected_error_message
from .plugins import SdPluginManager, get_plugin_manager


@dataclass
class CliState:
    """Stored in ``ctx.obj`` for every command: the plugin manager the CLI was built with."""

    pm: SdPluginManager


def _pm(ctx: click.Context) -> SdPluginManager:
    state = ctx.find_object(CliState)
    if state is None:  # a command used outside build_cli (e.g. a plugin's own tests)
        return get_plugin_manager()
    return state.pm


class _Stub(click.Command):
    """A placeholder that only knows its one-line summary, for listing in ``--help``."""

    def __init__(self, name: str, summary: str) -> None:
        super().__init__(name, help=summary, short_help=summary)


class LazyGroup(click.Group):
    """A group whose subcommands come from registered specs and are built only when invoked."""

    kind = ""

    def _specs(self, ctx: click.Context) -> dict[str, Any]:
        raise NotImplementedError

    def _build(self, ctx: click.Context, name: str, spec: Any) -> click.Command:
        raise NotImplementedError

    def list_commands(self, ctx: click.Context) -> list[str]:
        try:
            specs = self._specs(ctx)
        except PluginError as exc:
            warn(str(exc))
            return sorted(self.commands)
        primary = {name for name, spec in specs.items() if spec.name == name}
        return sorted(primary | set(self.commands))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """One row per primary name: its summary plus the aliases that run it too (``db``, ...)."""
        try:
            specs = self._specs(ctx)
        except PluginError:
            specs = {}
        aliases: dict[str, list[str]] = {}
        for name, spec in specs.items():
            if spec.name != name:
                aliases.setdefault(spec.name, []).append(name)
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            text = command.get_short_help_str(limit=200)
            if aliases.get(name):
                text = f"{text} (aliases: {', '.join(sorted(aliases[name]))})"
            rows.append((name, text))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        try:
            spec = self._specs(ctx).get(cmd_name)
        except PluginError:
            return None
        return None if spec is None else _Stub(cmd_name, spec.summary)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else None
        if name is not None and name not in self.commands:
            specs = self._specs(ctx)  # a PluginError here is shown by main() as one line
            spec = specs.get(name)
            if spec is not None:
                return spec.name, self._build(ctx, spec.name, spec), args[1:]
            if not name.startswith("-"):
                known = ", ".join(sorted(specs)) or "none installed"
                ctx.fail(f"unknown {self.kind} {name!r} (available: {known}; see `sdcore plugins`)")
        return super().resolve_command(ctx, args)


class TrainGroup(LazyGroup):
    kind = "training method"

    def _specs(self, ctx: click.Context) -> dict[str, Any]:
        return _pm(ctx).methods()

    def _build(self, ctx: click.Context, name: str, spec: Any) -> click.Command:
        from .train.cli import build_train_command

        return build_train_command(spec)


class TagGroup(LazyGroup):
    kind = "tagger"

    def _specs(self, ctx: click.Context) -> dict[str, Any]:
        return _pm(ctx).taggers()

    def _build(self, ctx: click.Context, name: str, spec: Any) -> click.Command:
        command = spec.load_command()
        if not isinstance(command, click.Command):
            raise PluginError(f"tagger {name!r}: {spec.command} is not a click command")
        command.name = name
        return command


class RootGroup(click.Group):
    """Prints expected errors (ours, permission / disk-full / missing-file OSErrors, out of memory) as
    one line, no traceback, and exits 1 (2 for a pre-flight's problems); ``SDCORE_DEBUG=1`` shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (SdcoreError, OSError, RuntimeError) as exc:  # click's Exit/Abort are RuntimeErrors: re-raised
            message = expected_error_message(exc)
            if message is None or debug_enabled():
                raise
            click.echo(f"Error: {message}", err=True)
            ctx.exit(exc.exit_code if isinstance(exc, SdcoreError) else 1)


def build_cli(pm: SdPluginManager) -> click.Group:
    """Build the root ``sdcore`` group around ``pm`` (no hook runs until a command needs it)."""

    @click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="sdcore")
    @click.pass_context
    def cli(ctx: click.Context) -> None:
        """Fine-tune Stable Diffusion: LoRA, Textual Inversion, Hypernetworks, DreamBooth and more.

        Methods and taggers come from plugins; `sdcore plugins` lists what is installed.
        """
        from .console import cli_logging, plugin_namespaces
        from .models.family import using_plugin_manager

        ctx.obj = CliState(pm)
        ctx.with_resource(using_plugin_manager(pm))  # families of pm's plugins are found by the runtime too
        # logged warnings print as the CLI's own ("warning: ..."), once; a library user's logging is untouched
        ctx.with_resource(cli_logging(plugin_namespaces(pm.get_plugins())))

    @cli.group(cls=TrainGroup)
    def train() -> None:
        """Train a network or model with one of the installed methods."""

    @cli.group(cls=TagGroup)
    def tag() -> None:
        """Tag or caption a dataset folder with one of the installed taggers."""

    pm.add_commands(cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sdcore`` script (and ``python -m sdcore``)."""
    try:
        pm = get_plugin_manager()
    except SdcoreError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    build_cli(pm).main(args=argv, prog_name="sdcore")
