"""Registration only: this module is imported for `sdcore --help`, so it must not import torch."""

import click
import sdcore
from sdcore import MethodSpec


@sdcore.hookimpl
def sdcore_register_methods(register):
    register(
        MethodSpec(
            name="hello",
            summary="Toy method: trains only the UNet's output layer",
            method="sdplugin_hello.method:HelloMethod",  # imported only when `sdcore train hello` runs
        )
    )


@sdcore.hookimpl
def sdcore_register_commands(cli):
    @cli.command(name="hello")
    @click.argument("who", default="world")
    def hello(who):
        """Print a greeting (demo command)."""
        click.echo(f"hello {who}")
