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
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from ..errors import ConfigError, SdcoreError, debug_enabled, expected_error_message
from ..hinted_command import HintedCommand
from ..options import range_symbols
from .config import field_types, is_text_list, unwrap_optional

_GROUP_ORDER = ("model", "data", "training", "loss", "cache", "output")


class ResolutionType(click.ParamType):
    """``512``, or kohya's ``512,512`` / ``768,512`` (also typed ``768x512``): a side, or a non-square ``(w, h)``
    that :func:`sdcore.train.config.load_options` turns into the side of the same area plus ``resolution_size``."""

    name = "SIDE|W,H"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | tuple[int, int]:
        from .kohya import resolution_value

        if isinstance(value, int):
            return value
        try:
            return resolution_value(str(value).lower().replace("x", ","))
        except (TypeError, ValueError):
            self.fail(
                f"{value!r} is not a resolution (512, or W,H as kohya's 768,512; several: --resolutions 512,768,1024)",
                param,
                ctx,
            )


class SpelledChoice(click.Choice):  # type: ignore[type-arg]
    """A click choice whose value is first passed through the option's ``normalize`` (:func:`sdcore.options.option`):
    other tools' spellings of a choice are accepted as that choice; an unknown value is refused listing the choices."""

    def __init__(self, choices: tuple[str, ...], normalize: Callable[[str], str]) -> None:
        super().__init__(list(choices))
        self.normalize = normalize

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(self.normalize(value) if isinstance(value, str) else value, param, ctx)


def _saved_by(exc: BaseException) -> BaseException:
    """The interrupt whose ``sdcore_saved`` says what the run kept: ``exc``, or the one it came during (a second
    Ctrl-C while the run was ending, e.g. while a tracker closed, leaves the first one's summary in its context)."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if hasattr(current, "sdcore_saved"):
            return current
        seen.add(id(current))
        current = current.__context__
    return exc


class DeclaredRangeOption(click.Option):
    """A click option that shows its :func:`~sdcore.options.option`'s declared range in ``--help`` as click shows a
    ``FloatRange`` (``[default: 0.9999; 0<x<1]``). The type stays a plain number: the range is checked by the
    pre-flight (:func:`sdcore.options.range_problems`), for the command line and config files alike, with every
    other problem at once, not by click at the first bad flag."""

    def __init__(self, *args: Any, declared_range: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.declared_range = declared_range

    def get_help_extra(self, ctx: click.Context) -> click.types.OptionHelpExtra:
        extra = super().get_help_extra(ctx)
        if self.declared_range and "range" not in extra:  # a click range type already says its own
            extra["range"] = self.declared_range
        return extra


def _click_type(
    tp: Any, choices: tuple[str, ...] | None, name: str = "", normalize: Callable[[str], str] | None = None
) -> Any:
    base, _ = unwrap_optional(tp)
    if choices:
        return SpelledChoice(choices, normalize) if normalize is not None else click.Choice(list(choices))
    if name == "resolution":
        return ResolutionType()
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
        if is_text_list(base):  # a repeatable flag: --tread-route A --tread-route B
            option = click.Option(
                [flag, *meta.get("aliases", ()), f.name],
                type=click.STRING,
                multiple=True,
                help=help_text,
                metavar=meta.get("metavar"),
            )
        elif base is bool:
            negative = "--no-" + flag[2:]
            option = click.Option([f"{flag}/{negative}", f.name], default=default, show_default=True, help=help_text)
        else:
            option = DeclaredRangeOption(
                [flag, *meta.get("aliases", ()), f.name],
                type=_click_type(types_[f.name], meta.get("choices"), f.name, meta.get("normalize")),
                default=default,
                show_default=default not in (None, ""),
                help=help_text,
                metavar=meta.get("metavar"),
                declared_range=range_symbols(meta),
            )
        option.sd_group = meta.get("group", "options")  # type: ignore[attr-defined]
        params.append(option)
    return params


KOHYA_PREFIX = "kohya__"


def kohya_click_options(fields: list[str], taken: frozenset[str] = frozenset()) -> list[click.Option]:
    """Hidden options for kohya's spellings (``--network_dim``...), translated in the callback; a kohya
    name that is already one of sdcore's flags (``taken``: ``--ae``, an alias of ``--vae``) is that flag."""
    from .kohya import MULTI_VALUE, cli_names, flag_names

    flags = flag_names()
    params = [click.Option(["--config_file", f"{KOHYA_PREFIX}config_file"], hidden=True, type=click.STRING)]
    for name in cli_names(fields):
        if f"--{name}" in taken:
            continue
        decl = [f"--{name}", f"{KOHYA_PREFIX}{name}"]
        if name in flags:
            params.append(click.Option(decl, is_flag=True, default=None, hidden=True))
        else:
            params.append(click.Option(decl, hidden=True, multiple=name in MULTI_VALUE, type=click.STRING))
    return params


