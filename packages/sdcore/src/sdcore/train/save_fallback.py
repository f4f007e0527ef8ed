"""A save that fails must not lose the run.

When writing the result or the state fails at save time (permission denied, disk full, the output
folder removed mid-run), :func:`rescue` writes the trained result and its resumable state to a
fallback folder (in the state folder when that still works, else the system temp folder) and
returns a :class:`~sdcore.errors.SaveFailedError` whose one-line message names both places.

The session's save calls run inside :func:`guard`, which turns a user-fixable disk error into
:class:`SaveTargetError` so the run loop can tell "the save failed" from any other failure.

An error that stops one process of a multi-process run cannot save a state (that waits for every
process, and the others sit in the gradient all-reduce); :func:`save_alone` has that process write
the trained result itself, with no collective call, where the weights are replicated (DDP).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from ..errors import SaveFailedError, SdcoreError, describe_os_error, is_disk_error

log = logging.getLogger("sdcore.train")

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
    what = f"could not save {output}: {failure}"
    if not session.is_main:
        return SaveFailedError(what)
    problems: list[str] = []
    for folder in fallback_folders(session.state_root, output.stem or "result"):
        try:
            with guard():
                folder.mkdir(parents=True, exist_ok=True)
                result = write_result(session, folder / output.name, final=True)
                state = _rescue_state(session, folder)
        except SaveTargetError as exc:
            problems.append(f"{folder}: {exc}")
            continue
        resume = f"; its resumable state (for --resume) is {state}" if state is not None else ""
        return SaveFailedError(f"{what}. The trained result was written to {result}{resume}")
    return SaveFailedError(f"{what}; the fallback folders failed too ({'; '.join(problems)}): the result is lost")


def write_result(session: Any, path: Path, *, final: bool) -> Path:
    """Write ``session``'s trained result to ``path`` as a save at its position does (``method.save`` with
    the runtime's metadata); returns the path the method wrote.

    The weights are those every save writes (a schedule-free optimizer's evaluation weights, then the
    ``--ema`` average), the raw ones back after. Nothing here waits for or talks to other processes: the
    save info, the weight swaps and the methods' writers are local (checked by
    ``test_memory_watch.py``), so a process may call it alone.
    """
    info = session.checkpoints.save_info(session.bundle, path, session.position, session.run_facts(), final=final)
    with getattr(session, "result_weights", contextlib.nullcontext)():
        return Path(session.method.save(session.bundle, info))


def weights_sharding(accelerator: Any) -> str | None:
    """The engine under which each process holds only part of the trained weights (FSDP, DeepSpeed
    ZeRO-3, Megatron-LM, tensor parallelism), or ``None`` when every process holds all of them, equal after
    each optimizer step (one process, DDP, DeepSpeed ZeRO stages 0-2, which shard only the optimizer
    state and gradients and give every process the stepped parameters)."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind == "FSDP":
        return "FSDP"
    if kind == "MEGATRON_LM":
        return "Megatron-LM"
    if kind == "DEEPSPEED":
        stage = _zero_stage(getattr(accelerator.state, "deepspeed_plugin", None))
        if stage is None or stage >= 3:
            return "DeepSpeed ZeRO-3" if stage == 3 else "DeepSpeed (ZeRO stage unknown)"
    parallel = getattr(accelerator, "parallelism_config", None)
    if getattr(parallel, "tp_enabled", False) or getattr(parallel, "dp_shard_enabled", False):
        return "tensor or sharded data parallelism"
    return None


def _zero_stage(plugin: Any) -> int | None:
    """The ZeRO stage of accelerate's DeepSpeed plugin (its config file's, else the plugin's own field)."""
    if plugin is None:
        return None
    config = getattr(plugin, "deepspeed_config", None) or {}
    stage: Any = (config.get("zero_optimization") or {}).get("stage", getattr(plugin, "zero_stage", None))
    try:
        return int(stage)
    except (TypeError, ValueError):  # missing, or "auto"
        return None


def mixed_step(session: Any) -> str | None:
    """Where an error stopped a step part-way through updating the weights (some tensors stepped, others
    not), or ``None`` when the weights are those after the last finished step: a save from mixed weights
    would hold neither step's model."""
    fused = getattr(session, "fused", None)
    if fused is not None and fused.in_backward:
        return "during a fused backward pass: some weights had taken the step"
    if getattr(getattr(session, "placement", None), "in_optimizer_step", False):
        return "during the optimizer step: some weights may have taken the step and others not"
    return None


