"""Two processes (torchrun, gloo on CPU) train exactly like one process accumulating two micro-batches,
with the gradients synced by accelerate's prepared (DDP) model."""

from pathlib import Path

import pytest
from runtime_methods import ConvOutMethod
from sdcore.testing.distributed import check_processes_equal_accumulation, torchrun_command


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_two_processes_equal_gradient_accumulation(tmp_path):
    values = {"flip": True, "shuffle_caption": True}
    check_processes_equal_accumulation(ConvOutMethod, tmp_path, values, extra_pythonpath=[str(Path(__file__).parent)])


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_two_processes_with_a_text_encoder_part_and_clipping(tmp_path):
    """Parameters in two models (UNet and text encoder) and gradient clipping after the all-reduce."""
    values = {"train_text_norm": True, "max_grad_norm": 0.01, "max_steps": 3}
    check_processes_equal_accumulation(ConvOutMethod, tmp_path, values, extra_pythonpath=[str(Path(__file__).parent)])


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_two_processes_share_the_validation(tmp_path):
    """The held-out batches split over the processes give the single process's validation loss."""
    values = {"validation_split": 0.5, "validate_every_n_steps": 2, "max_steps": 3}
    record = check_processes_equal_accumulation(
        ConvOutMethod, tmp_path, values, extra_pythonpath=[str(Path(__file__).parent)]
    )
    assert record["validation_losses"]
