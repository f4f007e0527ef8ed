"""Options from TOML/JSON config files plus overrides, and back to TOML.

Keys are the options dataclass field names; ``-`` and ``_`` are interchangeable
(``max-steps`` = ``max_steps``) so a config can be written with the CLI flag names. Tables are
flattened (``[training] lr = 1e-4`` is ``lr``), so configs may group keys as ``--help`` does.
Unknown keys are errors naming the key and the file (all of them at once, each with the nearest
option name): a typo must never silently train with a default. kohya sd-scripts' names and its
training TOML (flat, or in ``[model_arguments]``-style sections) are read through
:mod:`sdcore.train.kohya`; ai-toolkit jobs, kohya_ss GUI, OneTrainer and SimpleTuner configs through their readers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

from ..errors import ConfigError
from ..options import record_given, record_sources
from ..windows_paths import check_windows_path

T = TypeVar("T")
log = logging.getLogger("sdcore.train")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _key(name: str) -> str:
    return name.strip().replace("-", "_")


def field_types(options_class: type) -> dict[str, Any]:
    """Resolved type hints of the dataclass fields (``from __future__ import annotations`` safe)."""
    hints = typing.get_type_hints(options_class)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(options_class)}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) != len(typing.get_args(tp))
    return tp, False


def is_text_list(tp: Any) -> bool:
    """Whether a field type is ``tuple[str, ...]``: a repeatable flag, a list of strings in a config file."""
    return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, ...)


def coerce(value: Any, tp: Any, *, name: str, where: str) -> Any:
    """Check/convert one config value to the field type; errors say which key and file."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} cannot be empty")
    if is_text_list(base):  # one string, or a list of them
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where}: {name} must be a string or a list of strings, got {value!r}")
        return tuple(items)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan slips past every `< 0` check; inf is no rate, weight or size
                raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
            return number
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base))
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}") from None
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Flat ``{field_name: value}`` from a ``.toml``, ``.json`` or ``.yaml`` file."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror or exc})") from exc
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        elif p.suffix.lower() in (".yaml", ".yml"):  # YAML configs, read as ai-toolkit reads its jobs
            from .aitoolkit import parse_job_text

            data = parse_job_text(raw.decode("utf-8"), p.suffix, str(p))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: invalid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a table of options")
    flat: dict[str, Any] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
                continue
            name = _key(key)
            if name in flat:
                raise ConfigError(f"{p}: option {key!r} is given twice (at {prefix or 'top level'})")
            flat[name] = value

    walk(data, "")
    return flat


