"""A1111 prompt templates: one training prompt per line with ``[name]`` and ``[filewords]``.

Shared by the methods that train from templates (TI, APT, hypernetworks). Each plugin ships its
own built-in files (our own wording, in A1111's format, so users' A1111 files work unchanged) and
passes their package and names here.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.captions import read_caption_text
from ..errors import ConfigError, DataError


def template_text(spec: str, *, package: str, builtin: tuple[str, ...]) -> tuple[str, str]:
    """(where, text) for a built-in name of ``package`` (with or without ``.txt``) or a file path."""
    name = spec[:-4] if spec.endswith(".txt") else spec
    if name in builtin and not Path(spec).is_file():
        resource = resources.files(package).joinpath(f"templates/{name}.txt")
        return f"built-in template {name!r}", resource.read_text(encoding="utf-8")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"template {spec!r}: no such file and not a built-in ({', '.join(builtin)})")
    try:  # the captions' one decoding rule: a template saved by Notepad (a BOM, UTF-16) reads as written
        return str(path), read_caption_text(path, "template")
    except DataError as exc:
        raise ConfigError(str(exc)) from None


@lru_cache(maxsize=32)
def load_template(spec: str, *, package: str, builtin: tuple[str, ...]) -> tuple[str, ...]:
    """The non-empty lines of a template; ConfigError when there are none."""
    where, text = template_text(spec, package=package, builtin=builtin)
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
