"""Stopping the text encoder mid-run: when it stops, decided once for every method that trains one.

kohya's DreamBooth (``train_db.py --stop_text_encoder_training N``) trains the text encoder for the first
N optimizer steps; OneTrainer's stock SD1.5/SD2.1 presets stop it after 30 of 100 epochs
(``text_encoder.stop_training_after`` with the EPOCH unit: ``TimedActionMixin.single_action_elapsed``
trains epochs ``0..N-1``). Both forms live here:

- ``--stop-text-encoder-at N``: steps ``1..N`` train the text encoder, it is frozen from step ``N + 1`` on.
- ``--stop-text-encoder-after-epochs N``: epochs ``1..N`` (OneTrainer's ``0..N-1``) train it, it is frozen
  from the first step of the next epoch on.

The runtime (:mod:`.loop`) asks :meth:`TextEncoderStop.due` before each optimizer step and, once it is
due, calls the method's :meth:`~sdcore.train.method.TrainingMethod.stop_text_encoder`, which only freezes
its own parameters (``requires_grad`` False, ``grad`` None: torch optimizers skip parameters without a
gradient, weight decay included). The rule reads the run's position, so a resumed run past the stop point
freezes before its first step, exactly as the uninterrupted run was frozen then; the LR schedule of the
other parameters is untouched.

A method offers the stop by mixing :class:`TextEncoderStopOptions` into its options (LoRA and
DreamBooth do) and implementing ``stop_text_encoder``; methods without these options never see a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..options import option

if TYPE_CHECKING:
    from .data import TrainData
    from .method import TrainingMethod
    from .options import TrainOptions
    from .state import TrainPosition

STEP_FLAG = "--stop-text-encoder-at"
EPOCH_FLAG = "--stop-text-encoder-after-epochs"


@dataclass
class TextEncoderStopOptions:
    """The two stop options, mixed into a method's options (``class LoraOptions(TrainOptions,
    TextEncoderStopOptions)``), so that every method that offers the stop names it the same way."""

    stop_text_encoder_at: int | None = option(
        None,
        "Train the text encoder(s) for the first N optimizer steps only, then freeze them (kohya's "
        "--stop_text_encoder_training; the rest keeps training with its own LR schedule).",
        group="training",
        minimum=1,
    )
    stop_text_encoder_after_epochs: int | None = option(
        None,
        "Train the text encoder(s) for the first N epochs only, frozen from the first step of epoch N+1 "
        "(OneTrainer's text_encoder.stop_training_after in EPOCH).",
        group="training",
        minimum=1,
    )


@dataclass(frozen=True)
class TextEncoderStop:
    """The run's stop point: ``unit`` "step" or "epoch" and ``after`` (the count that still trains)."""

    unit: str
    after: int

    @staticmethod
    def from_options(options: Any) -> TextEncoderStop | None:
        """The stop the options ask for, or None (options without the stop fields: never)."""
        step = getattr(options, "stop_text_encoder_at", None)
        if step is not None:
            return TextEncoderStop("step", int(step))
        epochs = getattr(options, "stop_text_encoder_after_epochs", None)
        if epochs is not None:
            return TextEncoderStop("epoch", int(epochs))
        return None

    def due(self, position: TrainPosition) -> bool:
        """True when the next optimizer step must run with the text encoder frozen: ``after`` steps are
        done (the step counter), or ``after`` epochs are (the epoch counter, 0-based: epoch ``after`` is
        the first one without it)."""
        done = position.step if self.unit == "step" else position.epoch
        return done >= self.after

    def first_frozen_step(self, data: TrainData, gradient_accumulation: int, limit: int | None = None) -> int:
        """The number of steps that train the text encoder in a run from the start: ``after`` for the
        step form, the steps of the first ``after`` epochs for the epoch form (so step ``result + 1``
        is the first one frozen); counting stops at ``limit`` (the run's steps: the stop is past its end)."""
        if self.unit == "step":
            return self.after
        return data.steps_in_epochs(self.after, gradient_accumulation, limit=limit)

    def flag(self) -> str:
        return f"{STEP_FLAG if self.unit == 'step' else EPOCH_FLAG} {self.after}"


def stop_option_problems(options: TrainOptions, method: TrainingMethod[Any] | None = None) -> list[str]:
    """Pre-flight problems of the stop options, one line each: a count below 1, both forms at once, a stop
    for a run that does not train the text encoder, and DDP's static graph (the set of parameters with
    gradients changes at the stop)."""
    step = getattr(options, "stop_text_encoder_at", None)
    epochs = getattr(options, "stop_text_encoder_after_epochs", None)
    given = [(flag, value) for flag, value in ((STEP_FLAG, step), (EPOCH_FLAG, epochs)) if value is not None]
    if not given:
        return []
    problems = [f"{flag} must be at least 1 when given, got {value}" for flag, value in given if value < 1]
    flags = " and ".join(flag for flag, _ in given)
    if len(given) > 1:
        problems.append(f"{flags}: give the text-encoder stop as steps or as epochs, not both")
    if method is not None and not method.capabilities().trains_text_encoder:
        verb = "needs" if len(given) == 1 else "need"
        problems.append(f"{flags} {verb} a run that trains the text encoder (--train-text-encoder)")
    if getattr(options, "ddp_static_graph", False):
        problems.append(
            f"{flags} with --ddp-static-graph: the text encoder's parameters stop getting gradients at the stop, "
            "which a static DDP graph does not allow"
        )
    return problems


def stop_notes(options: TrainOptions, data: TrainData, total_steps: int, max_epochs: int | None) -> list[str]:
    """What the pre-flight says about the stop: where it falls, or that the run ends before it."""
    stop = TextEncoderStop.from_options(options)
    if stop is None or stop.after < 1:
        return []
    trained = stop.first_frozen_step(data, options.gradient_accumulation, limit=total_steps)
    if stop.unit == "epoch" and max_epochs is not None and stop.after >= max_epochs:
        return [f"{stop.flag()}: the run has {max_epochs} epoch(s), so the text encoder trains to the end"]
    if trained >= total_steps:
        return [f"{stop.flag()}: the run has {total_steps} steps, so the text encoder trains to the end"]
    return [f"{stop.flag()}: the text encoder trains for steps 1-{trained} of {total_steps}, then it is frozen"]


__all__ = [
    "EPOCH_FLAG",
    "STEP_FLAG",
    "TextEncoderStop",
    "TextEncoderStopOptions",
    "stop_notes",
    "stop_option_problems",
]