def expand_multi_values(args: list[str]) -> list[str]:
    """kohya's ``--network_args a=1 b=2`` (several values after one flag) -> one flag per value."""
    from .kohya import MULTI_VALUE

    multi = {f"--{n}" for n in MULTI_VALUE}
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token not in multi:
            out.append(token)
            continue
        while i < len(args) and not args[i].startswith("--"):
            out += [token, args[i]]
            i += 1
    return out


def underscores_to_hyphens(command: click.Command, ctx: click.Context, args: list[str]) -> list[str]:
    """``--max_steps 5`` / ``--no_cache_latents`` (kohya users' habit) -> ``--max-steps 5`` /
    ``--no-cache-latents`` when only the hyphenated flag exists; kohya's own names, which are
    options of their own (``--network_dim``), are left to those. The values of options that take
    one are passed on as they are, as click reads them (``--training-comment --max_steps``)."""
    params = command.get_params(ctx)
    known = {opt for param in params for opt in (*param.opts, *param.secondary_opts)}
    takes = {  # options that consume the next token(s) as their value: how many
        opt: max(1, param.nargs)
        for param in params
        if isinstance(param, click.Option) and not param.is_flag and not param.count
        for opt in param.opts
    }
    out: list[str] = []
    values = 0  # tokens still to pass on as the previous option's value
    for index, token in enumerate(args):
        if values:
            values -= 1
            out.append(token)
            continue
        if token == "--":
            return out + args[index:]
        flag, equals, value = token.partition("=")
        if flag.startswith("--") and "_" in flag and flag not in known:
            dashed = "--" + flag[2:].replace("_", "-")
            if dashed in known:
                flag = dashed
                token = dashed + equals + value
        if not equals:
            values = takes.get(flag, 0)
        out.append(token)
    return out


