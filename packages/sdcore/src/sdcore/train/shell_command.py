"""The training command in a shell file, read as the shell would run it (no shell is run).

Users keep their runs as the file a guide gave them: a bash ``train.sh`` (``export MODEL=...`` then one
``accelerate launch train_*.py --arg value ...``), or on Windows a ``train.bat`` (``set MODEL=...``, ``^`` at the
line ends) or a PowerShell ``train.ps1`` (``$env:MODEL = "..."``, a backquote at the line ends). This module turns
such a file into the words of its command: continuation lines joined, the file's variable assignments and the
environment substituted as that shell substitutes them, split into words as that shell splits them. The readers
of the commands (:mod:`.diffusers_script` for diffusers' example scripts, :mod:`.kohya_command` for kohya
sd-scripts) pick the line that runs their script and read its arguments.

Why a reader and not a subprocess: the file is read before anything loads, on any OS, and a command that would
download or run other programs never runs; what sdcore cannot expand (``$(...)``, backquotes in bash) is named
as a problem instead of guessed.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..data.captions import read_caption_text
from ..errors import ConfigError, DataError

#: file suffixes read as a command file whatever script they name (a ``.txt`` is read only when it names a
#: script its reader knows)
SHELL_SUFFIXES = (".sh", ".bash")
#: Windows command files: cmd.exe batch files and PowerShell scripts
CMD_SUFFIXES = (".bat", ".cmd")
POWERSHELL_SUFFIXES = (".ps1",)
COMMAND_SUFFIXES = (*SHELL_SUFFIXES, *CMD_SUFFIXES, *POWERSHELL_SUFFIXES)


@dataclass
class CommandLine:
    """One command of the file: its words (environment prefixes ``VAR=x`` removed), the variables it uses that
    are set neither in the file nor in the environment, and the expansions sdcore does not run."""

    words: list[str]
    missing: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    #: lines after the command that start with ``--`` and were read as its arguments (see :func:`command_lines`)
    joined_lines: int = 0

    def joined_note(self, path: Path) -> list[str]:
        """The note for a command whose arguments came from lines without continuation marks."""
        if not self.joined_lines:
            return []
        mark = {"sh": "\\", "cmd": "^", "powershell": "`"}[dialect(path)]
        return [
            f"{path}: {self.joined_lines} line(s) starting with -- after the command are read as its arguments "
            f"(a shell would run each as a command of its own: end the lines with {mark})"
        ]


def dialect(path: Path) -> str:
    """``sh``, ``cmd`` or ``powershell``: how the file's lines continue, set variables and quote."""
    suffix = path.suffix.lower()
    if suffix in CMD_SUFFIXES:
        return "cmd"
    if suffix in POWERSHELL_SUFFIXES:
        return "powershell"
    return "sh"


