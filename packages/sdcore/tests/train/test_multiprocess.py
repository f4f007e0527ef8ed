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


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_two_processes_skip_to_the_initial_step_like_one(tmp_path):
    """--initial-step + --skip-until-initial-step: each process finds its own start in its share of
    the epoch plan, so two processes continue with the batches one process accumulating two does."""
    values = {"initial_step": 1, "skip_until_initial_step": True, "max_steps": 3, "flip": True}
    record = check_processes_equal_accumulation(
        ConvOutMethod, tmp_path, values, extra_pythonpath=[str(Path(__file__).parent)]
    )
    assert len(record["losses"]) == 2  # steps 2 and 3 trained; the counter ended at 3


def test_the_process_group_is_destroyed_before_the_interpreter_exits(tmp_path):
    """A Gloo group alive at interpreter exit aborts the process about half the time (SIGABRT,
    "terminate called without an active exception") after a run that saved everything: the
    accelerator of a run registers its destruction at exit. A handler registered before it runs
    after it (atexit is last-in first-out) and sees the group gone."""
    import subprocess
    import sys

    script = f"""
import atexit
import torch.distributed as dist
atexit.register(lambda: print("group alive at exit:", dist.is_initialized()))
dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
from sdcore.train.options import TrainOptions
from sdcore.train.placement import create_accelerator
create_accelerator(TrainOptions())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "group alive at exit: False"
