"""Options from TOML/JSON config files plus overrides, and back to TOML.

Keys are the options dataclass field names; ``-`` and ``_`` are interchangeable
(``max-steps`` = ``max_steps``) so a config can be written with the CLI flag names. Tables are
flattened (``[training] lr = 1e-4`` is ``lr``), so configs may group keys as ``--help`` does.
Unknown keys are errors naming the key and the file: a typo must never silently train with a
default.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from ..errors import ConfigError

T = TypeVar("T")

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


def coerce(value: Any, tp: Any, *, name: str, where: str) -> Any:
    """Check/convert one config value to the field type; errors say which key and file."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} cannot be empty")
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
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base))
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}") from None
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Flat ``{field_name: value}`` from a ``.toml`` or ``.json`` file."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror or exc})") from exc
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
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
) -> T:
    """Build ``options_class`` from defaults, then the config file, then ``overrides`` (CLI)."""
    types_ = field_types(options_class)
    values: dict[str, Any] = {}
    if config_path is not None:
        where = str(config_path)
        for name, value in read_config_file(config_path).items():
            if name not in types_:
                raise ConfigError(f"{where}: unknown option {name!r} (not an option of {options_class.__name__})")
            values[name] = coerce(value, types_[name], name=name, where=where)
    for raw_name, value in (overrides or {}).items():
        name = _key(raw_name)
        if name not in types_:
            raise ConfigError(f"unknown option {raw_name!r} (not an option of {options_class.__name__})")
        values[name] = coerce(value, types_[name], name=name, where="command line")
    for f in dataclasses.fields(options_class):  # type: ignore[arg-type]
        choices = f.metadata.get("choices") if f.metadata else None
        if choices and f.name in values and values[f.name] is not None and values[f.name] not in choices:
            where = "command line" if f.name in (overrides or {}) else str(config_path)
            raise ConfigError(f"{where}: {f.name} {values[f.name]!r}: choose one of {', '.join(choices)}")
    return options_class(**values)


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
