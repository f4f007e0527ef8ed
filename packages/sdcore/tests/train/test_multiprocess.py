"""Two processes (torchrun, gloo on CPU) train exactly like one process accumulating two micro-batches,
with the gradients synced by accelerate's prepared (DDP) model."""

from pathlib import Path

import pytest
from runtime_methods import ConvOutMethod, FailsOnRank1AtStep3
from sdcore.testing.distributed import check_processes_equal_accumulation, launch_workers, torchrun_command


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


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_a_process_failing_alone_writes_the_weights_of_the_last_step(tmp_path):
    """Rank 1 raises in step 3 while rank 0 goes into the step's gradient all-reduce: the run ends (no
    hang waiting for a state save), and rank 1 has written the weights after step 2 where the step-2
    intermediate save goes, equal to one process accumulating two micro-batches after its step 2."""
    import torch
    from safetensors.torch import load_file
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train

    values = {"batch_size": 1, "lr": 1e-2, "max_steps": 4}
    single = contract_options(ConvOutMethod, tmp_path, {**values, "gradient_accumulation": 2, "save_every": 2},
                              tag="single")  # fmt: skip
    train(ConvOutMethod(single))
    want = load_file(str(tmp_path / "single" / "result-step00000002.safetensors"))
    multi = contract_options(FailsOnRank1AtStep3, tmp_path, values, tag="multi")
    proc = launch_workers(
        FailsOnRank1AtStep3, multi, tmp_path / "unused.safetensors", extra_pythonpath=[str(Path(__file__).parent)],
        timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "injected failure on rank 1 in step 3" in proc.stderr
    written = tmp_path / "multi" / "result-step00000002.safetensors"
    assert f"error in one of several processes: this process wrote the weights after step 2 to {written}" in (
        proc.stderr
    ), proc.stderr[-3000:]
    got = load_file(str(written))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    assert not (tmp_path / "multi" / "result.safetensors").exists()  # the run did not finish


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