class GroupedCommand(HintedCommand):
    """``--help`` with one section per option group (Model, Data, Training, ...), then kohya's names."""

    kohya_fields: list[str] | None = None

    def prepare_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """kohya's ``--network_dim`` spelled ``--network-dim``, ``--resolution 512 768`` as one value."""
        return underscores_to_hyphens(self, ctx, expand_multi_values(list(args)))

    def option_hint(self, ctx: click.Context, option: str) -> str | None:
        return self._hint(option)

    def _hint(self, option: str) -> str | None:
        """``--network-dim`` / ``--network_dimm`` -> `` (did you mean --rank?)``; another tool's name from
        :data:`~.kohya.NAME_HINTS` (A1111's ``--save-embedding-every``) says what it is here."""
        if self.kohya_fields is None:
            return None
        from .kohya import ALIASES, name_hint, nearest_name

        hinted = name_hint(option, self.kohya_fields, lambda name: f"--{name.replace('_', '-')}")
        if hinted is not None:
            return hinted
        found = nearest_name(option, self.kohya_fields)
        if found is None:
            return None
        alias = ALIASES.get(found)
        if found not in self.kohya_fields and alias is not None and alias.methods:
            return f" (--{found} is a kohya option of `sdcore train {alias.methods}`, not of this method)"
        flag = f"--{found.replace('_', '-')}" if found in self.kohya_fields else f"--{found}"
        return f" (did you mean {flag}?)"

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
        if self.kohya_fields is not None:
            from .kohya import help_epilog, help_rows

            with formatter.section("kohya names (sd-scripts options accepted as they are)"):
                formatter.write_dl(help_rows(self.kohya_fields))
                formatter.write_paragraph()
                formatter.write_text(help_epilog())


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
        from .loop import train
        from .preflight import PreflightError, option_problems

        ctx = click.get_current_context()
        config = kwargs.pop("config", None)
        dry_run = kwargs.pop("dry_run", False)
        save_config = kwargs.pop("save_config", None)
        kohya = {
            name[len(KOHYA_PREFIX) :]: list(value) if isinstance(value, tuple) else value
            for name, value in command_line_overrides(ctx, kwargs).items()
            if name.startswith(KOHYA_PREFIX)
        }
        kwargs = {name: value for name, value in kwargs.items() if not name.startswith(KOHYA_PREFIX)}
        config_file = kohya.pop("config_file", None)
        config = config or (str(config_file) if config_file else None)
        overrides = command_line_overrides(ctx, kwargs)
        notes: list[str] = []
        try:
            try:
                options = load_options(options_class, config, overrides, kohya=kohya, notes=notes)
            except ConfigError as exc:  # found before any model loads, as the pre-flight's: one line each, exit 2
                raise PreflightError(exc.problems) from exc
            for note in notes:
                click.echo(f"note: {note}", err=True)
            method = method_class(options)
            pm = getattr(ctx.find_root().obj, "pm", None)
            if save_config:
                from pathlib import Path

                from ..io import output_problems

                # kohya's TOML (or any other trainer's file) given as --config is kept: it is the input
                problems = option_problems(options, method) + output_problems(
                    [Path(save_config)], inputs=[config] if config else [], overwrite=True, option="--save-config"
                )
                if problems:
                    raise PreflightError(problems)
                dump_options(options, save_config)
                click.echo(f"wrote {save_config}", err=True)
            if dry_run:
                _describe(method, options, pm)
                return
            if options.debug_dataset:  # kohya's --debug_dataset: the data pipeline only, no model, no training
                from .debug_dataset import debug_dataset

                debug_dataset(method, say=click.echo)
                return
            result = train(method, plugin_manager=pm)
        except PreflightError as exc:  # every problem the pre-flight found, one line each
            for problem in exc.problems:
                click.echo(f"Error: {problem}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            # what the run kept (the weights file, the state, or why nothing), said once: by the main process
            first = _saved_by(exc)
            if getattr(first, "sdcore_main", True):
                kept = getattr(first, "sdcore_saved", None) or "training had not started, so nothing was saved"
                click.echo(f"interrupted: {kept}", err=True)
            sys.exit(130)
        except (SdcoreError, OSError) as exc:
            message = expected_error_message(exc)
            if message is None or debug_enabled():
                raise
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)
        if result is not None and result.main_process:
            # the state's place only where one was written (none with --no-save-state, kohya's without save_state)
            state = f"; resumable state in {result.state_dir}" if result.last_state is not None else ""
            click.echo(f"saved {result.output} after {result.steps} steps{state}")

    own = options_to_click(options_class)
    taken = frozenset(flag for option in own for flag in option.opts)
    params: list[click.Parameter] = [
        click.Option(
            ["--config", "config"],
            type=click.Path(dir_okay=False, exists=True),
            help="Config file: sdcore's TOML/JSON/YAML (keys = option names), kohya's training TOML or GUI preset, "
            "a OneTrainer or SimpleTuner config .json, an ai-toolkit job .yaml, or a train.sh/.bat/.ps1 running a "
            "kohya or diffusers training script; flags given here override it.",
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
            help="Run the pre-flight (options, model header, folders, dataset, resume state, disk, memory) and print the plan, then stop (no model is loaded).",
        ),
        *own,
        *kohya_click_options([f.name for f in dataclasses.fields(options_class)], taken),
    ]
    command = GroupedCommand(
        spec.name,
        callback=callback,
        params=params,
        help=method_help(method_class, spec.summary),
        short_help=spec.summary,
    )
    command.kohya_fields = [f.name for f in dataclasses.fields(options_class)]
    return command


