"""Helpers shared by the readers of other trainers' config files (ai-toolkit jobs, OneTrainer configs).

Those readers hold a table of the other tool's field names and defaults; a field is translated,
accepted with a note, accepted only at its default (refused by name otherwise), or unknown. What
"at its default" and "the nearest known name" mean is the same for every such table, so it lives here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

#: a default computed from another field (ai-toolkit's ``linear_alpha`` = ``alpha``): only "not given" matches it
FOLLOWS = "<follows another field>"


def nearest_field(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest name in ``known``, or ``""`` when none is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def same_value(value: Any, default: Any) -> bool:
    """Whether a config value means the tool's default: ``None``/``0``/``False`` for a ``False`` default,
    empty for a ``None`` default, numbers by value (``1`` = ``1.0``), :data:`FOLLOWS` only when unset."""
    if default is FOLLOWS:
        return value is None
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default or (value in (None, 0) and default is False)
    if default is None:
        return value in (None, "", [], {})
    try:
        return bool(value == default or float(value) == float(default))
    except (TypeError, ValueError):
        return False


def drop_foreign_options(values: dict[str, Any], fields: Iterable[str], problem: str, problems: list[str]) -> None:
    """Remove translated values that are not options of the method the file was given to, with one
    problem ``"<problem>: a, b"`` naming them (a job for another method, or a setting it lacks)."""
    present = set(fields)
    missing = sorted(k for k in values if k not in present)
    if missing:
        problems.append(f"{problem}: {', '.join(missing)}")
        for name in missing:
            values.pop(name)


__all__ = ["FOLLOWS", "drop_foreign_options", "nearest_field", "same_value"]
