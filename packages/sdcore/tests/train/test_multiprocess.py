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


_STOP_WORKER = """
import os, sys, threading
sys.path.insert(0, {tests!r})
from runtime_methods import ConvOutMethod
from sdcore.testing.contract import contract_options, plugin_manager_with
from sdcore.train import TrainingStopped, train
from pathlib import Path

stop = threading.Event()

class Ui:  # only rank 1's app presses "cancel", once step 2 is reported
    def sdcore_on_train_step(self, context, step, logs):
        if step == 2 and os.environ["RANK"] == "1":
            stop.set()

options = contract_options(ConvOutMethod, Path({tmp!r}), {{"batch_size": 1, "max_steps": 5}}, tag="multi")
try:
    train(ConvOutMethod(options), plugin_manager=plugin_manager_with(Ui()), stop=stop)
except TrainingStopped as stopped:  # the app handles it and ends well
    print(f"rank {{os.environ['RANK']}} stopped after {{stopped.step}} steps; state {{stopped.state}}", flush=True)
    print(f"rank {{os.environ['RANK']}} weights {{stopped.weights}}", flush=True)
"""


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_a_stop_set_in_one_process_stops_every_process_together(tmp_path):
    """``train(stop=flag)`` under ``accelerate launch``/torchrun: the flag one process sees is shared before each
    step, so every process stops before the same step and the state is saved together; a flag read per process
    left the others in the next step's gradient all-reduce, waiting for a peer that had gone (a hang)."""
    import os
    import subprocess

    script = tmp_path / "app.py"
    script.write_text(_STOP_WORKER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path)), encoding="utf-8")
    command = torchrun_command()
    assert command is not None
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [*command, "--standalone", "--nproc_per_node", "2", str(script)],
            env=env, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the processes hung after the stop: {str(exc.stderr)[-2000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    state = tmp_path / "multi" / "result-state" / "step-00000002"
    for rank in (0, 1):
        assert f"rank {rank} stopped after 2 steps; state {state}" in done.stdout, done.stdout + done.stderr[-2000:]
    assert (state / "train_state.json").exists()
    assert not (tmp_path / "multi" / "result.safetensors").exists()
    # the main process writes the weights of step 2 beside the state (the other one waits for it, writes nothing)
    weights = tmp_path / "multi" / "result-step00000002.safetensors"
    assert f"rank 0 weights {weights}" in done.stdout and "rank 1 weights None" in done.stdout, done.stdout
    import torch
    from safetensors.torch import load_file

    saved, trained = load_file(str(weights)), load_file(str(state / "trainable.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k].float()) for k in saved)


_CTRL_C_WORKER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from runtime_methods import ConvOutMethod
from sdcore.testing.contract import contract_options, plugin_manager_with
from sdcore.train import train
from pathlib import Path

class Waits:  # every process waits after step 2 until the launcher passes Ctrl-C on
    def sdcore_on_train_step(self, context, step, logs):
        if step == 2:
            Path({tmp!r}, "ready-" + os.environ["RANK"]).touch()
            while True:
                time.sleep(0.05)

options = contract_options(ConvOutMethod, Path({tmp!r}), {{"batch_size": 1, "max_steps": 5, **{extra!r}}}, tag="multi")
try:
    train(ConvOutMethod(options), plugin_manager=plugin_manager_with(Waits()))
except KeyboardInterrupt as interrupted:
    rank = os.environ["RANK"]
    print(f"rank {{rank}} weights {{interrupted.sdcore_weights}}", flush=True)
    print(f"rank {{rank}} main {{interrupted.sdcore_main}} saved {{interrupted.sdcore_saved}}", flush=True)
"""


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
@pytest.mark.parametrize("save_state", [True, False])
def test_ctrl_c_under_torchrun_keeps_the_weights_once_and_every_process_ends(tmp_path, save_state):
    """Ctrl-C reaches torchrun, which passes SIGINT on to every process (they run in their own session): the state
    is saved together, the main process writes the weights of the last step while the other waits for it, and
    every process ends well inside the launcher's 30 s before it kills them (no barrier left unmatched)."""
    import os
    import signal
    import subprocess
    import time

    extra = {} if save_state else {"save_state": False}
    script = tmp_path / "app.py"
    script.write_text(
        _CTRL_C_WORKER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), extra=extra), encoding="utf-8"
    )
    command = torchrun_command()
    assert command is not None
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*command, "--standalone", "--nproc_per_node", "2", str(script)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the processes never reached step 2"
            time.sleep(0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does: torchrun gets it
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - started < 25, f"the processes took too long to end: {err[-3000:]}"
    weights = tmp_path / "multi" / "result-step00000002.safetensors"
    assert f"rank 0 weights {weights}" in out and "rank 1 weights None" in out, out + err[-3000:]
    assert "rank 0 main True saved the weights after step 2 are in" in out, out
    assert "rank 1 main False" in out, out
    state = tmp_path / "multi" / "result-state" / "step-00000002"
    assert (state / "train_state.json").exists() is save_state
    assert ("--resume latest" in out) is save_state, out
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    if save_state:
        trained = load_file(str(state / "trainable.safetensors"))
        assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k].float()) for k in saved)
    single = _one_process_after_step_two(tmp_path)
    assert saved.keys() == single.keys()
    for key, value in single.items():
        assert torch.allclose(saved[key], value, atol=1e-6), key


def _one_process_after_step_two(tmp_path):
    """The weights after step 2 of one process accumulating the two processes' micro-batches."""
    from safetensors.torch import load_file
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train

    values = {"batch_size": 1, "max_steps": 2, "gradient_accumulation": 2}
    train(ConvOutMethod(contract_options(ConvOutMethod, tmp_path, values, tag="single")))
    return load_file(str(tmp_path / "single" / "result.safetensors"))
