"""Where a run starts: kohya's ``--initial_step``, ``--initial_epoch`` and ``--skip_until_initial_step``.

kohya's ``train_network.py`` (and the SDXL/SD3/FLUX.1 network scripts built on it) lets a run start
at a step or an epoch, with or without ``--resume``. Its rules, which sdcore follows:

- The start step ``K``: ``--initial_step`` when given; else ``(initial_epoch - 1) x`` the optimizer
  steps per epoch when ``--initial_epoch`` is given; else (resuming) the state's step. Given
  ``initial_step``/``initial_epoch`` override the step of a ``--resume`` state (kohya warns).
- ``K > 0`` needs ``max_train_steps > K`` (kohya asserts; sdcore checks it in the pre-flight).
- With ``--skip_until_initial_step`` the batches of the first ``K`` steps are drawn and discarded,
  so the run continues with the batches an uninterrupted run would train at step ``K + 1``, and the
  step counter (saves ``-stepNNNNNNNN``, samples, ``ss_steps``) starts at ``K``.
- Without it only the epoch moves: the run starts at the first batch of epoch ``K // steps per
  epoch`` (kohya's ``epoch_to_start``) with the step counter at 0, and ends when the epochs run out
  (kohya's ``num_train_epochs``) or the counter reaches the step limit.
- Neither moves the LR schedule: it starts from its beginning unless ``--resume`` restored it
  (kohya's help: "initial_epoch/step doesn't affect to lr scheduler").

Where sdcore differs, on purpose (kohya's own code contradicts its comments there):

- kohya multiplies ``K`` by the gradient accumulation before dividing by the *optimizer* steps per
  epoch and sets the counter to what is left of ``K`` inside its start epoch; sdcore finds the start
  from the epoch plans and keeps the counter at ``K`` (what kohya does when ``K`` is inside the first
  epoch without accumulation: ``global_step = initial_step``).
- kohya's ``initial_epoch`` divides the (already per-process) batch count by the process count once
  more; sdcore uses the steps per epoch of this run (the same on one process).
- sdcore's plain ``--resume`` continues exactly where the state stopped (batch, counter, data);
  kohya's does so only with ``--skip_until_initial_step``.

Skipping is cheap here: the data order and every random draw are functions of ``(seed, epoch,
sample)`` (:mod:`.data`, :mod:`.noise`), so the start position is computed from the epoch plans
without loading, encoding or drawing anything for the skipped batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .state import TrainPosition

if TYPE_CHECKING:
    from .data import TrainData
    from .options import TrainOptions


@dataclass(frozen=True)
class StartPoint:
    """Where a run with ``--initial-step``/``--initial-epoch`` (or a skipping resume) begins."""

    position: TrainPosition
    #: kohya's initial step ``K`` (optimizer steps)
    initial_step: int
    #: whether the batches before ``K`` were skipped (the counter starts at ``K``)
    skipped: bool
    #: the run's epoch limit (kohya's ``num_train_epochs`` when the counter restarts at 0)
    max_epochs: int | None
    message: str


def initial_option_problems(o: TrainOptions) -> list[str]:
    """Bad values of the three options (the step limit is checked once the data is known)."""
    problems = []
    if o.initial_step is not None and o.initial_step < 0:
        problems.append(f"--initial-step must be 0 or more (0 = the first step, as not given), got {o.initial_step}")
    if o.initial_epoch is not None and o.initial_epoch < 1:
        problems.append(
            f"--initial-epoch must be at least 1 (1 = the first epoch, as not given), got {o.initial_epoch}"
        )
    return problems


def initial_notes(o: TrainOptions) -> list[str]:
    """The pre-flight's notes where kohya's meaning surprises (shown by ``--dry-run`` and at the start)."""
    given = bool(o.initial_step) or (o.initial_epoch is not None and o.initial_epoch > 1)
    notes = []
    if given and not o.resume:
        notes.append(
            "--initial-step/--initial-epoch: the LR schedule starts from its beginning; only --resume moves it (kohya)"
        )
    if given and not o.skip_until_initial_step:
        notes.append(
            "--initial-step/--initial-epoch without --skip-until-initial-step: only the start epoch moves; steps "
            "(save and sample names, ss_steps) count from 0 and the run ends with its epochs (kohya)"
        )
    if o.skip_until_initial_step and not given and not o.resume:
        notes.append("--skip-until-initial-step without --initial-step/--initial-epoch/--resume: nothing to skip")
    return notes


def steps_per_epoch(data: TrainData, gradient_accumulation: int) -> int:
    """Optimizer steps of the first epoch (kohya: ``ceil(len(train_dataloader) / accumulation)``)."""
    return data.steps_in_epoch(0, gradient_accumulation)


def requested_step(o: TrainOptions, per_epoch: int) -> int | None:
    """kohya's ``initial_step`` from the options: ``--initial-step``, else ``(E - 1) x steps per epoch``
    from ``--initial-epoch``; ``None`` when neither is given (a resume then keeps its state's step).

    Step 0 and epoch 1 are "the same as not specifying" (kohya's help for both options; its code
    would also drop a resumed state's step then, which sdcore does not: the state continues exactly).
    """
    step = 0
    if o.initial_step:
        step = o.initial_step
    elif o.initial_epoch is not None:
        step = (o.initial_epoch - 1) * per_epoch
    return step if step > 0 else None


def step_limit_problem(o: TrainOptions, data: TrainData, total_steps: int) -> str | None:
    """kohya's ``assert max_train_steps > initial_step`` as one pre-flight line."""
    step = requested_step(o, steps_per_epoch(data, o.gradient_accumulation))
    if step is None or step < total_steps:
        return None
    given = f"--initial-step {o.initial_step}" if o.initial_step else f"--initial-epoch {o.initial_epoch}"
    at = "" if o.initial_step else f" (step {step})"
    return (
        f"{given}{at} must be below the run's {total_steps} steps (--max-steps/--epochs): there would be "
        "nothing left to train (kohya: max_train_steps must be greater than the initial step)"
    )


def position_after(data: TrainData, steps: int, gradient_accumulation: int) -> TrainPosition:
    """The position of an uninterrupted run after ``steps`` optimizer steps, from the epoch plans alone
    (their order, never their images): the epoch, and the micro-batch inside it."""
    accum = max(1, gradient_accumulation)
    epoch, left = 0, steps
    while True:
        per_epoch = data.steps_in_epoch(epoch, accum)
        if per_epoch < 1:
            raise ConfigError("an epoch has no batches (dataset empty for this process)")
        if left < per_epoch:
            return TrainPosition(step=steps, epoch=epoch, batch=left * accum)
        left -= per_epoch
        epoch += 1


def start_point(
    o: TrainOptions,
    data: TrainData,
    *,
    total_steps: int,
    max_epochs: int | None,
    resumed: TrainPosition | None = None,
) -> StartPoint | None:
    """Where the run starts, or ``None`` when it starts as it would anyway (step 0, or exactly where the
    ``--resume`` state stopped)."""
    per_epoch = steps_per_epoch(data, o.gradient_accumulation)
    step = requested_step(o, per_epoch)
    if step is None:
        return None  # sdcore's resume already continues exactly (kohya's resume + skip)
    if step >= total_steps:
        raise ConfigError(str(step_limit_problem(o, data, total_steps)))
    resumed_note = (
        f"; the resumed state's step {resumed.step} is ignored, its LR schedule continues"
        if resumed is not None
        else ""
    )
    if o.skip_until_initial_step:
        position = position_after(data, step, o.gradient_accumulation)
        message = (
            f"starting at step {step} (epoch {position.epoch + 1}, batch {position.batch + 1}): the batches "
            f"before it are skipped without loading them{resumed_note}"
        )
        return StartPoint(position, step, True, max_epochs, message)
    epoch = step // per_epoch
    limit = max_epochs if max_epochs is not None else math.ceil(total_steps / per_epoch)
    message = (
        f"starting at epoch {epoch + 1} from its first batch with the step counter at 0 (kohya's "
        f"--initial_step/--initial_epoch without --skip_until_initial_step); training ends after epoch {limit} "
        f"or step {total_steps}{resumed_note}"
    )
    return StartPoint(TrainPosition(step=0, epoch=epoch, batch=0), step, False, limit, message)
