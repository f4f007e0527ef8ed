"""Every ``sdcore`` command, option, choice value, import and config file the docs show exists.

Users copy lines from README.md, docs/**/*.md and packages/*/README.md; an option renamed since is the
first thing a newcomer trips on. This module reads their fenced code blocks and checks them against
the real CLI (the root group ``sdcore.cli.build_cli`` builds, with every installed plugin plus the
docs' example plugin ``docs/examples/sdplugin-hello``), without running a command or loading a model:

- shell blocks (```bash, sh, shell, console, none): ``\\`` continuations joined, a ``$ `` prompt
  stripped (in a block with prompts, lines without one are output), leading ``VAR=value`` assignments
  dropped; every part (split at ``&&``, ``||``, ``|``, ``;``) that runs ``sdcore`` (``sdcore ...``,
  ``python -m sdcore ...``, ``accelerate launch ... -m sdcore ...``) has its subcommands resolved the
  way click resolves them (plugin commands, lazy ``train``/``tag`` groups, aliases such as ``db``) and
  its arguments parsed by the command's own parser (so kohya's ``--network_dim``, the ``--max_steps``
  spelling of ``--max-steps``, ``--no-x`` pairs, ``--opt=value`` and ``-o`` count exactly as the CLI
  counts them); a ``click.Choice`` value must be one of the choices.
- inline code spans of the prose and tables that are whole ``sdcore`` commands (``sdcore model convert
  --to bfl``) are checked the same way, except that the last option may be named without its value.
- ```python blocks: each ``import``/``from ... import`` statement of a first-party module (``sdcore``,
  ``sdplugin_*`` under packages/, the example's ``sdplugin_hello``) is executed on its own.
- ```toml blocks that the block or the paragraph above introduces as ``sdcore train <method> --config``
  files are read with the method's ``load_options`` (sdcore's names or kohya's, as ``--config`` reads
  them), so an unknown key or a wrong type is reported.

Skipped, to stay conservative (a reported line is certainly wrong):
- values of options that are not choices (paths, numbers, prompts) and positional arguments (their
  count included: docs write ``...`` for the rest of a command);
- placeholder values and subcommand names: ``<...>``, anything with ``...``, ``$VAR``, all-uppercase
  words (``PATH``, ``DIR``, ``N``); a synopsis' ``a|b|c`` value is checked choice by choice, its
  ``[--optional flags]`` brackets are dropped, and a ``|`` inside brackets separates alternatives;
- indented lines starting with ``[`` or ``-`` below a command continue it (the synopsis style of
  packages/sdplugin-taggers/README.md), other lines without ``\\`` are separate commands;
- the options of other programs (``accelerate launch``, ``pip``, ``hf``);
- python lines other than imports, and imports of hypothetical plugins (``sdplugin_mydit``);
- toml blocks not introduced as an sdcore ``--config`` (pyproject.toml, kohya's dataset TOML).
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

ROOT = Path(__file__).parents[1]
EXAMPLE_SRC = ROOT / "docs" / "examples" / "sdplugin-hello" / "src"
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "shell-session", "zsh"}
FIRST_PARTY = {"sdcore", "sdplugin_hello"} | {p.name for p in ROOT.glob("packages/*/src/sdplugin_*")}


def doc_files() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted(ROOT.glob("packages/*/README.md")),
    ]


# --- reading markdown -------------------------------------------------------------------------------


@dataclass
class Block:
    lang: str
    line: int  # the line of the opening fence
    lines: list[tuple[int, str]]  # (line number, text) of the body
    before: str  # the paragraph just above the fence


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text (indented fences of list items too)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, lang = match.groups()
        start = i + 1
        para: list[str] = []
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        while j >= 0 and lines[j].strip() and not _FENCE.match(lines[j]) and len(para) < 8:
            para.insert(0, lines[j])
            j -= 1
        body: list[tuple[int, str]] = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            row = lines[i]
            body.append((i + 1, row[len(indent) :] if row.startswith(indent) else row.lstrip()))
            i += 1
        blocks.append(Block(lang.lower(), start, body, "\n".join(para)))
        i += 1
    return blocks


def command_lines(block: Block) -> list[tuple[int, str]]:
    """The logical command lines of a shell block: continuations joined, prompts and output dropped."""
    prompted = any(text.startswith("$ ") or text == "$" for _, text in block.lines)
    out: list[tuple[int, str]] = []
    continuing = False
    for lineno, text in block.lines:
        if continuing:
            out[-1] = (out[-1][0], out[-1][1] + " " + text.strip())
        elif prompted:
            if not text.startswith("$"):
                continue
            out.append((lineno, text[1:].strip()))
        elif out and text[:1] in (" ", "\t") and text.strip()[:1] in ("[", "-"):
            out[-1] = (out[-1][0], out[-1][1] + " " + text.strip())  # a synopsis' indented continuation
        elif text.strip():
            out.append((lineno, text.strip()))
        continuing = bool(out) and out[-1][1].endswith("\\")
        if continuing:
            out[-1] = (out[-1][0], out[-1][1][:-1].rstrip())
    return out


_SDCORE_SPAN = re.compile(r"^(?:[A-Za-z_]\w*=\S+ )*(?:sdcore|python3? -m sdcore|accelerate launch .*-m sdcore)(?: |$)")


def inline_commands(text: str) -> list[tuple[int, str]]:
    """Inline code spans of the prose (tables included) that are ``sdcore`` commands: ``sdcore model convert
    --to bfl``. Such a span may end with an option named without its value (``sdcore tag caption --clip``)."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match is not None and (fence is None or match.group(2).startswith(fence)):
            fence = match.group(2) if fence is None else None
            continue
        if fence is None:
            out += [(lineno, span) for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", line) if _SDCORE_SPAN.match(span)]
    return out


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # prose in a synopsis ("kohya's spellings"): drop in-word apostrophes, then words
        line = re.sub(r"(?<=\w)'(?=\w)", "", line)
        try:
            return shlex.split(line, comments=True)
        except ValueError:
            return line.split("#", 1)[0].split()


def sdcore_invocations(line: str) -> list[list[str]]:
    """The argument lists after ``sdcore`` of every part of a shell line that runs it."""
    parts: list[list[str]] = [[]]
    depth = 0  # inside a synopsis' [optional ...] brackets, "|" separates alternatives
    for token in _split(line):
        if token in ("&&", "||", ";") or (token == "|" and depth == 0):
            parts.append([])
            continue
        if token == "|":
            continue
        if token.endswith(";") and len(token) > 1:
            parts[-1].append(token[:-1])
            parts.append([])
            continue
        if token.startswith("[-") or "]" not in token:  # "[--flag", "[--flag]", "[same"
            stripped = token.lstrip("[")
            depth += len(token) - len(stripped)
            token = stripped
        if "[" not in token:  # "value]", "--flag]"
            stripped = token.rstrip("]")
            depth = max(0, depth - (len(token) - len(stripped)))
            token = stripped
        if token:
            parts[-1].append(token)
    found = []
    for tokens in parts:
        while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
            tokens = tokens[1:]
        if tokens and tokens[0].rsplit("/", 1)[-1] == "sdcore":
            found.append(tokens[1:])
            continue
        for i in range(len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "sdcore":
                found.append(tokens[i + 2 :])
                break
    return found


def is_placeholder(value: str) -> bool:
    return "..." in value or value.startswith(("<", "$")) or re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\w+)?", value) is not None


# --- checking against the CLI -----------------------------------------------------------------------


class _Parsed(Exception):
    """Raised from inside ``Command.parse_args`` once click's parser has read the arguments: what it read,
    before any value is converted or any callback (``--help``) runs."""

    def __init__(self, opts: dict[str, Any], rest: list[str]) -> None:
        self.opts, self.rest = opts, rest


def _parse(command: click.Command, ctx: click.Context, args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``command``'s own ``parse_args`` (its rewrites of kohya's spellings and its hints included) up to the
    parser's result. Raises click's UsageError for an unknown option or a missing value."""
    real = command.make_parser

    def make_parser(c: click.Context) -> Any:
        parser = real(c)
        parse = parser.parse_args

        def parse_args(args: list[str]) -> Any:
            opts, rest, _ = parse(args=args)
            raise _Parsed(opts, rest)

        parser.parse_args = parse_args  # type: ignore[method-assign]
        return parser

    command.make_parser = make_parser  # type: ignore[method-assign,assignment]
    try:
        command.parse_args(ctx, list(args))
    except _Parsed as parsed:
        return parsed.opts, parsed.rest
    finally:
        del command.make_parser
    raise AssertionError(f"{command.name}: parse_args returned without parsing")  # pragma: no cover


@dataclass
class CliChecker:
    cli: click.Group
    obj: Any
    built: dict[tuple[str, ...], click.Command] = field(default_factory=dict)

    def check(self, args: list[str], *, partial: bool = False) -> tuple[str, list[str]]:
        """``(command path, problems)`` for ``sdcore <args>``; ``partial``: the last option may lack its value."""
        problems: list[str] = []
        command: click.Command = self.cli
        ctx = click.Context(self.cli, info_name="sdcore", obj=self.obj, **self.cli.context_settings)
        path = ["sdcore"]
        while True:
            opts, rest, unknown = self._parse_all(command, ctx, args, partial)
            problems += unknown
            problems += self._choice_problems(command, ctx, opts)
            if not isinstance(command, click.Group) or not rest or is_placeholder(rest[0]):
                return " ".join(path), problems
            name = rest[0]
            key = (*path, name)
            if key not in self.built:
                try:
                    _, sub, _ = command.resolve_command(ctx, rest)
                except click.UsageError as exc:
                    problems.append(exc.format_message())
                    return " ".join(path), problems
                assert sub is not None
                self.built[key] = sub
            command = self.built[key]
            ctx = click.Context(command, info_name=name, parent=ctx)
            path.append(name)
            args = rest[1:]

    def _parse_all(
        self, command: click.Command, ctx: click.Context, args: list[str], partial: bool
    ) -> tuple[dict[str, Any], list[str], list[str]]:
        """Parse, dropping each unknown option in turn so that every one of them is reported."""
        unknown: list[str] = []
        args = list(args)
        while True:
            try:
                opts, rest = _parse(command, ctx, args)
                return opts, rest, unknown
            except click.NoSuchOption as exc:
                unknown.append(exc.format_message())
                name = exc.option_name
                index = next(
                    (i for i, a in enumerate(args) if a.partition("=")[0] in (name, "--" + name[2:].replace("-", "_"))),
                    None,
                )
                if index is None:
                    return {}, [], unknown
                del args[index]
            except click.UsageError as exc:  # an option without its value
                if type(exc).__name__ == "NoArgsIsHelpError":
                    return {}, [], unknown
                last = args[-1].partition("=")[0] if args else None
                if partial and isinstance(exc, click.BadOptionUsage) and exc.option_name == last:
                    args = args[:-1]  # `sdcore tag caption --clip` names the option
                    continue
                unknown.append(exc.format_message())
                return {}, [], unknown

    @staticmethod
    def _choice_problems(command: click.Command, ctx: click.Context, opts: dict[str, Any]) -> list[str]:
        problems = []
        for param in command.get_params(ctx):
            if not isinstance(param.type, click.Choice) or param.name not in opts:
                continue
            given = opts[param.name]
            values = given if isinstance(given, (list, tuple)) else [given]
            for value in values:
                if not isinstance(value, str):
                    continue
                for part in value.split("|") if "|" in value else [value]:
                    if is_placeholder(part):
                        continue
                    try:
                        param.type.convert(part, param, ctx)
                    except click.BadParameter as exc:
                        problems.append(exc.format_message())
        return problems


# --- python imports and config files ----------------------------------------------------------------


def import_statements(block: Block) -> list[tuple[int, str]]:
    """``import x`` / ``from x import (a, b)`` statements of first-party modules, one per entry."""
    out: list[tuple[int, str]] = []
    rows = iter(block.lines)
    for lineno, text in rows:
        code = text.split("#", 1)[0].rstrip()
        match = re.match(r"^(?:from\s+([\w.]+)\s+import\s|import\s+([\w., ]+)$)", code)
        if match is None:
            continue
        while code.count("(") > code.count(")") or code.endswith("\\"):
            code = code.rstrip("\\") + " " + next(rows, (0, ")"))[1].split("#", 1)[0].strip()
        modules = [match.group(1)] if match.group(1) else [m.split()[0] for m in match.group(2).split(",")]
        if any(m.split(".")[0] in FIRST_PARTY for m in modules):
            out.append((lineno, code))
    return out


def config_method(block: Block) -> str | None:
    """The method of a toml block introduced as ``sdcore train <method> --config FILE`` (or None)."""
    for text in ("\n".join(t for _, t in block.lines), block.before):
        match = re.search(r"sdcore train ([\w-]+)[^\n]*?--config(?:[ =]|$)", text)
        if match:
            return match.group(1)
    return None


# --- the checks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker() -> Iterator[CliChecker]:
    from sdcore.cli import CliState, build_cli
    from sdcore.plugins import get_plugin_manager

    sys.path.insert(0, str(EXAMPLE_SRC))
    try:
        from sdplugin_hello import plugin as hello  # docs/writing-a-plugin.md installs it, then uses it

        pm = get_plugin_manager(extra=[hello])
        assert pm.load_errors == []
        yield CliChecker(build_cli(pm), CliState(pm))
    finally:
        sys.path.remove(str(EXAMPLE_SRC))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_sdcore_command_in_the_docs_exists(checker: CliChecker) -> None:
    problems: list[str] = []
    checked = 0
    for path in doc_files():
        text = path.read_text()
        lines = [(n, line, False) for b in fenced_blocks(text) if b.lang in SHELL_LANGS for n, line in command_lines(b)]
        for lineno, line, partial in [*lines, *((n, span, True) for n, span in inline_commands(text))]:
            for args in sdcore_invocations(line):
                checked += 1
                command, found = checker.check(args, partial=partial)
                problems += [f"{_rel(path)}:{lineno}: {command}: {p}" for p in found]
    assert checked > 100, f"only {checked} sdcore commands found in the docs: is the block reader broken?"
    assert not problems, f"{len(problems)} problem(s) in the docs' commands:\n" + "\n".join(problems)


def import_problem(statement: str, where: str) -> str | None:
    """Run one import statement (with the docs' example plugin importable); the error, or None."""
    sys.path.insert(0, str(EXAMPLE_SRC))
    try:
        exec(compile(statement, where, "exec"), {})
    except Exception as exc:  # ImportError, or a module failing as it imports
        return f"{statement}: {type(exc).__name__}: {exc}"
    finally:
        sys.path.remove(str(EXAMPLE_SRC))
    return None


def config_problems(block: Block, methods: dict[str, Any], file: Path) -> list[str]:
    """What ``sdcore train <method> --config FILE`` finds wrong in a toml block (written to ``file``):
    an unknown method, unknown keys (with the nearest name), wrong types, kohya names sdcore refuses."""
    from sdcore.errors import ConfigError
    from sdcore.train.config import load_options

    method = config_method(block)
    if method not in methods:
        return [f"sdcore train {method}: no such training method"]
    file.write_text("\n".join(t for _, t in block.lines) + "\n")
    try:
        load_options(methods[method].load().options_class, file, {}, notes=[])
    except ConfigError as exc:
        return [f"sdcore train {method} --config: {p.replace(f'{file}: ', '')}" for p in exc.problems or [str(exc)]]
    return []


def test_every_import_in_the_docs_works() -> None:
    problems: list[str] = []
    checked = 0
    for path in doc_files():
        for block in fenced_blocks(path.read_text()):
            if block.lang not in ("python", "py", "pycon"):
                continue
            for lineno, statement in import_statements(block):
                checked += 1
                problem = import_problem(statement, f"{_rel(path)}:{lineno}")
                if problem is not None:
                    problems.append(f"{_rel(path)}:{lineno}: {problem}")
    assert checked > 10, f"only {checked} imports found in the docs"
    assert not problems, f"{len(problems)} import(s) in the docs fail:\n" + "\n".join(problems)


def test_every_sdcore_config_in_the_docs_loads(checker: CliChecker, tmp_path: Path) -> None:
    problems: list[str] = []
    checked = 0
    methods = checker.obj.pm.methods()
    for path in doc_files():
        for block in fenced_blocks(path.read_text()):
            if block.lang == "toml" and config_method(block) is not None:
                checked += 1
                found = config_problems(block, methods, tmp_path / f"config{checked}.toml")
                problems += [f"{_rel(path)}:{block.line}: {p}" for p in found]
    assert checked >= 1, "no sdcore --config TOML found in the docs"
    assert not problems, f"{len(problems)} problem(s) in the docs' config files:\n" + "\n".join(problems)


# --- the reader and the checker catch what they should (fake markdown) -------------------------------

_FAKE = """\
Intro: `sdcore model convert --format bfl` writes BFL keys; `sdcore tag caption --clip` takes a folder.

```console
$ SDCORE_DEBUG=1 sdcore train lora --model m.safetensors --data ./d \\
    --rank 4 --no-such-option 3 --mixed-precision fp17 --optimizer=adamw
output line mentioning sdcore train lora --also-not-checked
$ sdcore trian lora && python -m sdcore model info x --jsn | head
```

```
sdcore tag wd14 DIR --model-dir WD [--mode skip|overwrite|sideways] [--bogus]
    [--tag-order model|confidence --max-tags N]
sdcore train db --model m --learning_rate 1e-6 --max_steps 5 --no-cache-latents --help
```
"""


def test_the_reader_joins_continuations_and_drops_output() -> None:
    blocks = fenced_blocks(_FAKE)
    assert [(b.lang, b.line) for b in blocks] == [("console", 3), ("", 10)]
    lines = command_lines(blocks[0])
    assert [n for n, _ in lines] == [4, 7]
    assert lines[0][1].endswith("--optimizer=adamw") and "output line" not in lines[0][1]
    assert sdcore_invocations(lines[1][1]) == [["trian", "lora"], ["model", "info", "x", "--jsn"]]
    synopsis = command_lines(blocks[1])
    assert len(synopsis) == 2 and synopsis[0][1].endswith("--max-tags N]")
    args = sdcore_invocations(synopsis[0][1])[0]
    assert args[:2] == ["tag", "wd14"], args
    assert args[-5:] == ["--bogus", "--tag-order", "model|confidence", "--max-tags", "N"], args


def test_the_checker_reports_every_problem(checker: CliChecker) -> None:
    found = []
    spans = inline_commands(_FAKE)
    assert spans == [(1, "sdcore model convert --format bfl"), (1, "sdcore tag caption --clip")]
    for lineno, span in spans:
        command, problems = checker.check(sdcore_invocations(span)[0], partial=True)
        found += [f"{lineno}: {command}: {p}" for p in problems]
    for block in fenced_blocks(_FAKE):
        for lineno, line in command_lines(block):
            for args in sdcore_invocations(line):
                command, problems = checker.check(args)
                found += [f"{lineno}: {command}: {p}" for p in problems]
    text = "\n".join(found)
    assert re.search(r"^4: sdcore train lora: No such option\W+--no-such-option", text, re.M), text
    assert "4: sdcore train lora: Invalid value for '--mixed-precision': 'fp17' is not one of" in text
    assert "--optimizer" not in text and "--rank" not in text
    assert "7: sdcore: " in text and "trian" in text
    assert re.search(r"^7: sdcore model info: No such option\W+--jsn", text, re.M), text
    assert "11: sdcore tag wd14: Invalid value for '--mode': 'sideways' is not one of" in text
    assert re.search(r"^11: sdcore tag wd14: No such option\W+--bogus", text, re.M), text
    assert text.count("\n11:") == 2, text  # tag-order's choices and N pass
    assert "13:" not in text  # an alias, kohya's names, underscores, a --no-x flag and --help all exist
    assert re.search(r"^1: sdcore model convert: No such option\W+--format", text, re.M), text
    assert "--clip" not in text  # an inline span may name an option without its value
    assert len(found) == 7, text


def test_python_and_toml_readers(checker: CliChecker, tmp_path: Path) -> None:
    doc = (
        "```python\nfrom sdcore.nowhere import (\n    a,  # comment\n    b,\n)\nimport os\nimport sdplugin_mydit\n"
        "from sdcore.train.config import load_options, no_such_name\nx = 1\n```\n\n"
        "Run it with `sdcore train ti --config ti.toml`:\n\n```toml\nlr = 'fast'\nvectros = 2\n```\n\n"
        "```toml\n# sdcore train lroa --config x.toml\nrank = 4\n```\n\n```toml\n[project]\nname = 'x'\n```\n"
    )
    python, config, typo, pyproject = fenced_blocks(doc)
    imports = import_statements(python)
    assert [n for n, _ in imports] == [2, 8] and imports[0][1] == "from sdcore.nowhere import ( a, b, )"
    assert "ModuleNotFoundError: No module named 'sdcore.nowhere'" in str(import_problem(imports[0][1], "x"))
    assert "cannot import name 'no_such_name'" in str(import_problem(imports[1][1], "x"))
    assert import_problem("from sdcore.train.config import load_options", "x") is None
    assert config_method(config) == "ti" and config_method(pyproject) is None
    methods = checker.obj.pm.methods()
    problems = " ".join(config_problems(config, methods, tmp_path / "c.toml"))
    assert "lr must be float" in problems and "'vectros' (did you mean" in problems, problems
    assert config_problems(typo, methods, tmp_path / "t.toml") == ["sdcore train lroa: no such training method"]
