"""How the command line prints its warnings, its own and those sent through :mod:`logging`: one form for both.

sdcore's modules (and its plugins') warn through ``logging.getLogger(...)`` so that a program importing them
as a library decides where the records go. Under the ``sdcore`` command those records used to reach
Python's last-resort handler: printed bare, with no ``warning:`` before them, unlike the CLI's own warnings,
and once per process under ``accelerate launch``. :func:`cli_logging`, entered by the root command only, puts
one handler on the sdcore and plugin loggers for the command's duration: a warning prints as
``warning: ...`` (:func:`warning_line`, the function the CLI's own warnings use too, so the two cannot
drift), an error as ``error: ...``, once: processes other than the main one keep their errors only, and a
warning said again in the same command is not repeated. A Python warning of a class sdcore or a plugin defines
(sdplugin_lora's ``LoraWarning``, a documented API for library users) prints the same way; a plain ``UserWarning``
and other libraries' warnings keep Python's form, so our modules log their notes instead.
Importing sdcore adds no handler anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

import click

WARNING_PREFIX = "warning: "
ERROR_PREFIX = "error: "


def warning_line(message: str) -> str:
    """``message`` as the CLI prints a warning (one line, ``warning: `` first)."""
    return f"{WARNING_PREFIX}{message}"


def error_line(message: str) -> str:
    """``message`` as the CLI prints an error the command goes on after (a logged one; the error that ends a
    command prints as click's ``Error: ...``)."""
    return f"{ERROR_PREFIX}{message}"


def warn(message: str) -> None:
    """Print ``message`` on stderr as a CLI warning."""
    click.echo(warning_line(message), err=True)


def launcher_rank() -> int:
    """This process's place among the processes a launcher started (``RANK``, else ``LOCAL_RANK``, as
    ``accelerate launch``/``torchrun`` set them; 0 when alone): the main process is 0. Read from the
    environment, so it is known before any accelerator exists (the pre-flight's view)."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


def process_rank() -> int:
    """The running process's index, 0 for the main one: the launcher's (:func:`launcher_rank`), else accelerate's
    once its state exists (a launcher such as ``mpirun`` sets no ``RANK``). A process either calls other than the
    main one is not the main one: ``torchrun`` on a CPU with no process group leaves accelerate's index at 0
    in every process, and each would print the same warnings. Never imports accelerate (and so torch) itself."""
    rank = launcher_rank()
    if rank:
        return rank
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "PartialState", None), "_shared_state", None)
    if isinstance(shared, dict) and isinstance(shared.get("process_index"), int):
        return int(shared["process_index"])
    return 0


def record_line(record: logging.LogRecord, *, detail: bool = False, rank: int = 0) -> str:
    """A log record as the CLI prints it: ``warning: MESSAGE`` / ``error: MESSAGE``; lower levels (printed only
    under ``SDCORE_DEBUG``) as ``info: ``/``debug: ``. ``detail`` (``SDCORE_DEBUG``) adds the logger, the
    source line and any traceback; ``rank`` other than 0 names the process the line comes from."""
    message = record.getMessage()
    if rank:
        message = f"(process {rank}) {message}"
    if record.levelno >= logging.ERROR:
        line = error_line(message)
    elif record.levelno >= logging.WARNING:
        line = warning_line(message)
    else:
        line = f"{record.levelname.lower()}: {message}"
    if detail:
        line = f"{line} [{record.name}, {record.pathname}:{record.lineno}]"
        if record.exc_info:
            line = f"{line}\n{logging.Formatter().formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{record.stack_info}"
    return line


class CliLogHandler(logging.Handler):
    """Prints records on the current stderr (click's, so a test's CliRunner sees them) as :func:`record_line`.

    On a process other than the main one, records below ERROR are dropped: every process of a run logs the
    same warnings, and the user should read each once. A warning printed already in this command is not
    printed again (the sample prompts are read again at every render, with their warnings). ``detail``
    (``SDCORE_DEBUG``) keeps every record of every process, with its logger and source line."""

    def __init__(self, *, detail: bool = False) -> None:
        super().__init__(logging.DEBUG if detail else logging.WARNING)
        self.detail = detail
        self.warned: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            rank = process_rank()
            if rank != 0 and record.levelno < logging.ERROR and not self.detail:
                return
            line = record_line(record, detail=self.detail, rank=rank)
            if record.levelno < logging.ERROR and not self.detail:
                if line in self.warned:
                    return
                self.warned.add(line)
            click.echo(line, err=True)
        except Exception:
            self.handleError(record)


def plugin_namespaces(plugins: Iterable[object]) -> list[str]:
    """The top-level package names of ``plugins`` (modules by their name, classes by their own module, other
    objects by their class's): the logger namespaces plugins log under (``sdplugin_lora.apply`` -> ``sdplugin_lora``).
    A class registered as a plugin is a ``type``, whose class lives in ``builtins``: its own ``__module__`` tells."""
    names: set[str] = set()
    for plugin in plugins:
        if isinstance(plugin, types.ModuleType):
            module = getattr(plugin, "__name__", None)
        elif isinstance(plugin, type):
            module = plugin.__module__
        else:
            module = type(plugin).__module__
        if isinstance(module, str) and module and module != "builtins":
            names.add(module.split(".")[0])
    return sorted(names)


def _show_own_warnings(namespaces: Iterable[str]) -> Callable[..., None]:
    """A :func:`warnings.showwarning` that logs the warnings whose category a package of ``namespaces`` defines
    (sdplugin_lora's documented ``LoraWarning``) as a record of the category's module, where :func:`cli_logging`'s
    handler prints it, and shows every other warning as before (``previous``).

    Chosen by category, not by the file a warning names: a library's warning (torch's, diffusers') may name our
    line through its ``stacklevel`` and is the library's to word; it keeps Python's form. Not
    :func:`logging.captureWarnings`: it sends every warning to the ``py.warnings`` logger, which without a handler
    of its own gets a ``NullHandler``, so every library warning would vanish under the CLI (or, routed to this
    handler, lose the file and line that tell where it comes from)."""
    owners = tuple(dict.fromkeys(namespaces))
    previous = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        module = getattr(category, "__module__", "") or ""
        if file is None and module.split(".")[0] in owners:
            logger = logging.getLogger(module)
            if logger.isEnabledFor(logging.WARNING):  # the warning's own place, for SDCORE_DEBUG's detail
                logger.handle(logger.makeRecord(module, logging.WARNING, filename, lineno, str(message), (), None))
            return
        previous(message, category, filename, lineno, file, line)

    return show


@contextlib.contextmanager
def cli_logging(namespaces: Iterable[str] = ()) -> Iterator[CliLogHandler]:
    """Print the records of the ``sdcore`` logger and of ``namespaces`` (the plugins' packages) as the CLI's
    warnings while inside; the loggers are as they were after. Records still propagate (to pytest's caplog, to
    a handler a caller set on the root logger); Python's last-resort handler no longer prints them bare, as a
    handler now takes them. ``SDCORE_DEBUG`` prints every level with its source, on every process.

    A Python warning of a category these packages define (a documented one, such as sdplugin_lora's
    ``LoraWarning``, kept for library users) prints in the same form, once, instead of Python's two-line
    ``path:line: LoraWarning: ...`` (:func:`_show_own_warnings`); other libraries' warnings are left as they are."""
    from .errors import debug_enabled

    detail = debug_enabled()
    handler = CliLogHandler(detail=detail)
    names = list(dict.fromkeys(["sdcore", *namespaces]))
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if detail and logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(logging.DEBUG)
    previous = warnings.showwarning
    show = warnings.showwarning = _show_own_warnings(names)
    try:
        yield handler
    finally:
        if warnings.showwarning is show:  # one set inside since (a test's) is left to whoever set it
            warnings.showwarning = previous
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


__all__ = [
    "ERROR_PREFIX",
    "WARNING_PREFIX",
    "CliLogHandler",
    "cli_logging",
    "error_line",
    "launcher_rank",
    "plugin_namespaces",
    "process_rank",
    "record_line",
    "warn",
    "warning_line",
]
