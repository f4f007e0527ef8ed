"""``sdcore train <method>``: a click command generated from the method's options dataclass.

Every dataclass field becomes a flag (``max_steps`` -> ``--max-steps``; booleans get the pair
``--x/--no-x``; ``choices`` become a click choice), so the CLI, config files and the Python API
share one definition. ``--config file.toml`` fills options first; flags actually typed on the
command line (click's parameter source says which) override it, and only those: a flag left at
its default never clobbers the config file.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
from click.core import ParameterSource

from ..errors import SdcoreError
from .config import field_types, unwrap_optional

_GROUP_ORDER = ("model", "data", "training", "loss", "cache", "output")


def _click_type(tp: Any, choices: tuple[str, ...] | None) -> Any:
    base, _ = unwrap_optional(tp)
    if choices:
        return click.Choice(list(choices))
    return {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}.get(base, click.STRING)


def options_to_click(options_class: type) -> list[click.Option]:
    """click options for every CLI field of ``options_class``, ordered by group as in ``--help``."""
    types_ = field_types(options_class)
    fields = [f for f in dataclasses.fields(options_class) if dict(f.metadata or {}).get("cli", True)]

    def order(f: dataclasses.Field[Any]) -> tuple[int, int]:
        group = dict(f.metadata or {}).get("group", "options")
        rank = _GROUP_ORDER.index(group) if group in _GROUP_ORDER else len(_GROUP_ORDER)
        return rank, fields.index(f)

    params: list[click.Option] = []
    for f in sorted(fields, key=order):
        meta: dict[str, Any] = dict(f.metadata or {})
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = meta.get("help", "")
        base, _ = unwrap_optional(types_[f.name])
        if base is bool:
            negative = "--no-" + flag[2:]
            option = click.Option([f"{flag}/{negative}", f.name], default=default, show_default=True, help=help_text)
        else:
            option = click.Option(
                [flag, f.name],
                type=_click_type(types_[f.name], meta.get("choices")),
                default=default,
                show_default=default not in (None, ""),
                help=help_text,
                metavar=meta.get("metavar"),
            )
        option.sd_group = meta.get("group", "options")  # type: ignore[attr-defined]
        params.append(option)
    return params


class GroupedCommand(click.Command):
    """``--help`` with one section per option group (Model, Data, Training, ...)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            group = getattr(param, "sd_group", "general")
            if group == "options":  # option(...) without group=: the plain "Options" section
                group = "general"
            sections.setdefault(group, []).append(record)
        for group, rows in sections.items():
            title = "Options" if group == "general" else f"{group.capitalize()} options"
            with formatter.section(title):
                formatter.write_dl(rows)


def command_line_overrides(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user typed (or set through the environment), not click defaults."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name: value for name, value in values.items() if ctx.get_parameter_source(name) in given}


def build_train_command(spec: Any) -> click.Command:
    """The ``sdcore train <spec.name>`` command for a :class:`sdcore.specs.MethodSpec`."""
    method_class = spec.load()
    options_class = method_class.options_class

    def callback(**kwargs: Any) -> None:
        from .config import dump_options, load_options
        from .loop import train, validate_options

        ctx = click.get_current_context()
        config = kwargs.pop("config", None)
        dry_run = kwargs.pop("dry_run", False)
        save_config = kwargs.pop("save_config", None)
        overrides = command_line_overrides(ctx, kwargs)
        try:
            options = load_options(options_class, config, overrides)
            method = method_class(options)
            validate_options(options, method)
            if save_config:
                dump_options(options, save_config)
                click.echo(f"wrote {save_config}", err=True)
            if dry_run:
                _describe(method, options)
                return
            pm = getattr(ctx.find_root().obj, "pm", None)
            result = train(method, options, plugin_manager=pm)
        except KeyboardInterrupt:
            click.echo("interrupted: continue with the same command plus --resume latest", err=True)
            sys.exit(130)
        except SdcoreError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        if result is not None and result.main_process:
            click.echo(f"saved {result.output} after {result.steps} steps; resumable state in {result.state_dir}")

    params: list[click.Parameter] = [
        click.Option(
            ["--config", "config"],
            type=click.Path(dir_okay=False, exists=True),
            help="TOML or JSON config file (keys = option names); flags given here override it.",
        ),
        click.Option(
            ["--save-config", "save_config"],
            type=click.Path(dir_okay=False),
            help="Write the effective options as TOML to this file.",
        ),
        click.Option(
            ["--dry-run", "dry_run"],
            is_flag=True,
            default=False,
            help="Check the options and dataset and print the step math, then stop (no model is loaded).",
        ),
        *options_to_click(options_class),
    ]
    doc = (method_class.__doc__ or spec.summary or "").strip()
    return GroupedCommand(spec.name, callback=callback, params=params, help=doc, short_help=spec.summary)


def _describe(method: Any, options: Any) -> None:
    """Dataset summary and step math, without loading a model."""
    from .data import build_train_data
    from .loop import output_paths, total_steps_for

    data = build_train_data(options, balance_class=bool(getattr(method, "balance_class", True)))
    steps, epochs = total_steps_for(options, data)
    per_epoch = len(data.epoch_plan(0))
    click.echo(data.index.summary())
    output, state = output_paths(method, options)
    click.echo(
        f"{per_epoch} batches of {options.batch_size} per epoch, gradient accumulation {options.gradient_accumulation}: "
        f"{steps} optimizer steps" + (f" over {epochs} epochs" if epochs else "")
    )
    click.echo(f"result: {output}\nstates: {state}")
