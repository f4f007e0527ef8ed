"""Built-in commands about the installation itself: ``sdcore plugins``."""

from __future__ import annotations

import json

import click

from ..hookspecs import hookimpl


@click.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include sdcore's built-in plugins.")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show full tracebacks of load errors.")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool, show_all: bool, show_traceback: bool) -> None:
    """List installed plugins: distribution, version, what each registers, and load errors."""
    from ..cli import _pm
    from ..errors import PluginError

    pm = _pm(ctx)
    registry_error = None
    try:
        infos = pm.plugin_infos()
    except PluginError as exc:
        registry_error = str(exc)
        pm._registries = {"method": {}, "tagger": {}, "prompt network": {}, "model format": {}, "model family": {}}
        infos = pm.plugin_infos()
        pm._registries = None
    shown = [i for i in infos if show_all or not i.builtin]
    if as_json:
        payload = {
            "plugins": [
                {
                    "name": i.name,
                    "distribution": i.distribution,
                    "version": i.version,
                    "hooks": i.hooks,
                    "registers": i.registered,
                    "builtin": i.builtin,
                }
                for i in shown
            ],
            "errors": [{"plugin": e.plugin, "distribution": e.distribution, "error": e.error} for e in pm.load_errors]
            + ([{"plugin": None, "distribution": None, "error": registry_error}] if registry_error else []),
        }
        click.echo(json.dumps(payload, indent=2))
        return
    if not shown:
        click.echo("No plugins loaded." if pm.skipped else "No plugins installed.")
    for variable in ("SDCORE_LOAD_PLUGINS", "SDCORE_DISABLE_PLUGINS"):
        skipped = [name for name, why in pm.skipped.items() if why == variable]
        unknown = [name for name, why in pm.unknown_requested.items() if why == variable]
        if skipped:
            click.echo(f"not loaded ({variable}): {', '.join(skipped)}")
        if unknown:
            click.echo(f"{variable} names {', '.join(unknown)}: no installed plugin has that name")
    for info in shown:
        version = f" {info.version}" if info.version else ""
        click.echo(f"{info.name}  ({info.distribution or 'unknown distribution'}{version})")
        for kind, names in info.registered.items():
            plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"  # "model families", not "familys"
            click.echo(f"    {plural}: {', '.join(names)}")
        click.echo(f"    hooks: {', '.join(info.hooks) or 'none'}")
    if pm.load_errors or registry_error:
        click.echo("")
        click.echo("Errors:")
        for error in pm.load_errors:
            click.echo(f"  {error.plugin} ({error.distribution or 'unknown distribution'}): {error.error}")
            if show_traceback and error.detail:
                click.echo("    " + error.detail.replace("\n", "\n    "))
        if registry_error:
            click.echo(f"  {registry_error}")


@hookimpl
def sdcore_register_commands(cli: click.Group) -> None:
    cli.add_command(plugins_command)
