"""A save that fails must not lose the run.

When writing the result or the state fails at save time (permission denied, disk full, the output
folder removed mid-run), :func:`rescue` writes the trained result and its resumable state to a
fallback folder (in the state folder when that still works, else the system temp folder) and
returns a :class:`~sdcore.errors.SaveFailedError` whose one-line message names both places.

The session's save calls run inside :func:`guard`, which turns a user-fixable disk error into
:class:`SaveTargetError` so the run loop can tell "the save failed" from any other failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from ..errors import SaveFailedError, SdcoreError, describe_os_error, is_disk_error

#: the folder made beside the state folder (or in the temp folder) for rescued files
RESCUE_PREFIX = "sdcore-rescue"


class SaveTargetError(SdcoreError):
    """Writing a save failed for a reason outside sdcore (permissions, disk full, folder gone)."""

    def __init__(self, original: BaseException) -> None:
        self.original = original
        super().__init__(reason(original))


def reason(exc: BaseException) -> str:
    """The user-facing reason of a failed write: the OSError's text, else the error's own line."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, SdcoreError) and not isinstance(current, SaveTargetError):
            return str(current)
        if isinstance(current, OSError):
            return describe_os_error(current)
        current = current.__cause__ or current.__context__
    return str(exc)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn a permission / disk-full / missing-folder error raised while saving into :class:`SaveTargetError`."""
    try:
        yield
    except SaveTargetError:
        raise
    except (OSError, SdcoreError) as exc:
        if is_disk_error(exc):
            raise SaveTargetError(exc) from exc
        raise


F = TypeVar("F", bound=Callable[..., Any])


def guarded(func: F) -> F:
    """``func`` run inside :func:`guard` (a decorator for the session's save methods)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with guard():
            return func(*args, **kwargs)

    return cast(F, wrapper)


def fallback_folders(state_root: Path, stem: str) -> list[Path]:
    """Where to rescue to, in order: inside the state folder (when it exists: a failure may concern
    only the result file), then the system temp folder. A removed output folder is never recreated."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{RESCUE_PREFIX}-{stem}-{stamp}-{os.getpid()}"
    out = []
    if state_root.is_dir():
        out.append(state_root / name)
    out.append(Path(tempfile.gettempdir()) / name)
    return out


def rescue(session: Any, failure: SaveTargetError) -> SaveFailedError:
    """Write ``session``'s result and state to a fallback folder; return the error to raise.

    ``session`` is a :class:`~sdcore.train.loop.TrainSession` after training (or during a save).
    Only the main process writes the result; the state needs every process (it is skipped in
    multi-process runs, where the others may already have stopped).
    """
    output: Path = session.output
    checkpoints = session.checkpoints
    what = f"could not save {output}: {failure}"
    if not session.is_main:
        return SaveFailedError(what)
    problems: list[str] = []
    for folder in fallback_folders(session.state_root, output.stem or "result"):
        try:
            with guard():
                folder.mkdir(parents=True, exist_ok=True)
                info = checkpoints.save_info(
                    session.bundle, folder / output.name, session.position, session.run_facts(), final=True
                )
                # the weights every save writes: a schedule-free optimizer's evaluation weights, the --ema average
                with getattr(session, "result_weights", contextlib.nullcontext)():
                    result = Path(session.method.save(session.bundle, info))
                state = _rescue_state(session, folder)
        except SaveTargetError as exc:
            problems.append(f"{folder}: {exc}")
            continue
        resume = f"; its resumable state (for --resume) is {state}" if state is not None else ""
        return SaveFailedError(f"{what}. The trained result was written to {result}{resume}")
    return SaveFailedError(f"{what}; the fallback folders failed too ({'; '.join(problems)}): the result is lost")


def _rescue_state(session: Any, folder: Path) -> Path | None:
    if not session.options.save_state or session.accelerator.num_processes > 1:
        return None
    checkpoints = session.checkpoints
    saved_root = checkpoints.state_root
    checkpoints.state_root = folder / saved_root.name
    try:
        return Path(session.save_state())
    finally:
        checkpoints.state_root = saved_root


__all__ = ["SaveTargetError", "fallback_folders", "guard", "guarded", "rescue"]
