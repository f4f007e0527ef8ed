"""Paths written on Windows, met in a config read on Linux or macOS.

Most kohya / A1111 users write their dataset TOML, training TOML, kohya_ss GUI JSON or ``train.bat`` on Windows
and run it on a Linux box (a cloud GPU, WSL). There ``C:\\train\\img``, ``C:/train/img`` or ``\\\\server\\share``
name nothing, and ``C:\\train\\out`` as an output is worse: POSIX takes it as one relative file name and writes a
folder called ``C:\\train\\out`` in the working directory. So a config value spelled as a Windows path that does not
exist here is a problem that names the key and the path; a *relative* one written with backslashes
(``.\\img``, ``img\\10_x``) is read with ``/`` instead when that path (or, for an output, its folder) exists (what the user meant, and the only
reading that names something), with a note.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

#: ``C:\\x``, ``C:/x``
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
#: ``\\\\server\\share``
_UNC = re.compile(r"^\\\\[^\\/]+")
#: a relative path with backslashes and nothing a prompt or an option string would have (no commas, brackets,
#: parentheses): ``.\\img``, ``..\\data\\10_x``, ``img\\10_x``, ``.\\out/x.safetensors`` (kohya's output_dir + output_name)
_RELATIVE = re.compile(r"^[\w .~/-]*(?:\\[\w .~/-]*)+$")


def windows_path_kind(value: str) -> str | None:
    """``drive`` (``C:\\x``, ``C:/x``), ``share`` (``\\\\server\\x``), ``root`` (``\\train\\img``), ``relative``
    (``.\\img``, ``img\\10_x``) or ``None`` when ``value`` does not look like a path only Windows would write."""
    if _DRIVE.match(value):
        return "drive"
    if _UNC.match(value):
        return "share"
    if "\\" in value and _RELATIVE.match(value) and re.search(r"\w", value):
        # \train\img is the current drive's root: not /train/img, which is another folder
        return "root" if value.startswith("\\") else "relative"
    return None


@dataclass
class WindowsPath:
    """What to do with one value: use ``value`` (translated or not); ``note`` says it was translated;
    ``problem`` (without the file it came from) says it cannot be used."""

    value: str
    note: str | None = None
    problem: str | None = None


def check_windows_path(value: str, key: str, bases: Sequence[Path] = (Path(),)) -> WindowsPath:
    """``value`` of ``key`` checked for a Windows spelling; relative paths are looked up under each of ``bases``.

    A value that exists as written is left alone (a POSIX file may have a backslash in its name)."""
    kind = windows_path_kind(value)
    if kind is None or any((base / value).exists() for base in bases):
        return WindowsPath(value)
    posix = value.replace("\\", "/")
    if kind == "relative":
        if any((base / posix).exists() or (base / posix).parent.exists() for base in bases):  # outputs too
            return WindowsPath(posix, note=f"{key} '{value}' is read as '{posix}' (a Windows path: \\ as /)")
        return WindowsPath(
            value,
            problem=f"{key} '{value}' looks like a Windows path (backslashes) and neither '{posix}' nor its folder exists: "
            f"write it with / as it is on this machine",
        )
    what = {"drive": "a drive letter", "share": "a network share", "root": "the root of a Windows drive"}[kind]
    name = PureWindowsPath(value).name
    example = f"/path/to/{name}" if name else "/path/to/it"
    return WindowsPath(
        value,
        problem=f"{key} '{value}' looks like a Windows path ({what}), which does not exist on this machine: copy the "
        f"files here and give their path on this machine, with / (e.g. {example!r})",
    )