def mixed_message(why: str, where: str, saved: str = "no state was saved") -> str:
    """The one line for an error :func:`mixed_step` found (nothing is saved from mixed weights)."""
    return f"{why} {where}, so {saved}"


def save_alone(session: Any, why: str, *, alone: bool = True) -> str:
    """An error stopped this process of several: write the weights after the last finished step without
    any other process, and return the one line to print (this process's own: the others may be gone).
    ``alone`` off: a one-process run that failed without a resumable state (``--no-save-state``, a kohya run
    without ``save_state``, or a state that could not be written) writes them the same way, so that a failure
    never loses the steps trained, as a Ctrl-C does not.

    Saving a state needs every process and they may never come (they wait in the gradient all-reduce,
    or the launcher stops them), but under DDP each process holds the weights every other one does, so
    this one writes the result an intermediate save of this step would (its name and place, kohya's
    ``name-stepNNNNNNNN``; written atomically through a temporary name of this process's own, so several
    processes failing at once each replace the file whole with the same bytes). Under a sharding engine
    this process holds a shard only, or the error came part-way through a step (:func:`mixed_step`): nothing
    is written and the line says why. The file counts among the results ``--save-limit`` keeps as a Ctrl-C's
    does (:func:`_record_alone`).
    """
    from .checkpoints import intermediate_path

    step = session.position.step
    head = f"{why} in one of several processes" if alone else why
    resume = "resume from the last saved state with --resume" if session.options.save_state else None
    where = mixed_step(session)
    if where is not None:
        lost = resume or "the steps since the last save are lost"
        return f"{mixed_message(head, where, 'nothing was saved')}; {lost}"
    engine = weights_sharding(session.accelerator)
    if engine is not None:
        return (
            f"{head}: nothing saved now (under {engine} each process holds a shard of the weights, and saving "
            f"them or a state needs every process); {resume or 'the steps since the last save are lost'}"
        )
    path = intermediate_path(session.output, step=step)
    try:
        with guard():
            written = write_result(session, path, final=False)
    except Exception as exc:  # the original error is what ends the run
        # the method decides its file (TI: embeddings/<name>-<step>.pt beside the output), so ``path`` may not
        # be it: name the result by step and method, and the reason names the file the writer failed on
        what = f"the step-{step} result of {getattr(session.method, 'name', '') or 'the method'}"
        failed = f"{head}: the weights after step {step} ({what}) could not be written ({reason(exc)})"
        return failed + (f"; {resume}" if resume else "")
    _record_alone(session, written, step)
    option = getattr(session.method, "start_from_result", None)
    again = [f"continue from it with {option} {written}"] if option else []
    if resume:
        again.append(resume)
    if alone:
        return (
            f"{head}: this process wrote the weights after step {step} to {written} (a result, not a resumable "
            "state: saving one needs every process)" + (f"; {', or '.join(again)}" if again else "")
        )
    return f"{head}: the weights after step {step} are in {written} (no resumable state)" + (
        f"; {', or '.join(again)}" if again else ""
    )


def _record_alone(session: Any, written: Path, step: int) -> None:
    """Count the file :func:`save_alone` wrote among the results ``--save-limit`` keeps, as a Ctrl-C's is: named in
    the :data:`~.checkpoints.STOPPED_WEIGHTS` sidecar of the newest state (the last one this run saved, else the
    one it resumed from), so the run resumed from it prunes the file in turn. It is an intermediate-style result
    (``name-stepNNNNNNNN``, or the method's own step name), written after that state. Without a state
    (``--no-save-state``, or none saved yet) there is nothing to resume and nothing to record. Several processes
    failing at once each write the same file and note it; a note whose size and mtime are not the file's last
    writer's leaves the file alone on resume (never deleted, as any file the run cannot vouch for). A failure
    here is logged only: the error that stopped the run is what it ends with."""
    checkpoints = getattr(session, "checkpoints", None)
    if checkpoints is None:
        return
    state = checkpoints.last_state or checkpoints.resumed_from
    try:
        checkpoints.record_stopped(written, state, step)
    except Exception as exc:  # never hide the original error
        log.warning("--save-limit will not count %s (%s)", written, exc)


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


__all__ = [
    "SaveTargetError",
    "fallback_folders",
    "guard",
    "guarded",
    "mixed_message",
    "mixed_step",
    "rescue",
    "save_alone",
    "weights_sharding",
    "write_result",
]