def logical_lines(text: str, kind: str = "sh") -> list[str]:
    """The file's lines with continuations joined: bash's ``\\``, cmd's ``^``, PowerShell's backquote at the line
    end. A continuation character followed by spaces or tabs before the line end (a copy-paste slip the shell would
    read as an escaped space ending the command) continues the line too."""
    mark = {"sh": r"\\", "cmd": r"\^", "powershell": r"`"}[kind]
    return re.sub(mark + r"[ \t]*\r?\n", " ", text).splitlines()


ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
NAME_IS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
#: ``$VAR``, ``${VAR}``, ``${VAR:-default}``/``${VAR-default}`` (``=`` forms read alike: the default is used)
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)[-=]([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
#: what bash would expand and sdcore does not: other ``${...}`` forms, ``$(...)``, backquotes
_OTHER_EXPANSION = re.compile(r"\$\{[^}]*\}?|\$\([^)]*\)?|`[^`]*`?")
#: cmd.exe: ``set "NAME=value"`` (the value up to the last quote) / ``set NAME=value`` (the rest of the line as
#: written, quotes included: ``set A="x y"`` then ``%A%`` gives a quoted word); ``%NAME%``; ``%~dp0``, the batch
#: file's own folder with a trailing separator
_CMD_SET_QUOTED = re.compile(r'^\s*@?set\s+"([A-Za-z_][A-Za-z0-9_]*)=(.*)"[^"]*$', re.IGNORECASE)
_CMD_SET = re.compile(r"^\s*@?set\s+([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.IGNORECASE)
_CMD_VAR = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
_CMD_HERE = re.compile(r"%~dp0", re.IGNORECASE)
#: where the shell ends a command's arguments: a pipe, a list operator or a redirection (``2>&1 | tee log``,
#: ``> train.log``): what follows is not the script's
_COMMAND_END = re.compile(r"^(?:\|\|?|\|&|&&?|;|\d*(?:>>?|<)(?:&\d*)?.*)$")
#: commands that only print: a script name in them runs nothing (``echo Training with train_network.py``)
_PRINTS = ("echo", "echo.", "printf", "write-host", "write-output")
#: PowerShell: ``$env:NAME = "value"`` / ``$NAME = "value"``; ``$env:NAME``, ``$NAME``, ``${NAME}``
_PS_SET = re.compile(r"^\s*\$(?:env:)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", re.IGNORECASE)
_PS_VAR = re.compile(r"\$(?:env:)?(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))", re.IGNORECASE)


def substitute(line: str, variables: dict[str, str], missing: list[str], unsupported: list[str] | None = None) -> str:
    """``line`` with its variables filled in as bash fills them: not inside single quotes; a ``${VAR:-x}``
    default when the variable is unset (``:-`` also when it is empty). Other expansions are left as written and
    listed in ``unsupported``."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        found = variables[name] if name in variables else os.environ.get(name)
        if match.group(3) is not None and (found is None or (match.group(2) and not found)):
            return substitute(match.group(3), variables, missing, unsupported)
        if found is None:
            missing.append(name)
            return match.group(0)
        if unsupported is not None:  # X=$(pwd) was kept as written: the command would get it so
            unsupported.extend(m.group(0) for m in _OTHER_EXPANSION.finditer(found))
        return found

    out: list[str] = []
    i, double = 0, False
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            out.append(line[i : i + 2])
            i += 2
        elif ch == "'" and not double:  # single quotes: literal up to the closing one
            end = line.find("'", i + 1)
            end = len(line) if end < 0 else end + 1
            out.append(line[i:end])
            i = end
        elif ch in "$`":
            match = _VAR.match(line, i) if ch == "$" else None
            other = None if match else _OTHER_EXPANSION.match(line, i)
            if match:
                out.append(value(match))
                i = match.end()
            elif other:
                if unsupported is not None:
                    unsupported.append(other.group(0))
                out.append(other.group(0))
                i = other.end()
            else:
                out.append(ch)
                i += 1
        else:
            double ^= ch == '"'
            out.append(ch)
            i += 1
    return "".join(out)


def _windows_substitute(line: str, kind: str, variables: dict[str, str], missing: list[str], folder: str = "") -> str:
    """cmd's ``%NAME%`` (and ``%~dp0``: ``folder``) or PowerShell's ``$env:NAME``/``$NAME`` filled in (Windows
    names ignore case)."""
    folded = {k.lower(): v for k, v in variables.items()}

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        found = folded.get(name.lower(), os.environ.get(name))
        if found is None:
            missing.append(name)
            return match.group(0)
        return found

    if kind == "cmd":
        return _CMD_VAR.sub(value, _CMD_HERE.sub(lambda _: folder, line))
    out, i = [], 0
    while i < len(line):  # PowerShell: no expansion inside single quotes
        if line[i] == "'":
            end = line.find("'", i + 1)
            end = len(line) if end < 0 else end + 1
            out.append(line[i:end])
            i = end
            continue
        match = _PS_VAR.match(line, i) if line[i] == "$" else None
        if match:
            out.append(value(match))
            i = match.end()
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def _until_end(words: list[str]) -> list[str]:
    """The command's own words: those before a pipe, list operator or redirection."""
    for i, word in enumerate(words):
        if _COMMAND_END.match(word):
            return words[:i]
    return words


def _windows_words(line: str, kind: str) -> list[str]:
    """Words as cmd.exe / PowerShell hand them to Python: quotes group (in cmd only double quotes: ``bob's`` is
    one word), a backslash is a path separator."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    if kind == "cmd":
        lexer.quotes = '"'
    return list(lexer)


def _powershell_comment_cut(line: str) -> str:
    """The line without a PowerShell comment: a ``#`` starting a word outside quotes to the line end."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line


def command_lines(path: Path) -> Iterator[CommandLine]:
    """Each command of the file at ``path`` (assignments remembered for the lines below, comments and blank lines
    skipped), in order. A line the shell splitter cannot read ends the file for a ``.txt``/no-suffix file and is a
    :class:`ConfigError` for a shell file.

    Lines that start with ``--`` right after a command are taken as more of its arguments (``joined_lines`` counts
    them): guides print long commands one argument per line without continuation marks (kohya's Japanese and
    Chinese docs do), meaning one command; a shell would run each such line as a command of its own and fail."""
    current: CommandLine | None = None
    for line in _commands(path):
        if current is not None and line.words[:1] and line.words[0].startswith("--"):
            current.words += line.words
            current.missing += line.missing
            current.unsupported += line.unsupported
            current.joined_lines += 1
            continue
        if current is not None:
            yield current
        current = line
    if current is not None:
        yield current


def _commands(path: Path) -> Iterator[CommandLine]:
    try:  # the captions' one decoding rule: PowerShell 5's "> train.ps1" writes UTF-16, Notepad a BOM
        text = read_caption_text(path, "command file")
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    kind = dialect(path)
    if kind != "sh":
        yield from _windows_lines(path, text, kind)
        return
    variables: dict[str, str] = {}
    missing: list[str] = []
    unsupported: list[str] = []
    for line in logical_lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            words = shlex.split(substitute(stripped, variables, missing, unsupported), comments=True)
        except ValueError as exc:
            assign = ASSIGN.match(stripped)
            if assign:  # an assignment the shell splitter cannot read: its text as written
                variables[assign.group(1)] = assign.group(2)
                continue
            if path.suffix.lower() in SHELL_SUFFIXES:
                raise ConfigError(f"{path}: cannot split the command into words ({exc})") from None
            return
        if words[:1] and words[0] in _PRINTS:
            continue
        lead = words[1:] if words[:1] == ["export"] else words
        assigned = 0
        while assigned < len(lead) and NAME_IS.match(lead[assigned]):
            assigned += 1
        if lead and assigned == len(lead):  # VAR=value / export A=1 B=2: remembered for the lines below
            for word in lead:
                name, _, value = word.partition("=")
                variables[name] = value
            unsupported.clear()  # reported where the command uses the value
            continue
        # VAR=x cmd: the prefix is cmd's own
        yield CommandLine(_until_end(lead[assigned:]), list(missing), list(unsupported))
        missing.clear()
        unsupported.clear()


def _windows_lines(path: Path, text: str, kind: str) -> Iterator[CommandLine]:
    variables: dict[str, str] = {}
    missing: list[str] = []  # variables not set, met since the last command (in its set lines too)
    folder = str(path.resolve().parent) + os.sep
    for line in logical_lines(text, kind):
        stripped = _powershell_comment_cut(line).strip() if kind == "powershell" else line.strip()
        bare = stripped.lower().lstrip("@")
        if not stripped or (kind == "cmd" and (bare.startswith(("rem ", "::")) or bare == "rem")):
            continue
        if bare.split(" ", 1)[0] in _PRINTS:  # @echo off, echo ..., Write-Host ...
            continue
        if kind == "cmd":  # cmd expands %VAR% in a set line when it runs
            assign = _CMD_SET_QUOTED.match(stripped) or _CMD_SET.match(stripped)
            if assign:
                variables[assign.group(1)] = _windows_substitute(assign.group(2), kind, variables, missing, folder)
                continue
        else:
            assign = _PS_SET.match(stripped)
            if assign:
                value = assign.group(2)
                if len(value) >= 2 and value[0] == value[-1] == "'":  # single quotes: literal
                    value = value[1:-1]
                else:
                    if len(value) >= 2 and value[0] == value[-1] == '"':
                        value = value[1:-1]
                    value = _windows_substitute(value, kind, variables, missing)
                variables[assign.group(1)] = value
                continue
        try:
            words = _windows_words(_windows_substitute(stripped, kind, variables, missing, folder), kind)
        except ValueError as exc:
            raise ConfigError(f"{path}: cannot split the command into words ({exc})") from None
        if kind == "powershell" and words[:1] == ["&"]:  # & "python.exe" script.py ...: the call operator
            words = words[1:]
        yield CommandLine(_until_end(words), list(missing))
        missing.clear()


def is_option_word(word: str) -> bool:
    """argparse's test for an option string (diffusers' and kohya's scripts both parse with argparse): a leading ``-`` not followed by a number (no script defines an
    option that looks like a negative number, so ``-0.1`` is a value); a word with a space is a value too unless it
    is ``--name=value`` (argparse's ``_parse_optional``: ``if ' ' in arg_string: return None``, ``"-a cat"``)."""
    if " " in word and not (word.startswith("--") and "=" in word and " " not in word.partition("=")[0]):
        return False
    return word.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?([eE][-+]?\d+)?|-\.\d+([eE][-+]?\d+)?", word)


def resolve_option(name: str, defined: Collection[str] | None) -> tuple[str, list[str]]:
    """``name`` (an option without its ``--``) as a script's argparse resolves it against the options it
    ``defined``: ``(name, [])`` when it is defined, or when it is a prefix of none (argparse's "unrecognized
    arguments", left to the caller) or nothing is known of the script (``defined`` None); ``(full, [])`` when it is
    a prefix of exactly one (``allow_abbrev``, on in every script sdcore reads: ``--network_di 8`` is
    ``--network_dim 8``); ``(name, candidates)`` when it is a prefix of several, argparse's "ambiguous option"
    error (:func:`ambiguous_option` words it). An exact name always wins over the longer names it begins."""
    if defined is None or not name or name in defined:
        return name, []
    matches = sorted(k for k in defined if k.startswith(name))
    if len(matches) == 1:
        return matches[0], []
    return name, matches


def ambiguous_option(where: str, name: str, candidates: Collection[str], script: str) -> str:
    """The problem for a prefix of several options (argparse stops with "ambiguous option: --x could match ...")."""
    listed = ", ".join("--" + k for k in sorted(candidates))
    return f"{where}: ambiguous option: --{name} could match {listed} (as {script}'s argparse stops)"
