"""The one exception family sdcore raises on purpose.

Every error a user can cause (bad file, bad option, wrong model family) is a subclass of
:class:`SdcoreError`, so the CLI can print it as one line and exit non-zero without a traceback,
and library users can catch exactly our errors.
"""

from __future__ import annotations


class SdcoreError(Exception):
    """Base class for errors caused by input, configuration or files (not by bugs)."""

    #: the CLI's exit status for it: 2 for problems found before any model loads (as click's usage errors)
    exit_code: int = 1


class ConfigError(SdcoreError):
    """An option or config file is invalid or contradicts another option. ``problems`` holds one line
    per problem, for a CLI that prints them one per line (the message joins them)."""

    def __init__(self, message: str = "", problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


class ModelFormatError(SdcoreError):
    """A model file is unreadable, truncated, unsafe or of an unknown layout."""


class UnsafeFileError(ModelFormatError):
    """A pickle-based file asked to run code or build objects outside the allow-list."""


class DataError(SdcoreError):
    """A dataset folder or dataset config cannot be used."""


class NetworkMismatchError(SdcoreError):
    """A network file (LoRA, embedding, hypernetwork) does not fit the loaded model."""


class PluginError(SdcoreError):
    """A plugin failed to load, registered something invalid, or clashes with another plugin."""


class SaveFailedError(SdcoreError):
    """Writing a result or state failed (permissions, full disk, folder removed); the message names
    where the trained weights were rescued to, when they could be."""


#: errno values of OSErrors a user causes (and can fix) rather than bugs: shown as one line
_EXPECTED_ERRNOS = frozenset(
    getattr(__import__("errno"), name)
    for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "ENOTDIR", "EISDIR", "EEXIST", "EFBIG")
    if hasattr(__import__("errno"), name)
)


def is_disk_error(exc: BaseException) -> bool:
    """An OSError a user can fix (permission denied, disk full, missing file or folder), alone or
    as the cause of one of our errors."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno in _EXPECTED_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def describe_os_error(exc: OSError) -> str:
    """``<file>: <reason>`` for an OSError, plus a hint for the usual causes."""
    import errno

    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: " (the disk is full: free space or choose another --output)",
        errno.EACCES: " (no permission: choose a folder you can write, or fix its permissions)",
        errno.EROFS: " (read-only file system: choose another folder)",
    }.get(exc.errno or 0, "")
    return f"{where}: {reason}{hint}" if where else f"{reason}{hint}"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out: torch's ``OutOfMemoryError`` (CUDA), or the
    RuntimeErrors the CPU and MPS allocators raise. Never imports torch (an error from torch means it is
    imported already)."""
    import sys

    torch = sys.modules.get("torch")
    oom_class = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_class is not None and isinstance(exc, oom_class):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate memory" in text
    )


def describe_out_of_memory(exc: BaseException) -> str:
    """One line for an out-of-memory outside training (generation, tagging, conversion): the allocator's
    first sentence and what lowers the need. Training says more (``sdcore.train.memory_watch``)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cut = first.find(". ", first.find("Tried to allocate") + 1 if "Tried to allocate" in first else 0)
    reason = first[: cut + 1] if 0 < cut < 200 else first[:200]
    return (
        f"out of memory ({reason.rstrip('.')}): use a smaller batch or image size, fewer images at once, "
        "or another device"
    )


def expected_error_message(exc: BaseException) -> str | None:
    """The one line to print for an expected error (ours, a user-fixable OSError, an allocator that ran
    out of memory); ``None`` for a bug.

    With ``SDCORE_DEBUG=1`` set, callers re-raise instead so the traceback shows.
    """
    if isinstance(exc, SdcoreError):
        return str(exc)
    if isinstance(exc, OSError) and is_disk_error(exc):
        return describe_os_error(exc)
    if is_out_of_memory(exc):
        return describe_out_of_memory(exc)
    return None


def debug_enabled() -> bool:
    """``SDCORE_DEBUG=1``: show tracebacks of expected errors too."""
    import os

    return os.environ.get("SDCORE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
