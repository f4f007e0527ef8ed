"""Declaring options once: a dataclass field with metadata becomes a CLI flag and a TOML key.

``sdcore train <method>`` builds its click options from the method's options dataclass, and
``--config file.toml`` fills the same fields, so the CLI, config files and the Python API can not
drift apart. Use :func:`option` instead of ``dataclasses.field`` in option dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    group: str = "options",
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    normalize: Callable[[str], str] | None = None,
    path: bool = False,
    resume_sensitive: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    above_minimum: bool = False,
    below_maximum: bool = False,
) -> Any:
    """A dataclass field that also describes its command-line flag.

    ``flag`` overrides the generated ``--field-name``; for booleans the generated flag is the pair
    ``--name/--no-name``. ``aliases`` are more flags for the same option (``--ae`` for ``--vae``, as
    kohya's Flux script names it). ``group`` only orders ``--help``; ``cli=False`` keeps a field config-only.
    ``normalize`` maps other spellings of a text value to one of ``choices`` before they are checked, on
    the command line and in config files (A1111's ``XavierNormal`` for ``xavier-normal``), so users coming
    from another tool type what they know; it returns a value it does not know unchanged, and the choices
    check then lists the accepted ones. ``path`` marks a file or folder a config may name: only those values are
    checked for a Windows spelling (:mod:`sdcore.windows_paths`), never a prompt, a separator or a regex.
    ``resume_sensitive``: a method's option that changes the samples or the schedule, so a ``--resume`` with
    another value is warned about as the runtime's own such options are (:data:`sdcore.train.checkpoints.RESUME_SENSITIVE`).
    ``minimum``/``maximum`` declare the values that make sense (both ends included; ``above_minimum=True`` leaves
    the minimum out, for a rate that must be positive, and ``below_maximum=True`` the maximum).
    :func:`range_problems` checks them in the pre-flight's option check for the command line and every config format
    alike, whether or not the option takes effect in this run, so a mistyped value is reported at once with the
    other option problems, before anything loads (``--ema-decay must be between 0 and 1 (exclusive), got -1.0``).
    A sentinel outside the useful range (``-1 = off``) must lie inside the declared one; ``None`` is never checked.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "group": group, "cli": cli, "metavar": metavar,
                "aliases": tuple(aliases), "normalize": normalize, "path": path,
                "resume_sensitive": resume_sensitive, "minimum": minimum, "maximum": maximum,
                "above_minimum": above_minimum, "below_maximum": below_maximum}  # fmt: skip
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _number(value: float, *, upper: bool = False) -> str:
    """A bound as people write it: ``0``, ``0.5``, and SD3's ``2/(pi-2)`` as ``1.75193``, not 17 digits. A bound
    that six digits cannot hold is shortened inward (an ``upper`` one down, a lower one up), so the number a message
    names is itself accepted: rounded to ``1.75194`` it would be refused ("between -1 and 1.75194, got 1.75194")."""
    if float(value).is_integer():
        return str(int(value))
    text = f"{value:.6g}"
    shown = float(text)
    if shown > value if upper else shown < value:
        step = 10.0 ** (math.floor(math.log10(abs(shown))) - 5)  # one in the sixth significant digit
        text = f"{shown - step if upper else shown + step:.6g}"
    return text


def range_text(metadata: Mapping[str, Any]) -> str | None:
    """The declared range of an :func:`option` in words (``between 0 and 1``, ``at least 1``, ``above 0``), or
    None when it declares none."""
    low, high = metadata.get("minimum"), metadata.get("maximum")
    above, below = bool(metadata.get("above_minimum")), bool(metadata.get("below_maximum"))
    if low is not None and high is not None:
        ends = {"low": _number(low), "high": _number(high, upper=True)}
        left_out = [ends[end] for end, out in (("low", above), ("high", below)) if out]
        if len(left_out) == 2:
            return f"between {ends['low']} and {ends['high']} (exclusive)"
        return f"between {ends['low']} and {ends['high']}" + (f" ({left_out[0]} excluded)" if left_out else "")
    if low == 0:  # the house's words (``--lr must be positive``, ``must be 0 or more``)
        return "positive" if above else "0 or more"
    if low is not None:
        return f"above {_number(low)}" if above else f"at least {_number(low)}"
    if high is not None:
        return f"below {_number(high, upper=True)}" if below else f"at most {_number(high, upper=True)}"
    return None


def range_symbols(metadata: Mapping[str, Any]) -> str | None:
    """The declared range of an :func:`option` as click writes a ``FloatRange`` in ``--help`` (``x>=0``,
    ``0<=x<=1``, ``0<x<1``), so the train options, whose ranges the pre-flight checks, read as every other
    command's click ranges do; None when it declares none."""
    low, high = metadata.get("minimum"), metadata.get("maximum")
    left = "<" if metadata.get("above_minimum") else "<="
    right = "<" if metadata.get("below_maximum") else "<="
    if low is not None and high is not None:
        return f"{_number(low)}{left}x{right}{_number(high, upper=True)}"
    if low is not None:
        return f"x{'>' if metadata.get('above_minimum') else '>='}{_number(low)}"
    if high is not None:
        return f"x{right}{_number(high, upper=True)}"
    return None


def out_of_range(metadata: Mapping[str, Any], value: Any) -> str | None:
    """``must be between 0 and 1, got -1.0`` when ``value`` lies outside the option's declared range, else None
    (also for ``None`` and for values that are not numbers: their type is checked elsewhere)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high = metadata.get("minimum"), metadata.get("maximum")
    above, below = bool(metadata.get("above_minimum")), bool(metadata.get("below_maximum"))
    too_low = low is not None and (value <= low if above else value < low)
    too_high = high is not None and (value >= high if below else value > high)
    if too_low or too_high:
        return f"must be {range_text(metadata)}, got {value}"
    return None


#: where config files gave the values of live options instances, by ``id``: kept beside the instance, not in its
#: ``__dict__``, so ``Options(**vars(o))`` and ``dataclasses.asdict`` see only the options; a finalizer drops the entry
_SOURCES: dict[int, dict[str, str]] = {}


def record_sources(options: Any, sources: Mapping[str, str]) -> None:
    """Remember, for an options instance, where a config file gave values (``{"ema_decay": "run.toml: ema_decay"}``,
    a kohya name where it was translated), so :func:`range_problems` names the key the user wrote. A copy made with
    ``dataclasses.replace`` forgets them; its problems then name the flag."""
    _remember(_SOURCES, options, dict(sources))


#: the options the user gave (command line or config file), by ``id`` as :data:`_SOURCES`: option -> how the user
#: wrote it (``--te-only``, ``--use_style_template`` for a kohya flag, ``run.toml: use_style_template``)
_GIVEN: dict[int, dict[str, str]] = {}


def record_given(options: Any, written: Mapping[str, str]) -> None:
    """Remember which options of ``options`` the user gave rather than left at their default, and how they wrote
    each, so a check can say that an option asked for does nothing (``--cache-text-encoder-outputs``, on by
    default, with a trained text encoder) without saying it of every run that keeps the default, and name the
    flag the user typed where another tool's spelling set it. A ``dataclasses.replace`` copy forgets them unless
    :func:`keep_records` copies them over."""
    _remember(_GIVEN, options, dict(written))


def _remember(store: dict[int, Any], options: Any, record: Any) -> None:
    """Keep ``record`` for ``options`` in ``store`` beside the instance, keyed by its ``id`` (not in its
    ``__dict__``: ``Options(**vars(o))`` must still work) and dropped when the instance goes. An options class
    without weak references (slots) keeps nothing: its messages then name the flags."""
    import weakref

    key = id(options)
    try:
        weakref.finalize(options, store.pop, key, None)
    except TypeError:
        return
    store[key] = record


def given(options: Any, name: str) -> bool:
    """Whether the user gave option ``name`` (:func:`record_given`); False where nothing was recorded."""
    return name in _GIVEN.get(id(options), {})


def option_label(options: Any, name: str) -> str:
    """How a message names option ``name`` of ``options``: as the user wrote it (:func:`record_given`:
    ``--use_style_template``, ``run.toml: cache_text_encoder_outputs``), else its flag (``--ema-decay``)."""
    written = _GIVEN.get(id(options), {}).get(name)
    if written:
        return written
    field = next((f for f in dataclasses.fields(options) if f.name == name), None)
    meta: Mapping[str, Any] = (field.metadata if field is not None else None) or {}
    return str(meta.get("flag") or "--" + name.replace("_", "-"))


def keep_records(source: Any, copy: Any) -> Any:
    """``copy`` (a ``dataclasses.replace`` of ``source``) with ``source``'s recorded sources and given options,
    so the pre-flight of a planned copy words and notes its options as the user's own; returns ``copy``."""
    if id(source) in _SOURCES:
        record_sources(copy, _SOURCES[id(source)])
    if id(source) in _GIVEN:
        record_given(copy, _GIVEN[id(source)])
    return copy


def range_problems(options: Any, reported: list[str] | tuple[str, ...] = ()) -> list[str]:
    """One line for each option of ``options`` (a dataclass of :func:`option` fields) whose value lies outside its
    declared range: ``--ema-decay must be between 0 and 1 (exclusive), got -1.0``, or ``run.toml: ema_decay must be
    ...`` for a value a config file gave. Options already named at the start of a line in ``reported`` (or of a part
    of one joined with ``"; "``) are left out:
    a check made where the option takes effect says more (``--huber-c must be positive (kohya's default 0.1)``)."""
    sources: Mapping[str, str] = _SOURCES.get(id(options), {})
    # a method's validate() may join its problems with "; " into one line (LoRA's): each part counts
    said = [part for line in reported for part in line.split("; ")]
    problems: list[str] = []
    for f in dataclasses.fields(options):
        meta: Mapping[str, Any] = f.metadata or {}
        wrong = out_of_range(meta, getattr(options, f.name))
        if wrong is None:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if any(part.startswith((f"{flag} ", f"{flag}:")) for part in said):
            continue
        problems.append(f"{sources.get(f.name, flag)} {wrong}")
    return problems