def method_help(method_class: type, summary: str | None) -> str:
    """The text ``sdcore train METHOD --help`` opens with: the first paragraph of the method class's docstring,
    without reST's double backquotes, else the plugin's summary. The rest of a docstring is written for whoever
    subclasses the method (TI's explains its generic options type) and is no help to someone training."""
    doc = (method_class.__doc__ or "").strip()
    if not doc:
        return (summary or "").strip()
    first = doc.split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines()).replace("``", "")


def _describe(method: Any, options: Any, pm: Any = None) -> None:
    """The pre-flight with every check, then the plan (model, data, buckets, steps, caches, saves,
    memory), without loading a model. Problems raise :class:`PreflightError` (exit code 2)."""
    import dataclasses as dc

    from .data import steps_text
    from .loop import output_paths
    from .options import apply_model_defaults
    from .preflight import resolve_model_names, run_preflight

    resolve_model_names(options, pm, say=lambda line: click.echo(line, err=True))  # --model NAME: its file
    if apply_model_defaults(options):
        size = options.resolution_size
        pair = f" (the side of {size[0]}x{size[1]}: buckets on its area, that crop with buckets off)" if size else ""
        click.echo(f"resolution: {options.resolution}{pair}")
    else:
        from ..options import keep_records

        options = keep_records(options, dc.replace(options, resolution=512))
        click.echo("resolution: the model's native size, known once it loads (the numbers below assume 512)")
    report = run_preflight(method, options, plugin_manager=pm, verify_images=True)
    report.raise_problems()
    data = report.data
    assert data is not None
    per_epoch = len(data.epoch_plan(0))
    for line in report.plan_lines():
        click.echo(line)
    click.echo(
        f"{per_epoch} batches of {data.batch_sizes_text} per epoch, gradient accumulation {options.gradient_accumulation}: "
        + steps_text(data, report.total_steps, report.epochs, options.gradient_accumulation)
    )
    caps = method.capabilities()
    latents = "no (decoded every step)"
    if options.cache_latents and not caps.needs_pixels:
        latents = (
            "on disk (" + (options.cache_dir or "beside the images") + ")"
            if options.cache_latents_to_disk
            else "in memory"
        )
    from .cache import partial_text_encoders

    family = report.layout.family if report.layout is not None else None
    partial = partial_text_encoders(options, caps, family, method)
    text = (
        (
            "on disk (" + (options.cache_dir or "beside the images") + ")"
            if options.cache_text_encoder_outputs_to_disk
            else "in memory"
        )
        if options.cache_text_encoder_outputs and (not caps.trains_text_encoder or partial) and caps.cacheable_text
        else "no (the text encoder runs every step)"
    )
    if partial and not text.startswith("no"):  # T5's outputs alone; CLIP trains and runs every step
        from ..models.family import get_family

        kinds = {te.component: te.kind.upper() for te in get_family(str(family)).text_encoders}
        text += f", {', '.join(kinds[c] for c in partial)} only (the training text encoders run every step)"
    from ..data.captions import warmup_steps

    if not text.startswith("no") and warmup_steps(options.token_warmup_step, report.total_steps) > 0:
        text = "no (the token warm-up changes captions with the step)"
    click.echo(f"cached: latents {latents}; text-encoder outputs {text}")
    output, state = output_paths(method, options)
    click.echo(f"result: {output}\nstates: {state}")
