"""A huge epoch count (a typo's ``--epochs 1000000000000``) with ``--max-steps``: the pre-flight planned every
epoch to count the run's steps (and the text-encoder stop's), and hung. Counting now stops where the run ends."""

from __future__ import annotations

from types import SimpleNamespace

from sdcore.train.data import TrainData, steps_text, total_steps_for
from sdcore.train.te_stop import stop_notes

HUGE = 10**12


class _Plans:
    """Four optimizer steps an epoch; more than a few hundred planned epochs is the old walk (a failure, not a hang)."""

    steps_in_epochs = getattr(TrainData, "steps_in_epochs", None)  # the counting under test

    def __init__(self) -> None:
        self.planned = 0

    def steps_in_epoch(self, epoch: int, gradient_accumulation: int) -> int:
        self.planned += 1
        assert self.planned < 500, "every epoch was planned"
        return 4


def test_the_run_steps_count_only_the_epochs_the_run_reaches():
    data = _Plans()
    options = SimpleNamespace(gradient_accumulation=1, epochs=HUGE, max_steps=10)
    assert total_steps_for(options, data) == (10, HUGE) and data.planned == 3
    assert steps_text(data, 10, HUGE, 1) == f"10 optimizer steps (--max-steps ends the run in epoch 3 of {HUGE})"
    assert steps_text(_Plans(), 8, 2, 1) == "8 optimizer steps over 2 epochs"  # unchanged where it ends with them
    assert steps_text(_Plans(), 4, 3, 1) == "4 optimizer steps (--max-steps ends the run in epoch 1 of 3)"


def test_a_text_encoder_stop_past_the_run_counts_only_its_steps():
    options = SimpleNamespace(gradient_accumulation=1, stop_text_encoder_after_epochs=HUGE)
    assert stop_notes(options, _Plans(), 10, None) == [
        f"--stop-text-encoder-after-epochs {HUGE}: the run has 10 steps, so the text encoder trains to the end"
    ]
    options.stop_text_encoder_after_epochs = 2
    assert stop_notes(options, _Plans(), 10, None) == [
        "--stop-text-encoder-after-epochs 2: the text encoder trains for steps 1-8 of 10, then it is frozen"
    ]
