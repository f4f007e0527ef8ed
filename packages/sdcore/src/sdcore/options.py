"""Declaring options once: a dataclass field with metadata becomes a CLI flag and a TOML key.

``sdcore train <method>`` builds its click options from the method's options dataclass, and
``--config file.toml`` fills the same fields, so the CLI, config files and the Python API can not
drift apart. Use :func:`option` instead of ``dataclasses.field`` in option dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "group": group, "cli": cli, "metavar": metavar,
                "aliases": tuple(aliases), "normalize": normalize, "path": path,
                "resume_sensitive": resume_sensitive}  # fmt: skip
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