def load_options(
    options_class: type[T],
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    kohya: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> T:
    """Build ``options_class`` from defaults, then the config file, then ``overrides`` (CLI).

    Config keys and ``kohya`` (options given on the command line in kohya's spelling) may use
    kohya sd-scripts names (:mod:`.kohya`): they are translated, and a run written in kohya's
    terms gets kohya's defaults where they decide what trains. Every problem (unknown keys with
    the nearest name, wrong types, options sdcore does not implement) is reported in one
    :class:`ConfigError`. Notes (kohya options accepted without effect, kohya defaults applied)
    are appended to ``notes``, or logged as warnings when it is ``None``.
    """
    from . import kohya as k
    from . import kohya_gui

    types_ = field_types(options_class)
    fields = list(types_)
    problems: list[str] = []
    where = str(config_path) if config_path is not None else "command line"
    config_values: dict[str, Any] = {}
    config_kohya: dict[str, Any] = {}
    found_notes: list[str] = []
    needs: dict[str, str] = {}  # problems a command-line option resolves (JobTranslation.needs)
    advice: dict[str, str] = {}  # notes on a trainer's default a command-line option replaces (JobTranslation.advice)
    kohya_run = None
    if config_path is not None:
        unknown = []
        from .kohya_command import read_command

        kohya_run = read_command(config_path, fields)  # a train.sh running a kohya script: kohya's names
        foreign = None if kohya_run is not None else _other_trainer_config(config_path, fields, where)
        if foreign is not None:  # already in sdcore's names
            config_values.update(foreign.values)
            found_notes += foreign.notes
            problems += foreign.problems
            needs = dict(getattr(foreign, "needs", {}))
            advice = dict(getattr(foreign, "advice", {}))
        if kohya_run is not None:
            flat = kohya_run.options
            found_notes += kohya_run.notes
            problems += kohya_run.problems
        else:
            flat = {} if foreign is not None else read_config_file(config_path)
        if kohya_gui.is_gui_preset(flat):
            flat, gui_notes, gui_problems = kohya_gui.gui_preset(flat, where, fields)
            found_notes += gui_notes
            problems += gui_problems
        for name, value in flat.items():
            if name in types_ and name not in k.ALIASES:
                config_values[name] = value
            elif k.is_kohya_name(name):
                config_kohya[name] = value
            elif name == "config_file":  # kohya reads only the config file its command line names
                found_notes.append(f"{where}: config_file inside a config file is not read (as in kohya)")
            else:
                unknown.append(f"{name!r}{k.nearest(name, fields)}")
        if unknown:
            problems.append(f"{where}: unknown option(s) of {options_class.__name__}: {', '.join(unknown)}")
    cli_values = {_key(name): value for name, value in (overrides or {}).items()}
    for name in [n for n in cli_values if n not in types_]:
        problems.append(f"command line: unknown option {name!r} (not an option of {options_class.__name__})")
        cli_values.pop(name)
    problems += [problem for name, problem in needs.items() if name not in cli_values]
    found_notes += [note for name, note in advice.items() if name not in cli_values]
    cli_kohya = dict(kohya or {})
    merged = {**config_kohya, **cli_kohya}
    kohya_where = "command line" if cli_kohya and not config_kohya else where
    translation = k.translate(merged, fields, where=kohya_where)
    problems += translation.problems
    for target, name in translation.origin.items():
        from_cli = name.split(" ")[0] in cli_kohya or (name == "output_dir" and "output_name" in cli_kohya)
        clash = cli_values if from_cli else config_values
        if target in clash:
            problems.append(f"{'command line' if from_cli else where}: {name} and {target} both given")
    translated: dict[str, Any] = {}
    for name, value in translation.values.items():
        base, optional = unwrap_optional(types_[name])
        unset = value is False or value == "" or (value == 0 and not isinstance(value, bool) and base is not bool)
        if unset and base is not bool and (optional or isinstance(value, (bool, str))):
            # kohya (and the kohya_ss GUI) write false / "" / 0 for "not set"
            if optional:
                translated[name] = None
            continue
        translated[name] = value
    raw = {**config_values, **translated, **cli_values}
    if "resolution_size" in types_ and raw.get("resolution") is not None:
        # kohya's "W,H" / [W, H] in any source: the side of the same area plus the pair (buckets, crops, metadata);
        # a side given on the command line replaces a config's pair
        size = (
            None if "resolution" in cli_values and "resolution_size" not in cli_values else raw.get("resolution_size")
        )
        try:
            raw["resolution"], raw["resolution_size"] = k.split_resolution(raw["resolution"], size)
        except (TypeError, ValueError):
            source = "command line" if "resolution" in cli_values else where
            problems.append(f"{source}: resolution must be a side (512) or W,H (768,512), got {raw['resolution']!r}")
            raw.pop("resolution")
    for name, value in translation.implied.items():
        raw.setdefault(name, value)
    found_notes += translation.notes
    said_once: set[str] = set()  # options a note here already said do nothing
    if k.written_in_kohya_terms([*config_kohya, *cli_kohya], fields):
        family = _family_for_kohya_defaults(raw, fields, found_notes)
        problems += k.model_type_problems(merged, family, kohya_where)
        # kohya's timestep_sampling as kohya means it; sdcore's --timestep-sampling flag keeps sdcore's meaning
        from_kohya = translation.origin.get("timestep_sampling") == "timestep_sampling"
        sampling = merged.get("timestep_sampling") if from_kohya and "timestep_sampling" not in cli_values else None
        found_notes += k.kohya_flow_semantics(raw, sampling, family)
        found_notes += k.kohya_t5_cache_only(raw, merged, translation.origin, family)  # sd3_train.py's alone
        if "prediction_type" not in cli_values:  # sdcore's own --prediction-type keeps its refusal
            found_notes += k.kohya_v_parameterization(raw, translation.origin, family)
        found_notes += k.kohya_flux_train_text_encoder(raw, translation.origin, set(cli_values), fields, family)
        own = {f.name: f.default for f in dataclasses.fields(options_class)}  # type: ignore[arg-type]
        defaults, applied = k.kohya_defaults(fields, set(raw), raw, family=family, own_defaults=own)
        if applied:
            found_notes.append("kohya defaults applied (set the option to change): " + "; ".join(applied))
        # a default is returned for a given option only where kohya's "unset" (None here) means that default
        raw = {**defaults, **{name: v for name, v in raw.items() if not (name in defaults and v is None)}}
        rate_notes, rate_problems = k.kohya_text_encoder_rates(raw, family, kohya_where)  # a text_encoder_lr list
        cache_notes = k.kohya_text_cache_notes(raw, translation.origin, fields, family)
        said_once |= {"cache_text_encoder_outputs"} if cache_notes else set()  # not again by the pre-flight
        found_notes += cache_notes
        found_notes += k.kohya_text_encoder_storage(raw, merged, fields, family)  # fp8_base's text encoders
        found_notes += rate_notes + k.kohya_zero_rate_notes(raw, translation.origin, fields)
        problems += rate_problems
    if kohya_run is not None:
        problems += _kohya_script_family(kohya_run.script, raw, where)
    for target, source in translation.follow.items():  # e.g. LyCORIS' conv_dim defaulting to network_dim
        if target not in raw and raw.get(source) is not None:
            raw[target] = raw[source]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # option -> "file: key", for the values a config file gave
    # only files and folders: a prompt, a separator or a regex (attn1\\.to_q, \\w) is not a Windows path
    path_fields = {f.name for f in dataclasses.fields(options_class) if f.metadata.get("path")}  # type: ignore[arg-type]
    for name, value in raw.items():
        source = "command line" if name in cli_values else where
        try:
            values[name] = coerce(value, types_[name], name=name, where=source)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if source != "command line" and name in path_fields and isinstance(values[name], str):  # written on Windows
            checked = check_windows_path(values[name], translation.origin.get(name, name))
            values[name] = checked.value
            found_notes += [f"{where}: {checked.note}"] if checked.note else []
            problems += [f"{where}: {checked.problem}"] if checked.problem else []
    if "batch_size" in types_ and isinstance(values.get("data"), str):
        _dataset_batch_size(values, options_class, found_notes, problems)
    for f in dataclasses.fields(options_class):  # type: ignore[arg-type]
        choices = f.metadata.get("choices") if f.metadata else None
        normalize = f.metadata.get("normalize") if f.metadata else None
        if normalize is not None and isinstance(values.get(f.name), str):  # another tool's spelling of a choice
            values[f.name] = normalize(values[f.name])
        if choices and f.name in values and values[f.name] is not None and values[f.name] not in choices:
            source = "command line" if f.name in cli_values else where
            problems.append(f"{source}: {f.name} {values[f.name]!r}: choose one of {', '.join(choices)}")
        if f.name in values and f.name not in cli_values and config_path is not None:  # for a range problem's words
            label = translation.origin.get(f.name, f.name)
            from_cli = f.name in translation.origin and label.split(" ")[0] in cli_kohya
            if not from_cli:
                sources[f.name] = f"{where}: {label}"
    if problems:
        prefix = f"{where}: "
        if config_path is not None and all(p.startswith(prefix) for p in problems):
            raise ConfigError(prefix + "; ".join(p[len(prefix) :] for p in problems), problems)
        raise ConfigError("; ".join(problems), problems)
    if notes is not None:
        notes.extend(found_notes)
    else:
        for note in found_notes:
            log.warning("%s", note)
    options = options_class(**values)
    record_sources(options, sources)  # the pre-flight's range check names the config's key (sdcore.options)
    # what the user set, in any spelling, as written: the pre-flight notes an option asked for that does nothing
    record_given(options, {n: w for n, w in _written(options_class, where, config_values, translation.origin,
                                                     cli_kohya, cli_values).items() if n not in said_once})  # fmt: skip
    return options


def _written(
    options_class: type,
    where: str,
    config_values: Mapping[str, Any],
    origin: Mapping[str, str],
    cli_kohya: Mapping[str, Any],
    cli_values: Mapping[str, Any],
) -> dict[str, str]:
    """Each option the user gave -> how they wrote it, for messages: ``run.toml: key`` from a config file,
    ``--use_style_template`` for a kohya flag on the command line, else the option's own flag."""
    flags = {
        f.name: f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in dataclasses.fields(options_class)
    }  # type: ignore[arg-type]
    written = {name: f"{where}: {name}" for name in config_values}
    for name, spelled in origin.items():
        key = spelled.split(" ")[0]
        written[name] = f"--{key}" if key in cli_kohya else f"{where}: {spelled}"
    written.update({name: flags[name] for name in cli_values})
    return written


def _dataset_batch_size(values: dict[str, Any], options_class: type, notes: list[str], problems: list[str]) -> None:
    """A kohya dataset TOML's ``batch_size`` (kohya: a ``[[datasets]]``'s own, else ``[general]``'s, else
    ``--train_batch_size``). One size for every dataset becomes the run's; different sizes stay each dataset's
    own (the sampler batches every dataset alone at its size, as kohya does) and the run's ``--batch-size``
    fills those that give none (kohya then writes no ``ss_batch_size_per_device``, and neither does a LoRA)."""
    data = Path(values["data"]).expanduser()
    if data.suffix.lower() != ".toml" or not data.is_file():
        return
    from ..data.dataset import toml_batch_sizes

    sizes = toml_batch_sizes(data)
    if not any(size is not None for size in sizes):
        return
    default = next(f.default for f in dataclasses.fields(options_class) if f.name == "batch_size")  # type: ignore[arg-type]
    run = values.get("batch_size", default)
    distinct = sorted({run if size is None else size for size in sizes})
    if len(distinct) > 1:
        each = ", ".join(f"datasets[{i}] {run if size is None else size}" for i, size in enumerate(sizes))
        notes.append(
            f"batch sizes per dataset from {data}: {each} (each [[datasets]] batches alone at its own size, "
            f"as in kohya; --batch-size {run} where one gives none)"
        )
    elif distinct[0] != run:
        notes.append(
            f"batch size {distinct[0]} from {data} (a dataset config's batch_size wins over "
            "--batch-size/--train_batch_size, as in kohya)"
        )
        values["batch_size"] = distinct[0]


def _other_trainer_config(config_path: str | Path, fields: list[str], where: str) -> Any | None:
    """The translation of an ai-toolkit job, a OneTrainer or a SimpleTuner config, or a diffusers example-script
    command (each reader has its own field table and returns values in sdcore's names, notes and problems), or
    None for any other file."""
    from . import aitoolkit, diffusers_script, onetrainer_config, simpletuner_config

    readers: tuple[tuple[Any, Any], ...] = (
        (aitoolkit.read_job, aitoolkit.translate_job),
        (onetrainer_config.read_train_config, onetrainer_config.translate_config),
        (simpletuner_config.read_config, simpletuner_config.translate_config),
        (diffusers_script.read_command, diffusers_script.translate_command),
    )
    for read, translate in readers:
        data = read(config_path)
        if data is not None:
            return translate(data, fields, where=where, path=config_path)
    return None


def _kohya_script_family(script: str, raw: dict[str, Any], where: str) -> list[str]:
    """A kohya command's script loads another family than its model's (read from the header only)."""
    from ..models.layout import peek_family
    from .kohya_command import script_family_problem

    model = str(raw.get("model") or "")
    if not model or not (model.startswith("tiny:") or Path(model).expanduser().exists()):
        return []
    problem = script_family_problem(script, peek_family(model), model, f"{where}: {script}")
    return [problem] if problem else []


def _family_for_kohya_defaults(raw: dict[str, Any], fields: list[str], notes: list[str]) -> str | None:
    """The model's family, read from its header (no weights load), for kohya's per-family defaults and
    meanings (its Flux and SD3 scripts'); None for a method without flow options, or when the family cannot
    be read before loading (then a note when kohya's Flux/SD3 defaults could have applied)."""
    from . import kohya as k

    model = str(raw.get("model") or "")
    if not model or "timestep_sampling" not in fields:
        return None
    from ..models.layout import peek_family

    family = peek_family(model)
    unset = k.family_default_targets() & (set(fields) - set(raw))
    readable = Path(model).expanduser().exists() and not model.lower().endswith((".ckpt", ".pt", ".pth", ".bin"))
    if family is None and unset and readable:  # a pickle file is an SD1/SD2/SDXL model; a missing one is reported
        notes.append(
            f"{model}: the model family cannot be read before loading, so kohya's Flux/SD3 script defaults "
            "(timestep_sampling, model_prediction_type, discrete_flow_shift, guidance_scale) are not applied; "
            "set them for a Flux or SD3 model"
        )
    return family


def options_to_dict(options: Any, *, skip_defaults: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if skip_defaults and f.default is not dataclasses.MISSING and value == f.default:
            continue
        out[f.name] = value
    return out


def dump_options(options: Any, path: str | Path | None = None, *, skip_defaults: bool = False) -> str:
    """The options as TOML (``None`` values are left out: TOML has no null); written atomically
    to ``path`` when given."""
    import tomli_w

    from ..io import atomic_write_text

    data = {k: v for k, v in options_to_dict(options, skip_defaults=skip_defaults).items() if v is not None}
    text = tomli_w.dumps(data)
    if path is not None:
        atomic_write_text(path, text)
    return text
