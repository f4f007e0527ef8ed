"""Prompt templates for TI training: one prompt per line with ``[name]`` and ``[filewords]``.

The built-in files (``style``, ``subject``, ``style_filewords``, ``subject_filewords``, ``none``)
are our own wording in A1111's file format, so users' A1111 template files work unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sdcore.errors import ConfigError

BUILTIN = ("style", "subject", "style_filewords", "subject_filewords", "none")


def template_text(spec: str) -> tuple[str, str]:
    """(where, text) for a built-in name (with or without ``.txt``) or a file path."""
    name = spec[:-4] if spec.endswith(".txt") else spec
    if name in BUILTIN and not Path(spec).is_file():
        resource = resources.files("sdplugin_ti").joinpath(f"templates/{name}.txt")
        return f"built-in template {name!r}", resource.read_text(encoding="utf-8")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"template {spec!r}: no such file and not a built-in ({', '.join(BUILTIN)})")
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"template {path}: cannot read: {exc}") from exc


@lru_cache(maxsize=32)
def load_template(spec: str) -> tuple[str, ...]:
    """The non-empty lines of a template; ConfigError when there are none."""
    where, text = template_text(spec)
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise ConfigError(f"{where} has no template lines")
    return lines


def render(line: str, name: str, filewords: str) -> str:
    """Fill one template line: ``[filewords]`` first, then ``[name]`` (A1111's order)."""
    return line.replace("[filewords]", filewords).replace("[name]", name)


def pick_line(lines: tuple[str, ...], rng: Any) -> str:
    """A random line; ``rng`` may be ``random.Random``, a numpy Generator or None."""
    if len(lines) == 1 or rng is None:  # no generator: deterministic first line
        return lines[0]
    if hasattr(rng, "randrange"):
        return lines[rng.randrange(len(lines))]
    if hasattr(rng, "integers"):
        return lines[int(rng.integers(len(lines)))]
    if hasattr(rng, "randint"):
        return lines[int(rng.randint(0, len(lines) - 1))]
    import random

    return lines[random.randrange(len(lines))]
