"""A save that fails must not lose the run (issue 17): read-only folder, full disk, folder removed.

Root ignores file permissions, so the failures are simulated where the OS would raise them: the
temporary file that every atomic write creates in the output folder.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from runtime_methods import ConvOutMethod
from safetensors.torch import load_file
from sdcore.errors import SaveFailedError
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.train.cli import build_train_command
from sdcore.train.state import list_states

FAILURES = {
    "read-only": lambda p: PermissionError(errno.EACCES, "Permission denied", p),
    "disk-full": lambda p: OSError(errno.ENOSPC, "No space left on device", p),
    "folder-removed": lambda p: FileNotFoundError(errno.ENOENT, "No such file or directory", p),
}


@pytest.fixture
def failing_folder(monkeypatch):
    """``fail(folder, kind)``: every atomic write into ``folder`` (or below) raises that OSError."""
    import sdcore.io

    real = sdcore.io.tempfile.mkstemp

    def fail(folder: Path, kind: str) -> None:
        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(folder) in [Path(dir), *Path(dir).parents]:
                raise FAILURES[kind](str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(sdcore.io.tempfile, "mkstemp", mkstemp)

    return fail


def _cli_args(o) -> list[str]:
    return [
        "--model", o.model, "--data", o.data, "--output", o.output, "--resolution", "64",
        "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--batch-size", "2", "--max-steps", "3",
        "--save-dtype", "fp32", "--no-progress",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_failed_final_save_rescues_result_and_state_in_one_line(tmp_path, failing_folder, kind, monkeypatch):
    o = contract_options(ConvOutMethod, tmp_path, tag="run")
    out_dir = Path(o.output).parent
    out_dir.mkdir(parents=True)
    failing_folder(out_dir, kind)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systemp"))
    (tmp_path / "systemp").mkdir()
    command = build_train_command(MethodSpec(name="convout", summary="t", method="runtime_methods:ConvOutMethod"))
    result = CliRunner().invoke(command, _cli_args(o))
    assert result.exit_code == 1, result.output
    # the run's summary lines come first; it ends with exactly one line saying what happened
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: could not save"), result.output
    assert [line for line in lines if line.startswith(("Error", "saved", "Traceback", "error"))] == lines[-1:]
    # beside the state is in the failing folder too: the system temp folder holds the rescue
    rescued = list((tmp_path / "systemp").glob("sdcore-rescue-result-*/result.safetensors"))
    assert len(rescued) == 1 and str(rescued[0]) in lines[-1]
    weights = load_file(str(rescued[0]))
    assert set(weights) == {"unet_conv_out.weight", "unet_conv_out.bias"}
    states = list_states(rescued[0].parent / "result-state")
    assert len(states) == 1 and states[0].name.endswith("00000003") and str(states[0]) in lines[-1]


def test_rescue_goes_beside_the_state_when_only_the_result_fails(tmp_path, disk_full_at):

    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.loop import train

    o = contract_options(ConvOutMethod, tmp_path)
    result_path = Path(o.output)
    disk_full_at(result_path)
    method = ConvOutMethod(o)
    with pytest.raises(SaveFailedError, match="No space left on device") as info:
        train(method, bundle=create_tiny_bundle("sd1"))
    state_root = result_path.parent / "result-state"
    rescued = list(state_root.glob("sdcore-rescue-result-*/result.safetensors"))
    assert len(rescued) == 1 and str(rescued[0]) in str(info.value)
    assert not result_path.exists()
    saved = load_file(str(rescued[0]))
    expected = method.trainable_state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_rescued_result_of_a_schedule_free_run_holds_its_evaluation_weights(tmp_path, disk_full_at):
    """A schedule-free optimizer trains at y and its result is x (eval mode, as every save writes): the
    rescued result must be x too, not the training-mode weights the run stopped with."""

    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.loop import TrainSession

    pytest.importorskip("schedulefree")
    o = contract_options(ConvOutMethod, tmp_path, {"optimizer": "AdamWScheduleFree", "lr": 0.05, "max_steps": 3})
    result_path = Path(o.output)
    disk_full_at(result_path)
    method = ConvOutMethod(o)
    session = TrainSession(method, bundle=create_tiny_bundle("sd1"))
    with pytest.raises(SaveFailedError) as info:
        session.run()
    (rescued,) = (result_path.parent / "result-state").glob("sdcore-rescue-result-*/result.safetensors")
    assert str(rescued) in str(info.value)
    saved = load_file(str(rescued))
    training = method.trainable_state_dict()
    with session.evaluating():
        evaluation = method.trainable_state_dict()
    assert any(float((training[k] - evaluation[k]).abs().max()) > 1e-4 for k in evaluation)
    # equal up to the float rounding of schedule-free's train -> eval -> train -> eval round trips (~1e-9);
    # the training-mode weights differ by ~1e-2
    for k in evaluation:
        torch.testing.assert_close(saved[k], evaluation[k], rtol=0, atol=1e-7)


def test_failure_at_an_intermediate_save_stops_and_rescues(tmp_path, failing_folder, monkeypatch):
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.loop import TrainSession

    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 4, "save_every": 2})
    session = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    failing_folder(Path(o.output).parent, "read-only")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SaveFailedError, match="Permission denied") as info:
        session.run()
    assert session.position.step == 2
    assert "trained result was written to" in str(info.value)


def test_output_folder_removed_mid_run_is_recreated_and_saved(tmp_path):
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.loop import TrainSession

    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 3})
    session = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    Path(o.output).parent.mkdir(parents=True, exist_ok=True)
    original = session.method.on_step_end

    def remove_at_2(bundle, step):
        original(bundle, step)
        if step == 2:
            shutil.rmtree(Path(o.output).parent)

    session.method.on_step_end = remove_at_2
    result = session.run()
    assert result.output.is_file() and set(load_file(str(result.output))) == {
        "unet_conv_out.weight",
        "unet_conv_out.bias",
    }


def test_expected_os_errors_are_one_line_unless_sdcore_debug(tmp_path, monkeypatch):
    import click
    from sdcore.cli import RootGroup

    @click.group(cls=RootGroup)
    def root() -> None:
        pass

    @root.command()
    def boom() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/x/y.png")

    result = CliRunner().invoke(root, ["boom"])
    assert result.exit_code == 1 and result.output.strip().startswith("Error: /x/y.png: Permission denied")
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setenv("SDCORE_DEBUG", "1")
    result = CliRunner().invoke(root, ["boom"])
    assert isinstance(result.exception, PermissionError)


class StopsMidStep(torch.optim.SGD):
    """SGD whose third step updates the first parameter, then raises (an out of memory part-way through
    a non-foreach optimizer): the weights hold step 3 for that tensor and step 2 for the others."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            first = next(p for group in self.param_groups for p in group["params"] if p.grad is not None)
            with torch.no_grad():
                first.add_(first.grad, alpha=-self.param_groups[0]["lr"])
            raise RuntimeError("failed part-way through the optimizer step")
        return super().step(closure)


@pytest.mark.parametrize("processes", [1, 2])
def test_an_error_inside_the_optimizer_step_saves_nothing_from_mixed_weights(tmp_path, monkeypatch, capsys, processes):
    """An error inside ``optimizer.step()`` may leave some tensors stepped and others not: neither the
    state (one process) nor the weights a failed process writes alone (several) are saved from them, and
    one line says so; an error outside the step still saves the state of the last finished step."""
    from accelerate import Accelerator
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.loop import TrainSession

    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5, "optimizer": f"{__name__}.StopsMidStep"})
    session = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    if processes > 1:
        monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="part-way"):
        session.run()
    assert session.position.step == 2
    assert list_states(tmp_path / "run" / "result-state") == []
    assert not list((tmp_path / "run").glob("result-step*"))
    err = capsys.readouterr().err
    if processes == 1:
        assert "error during the optimizer step: some weights may have taken the step and others not, so no " \
            "state was saved" in err  # fmt: skip
    else:
        assert (
            "error in one of several processes during the optimizer step: some weights may have taken the step "
            "and others not, so nothing was saved; resume from the last saved state with --resume"
        ) in err

    class AfterTheStep(ConvOutMethod):  # the same error after step 3: its state (or weights) are saved
        def on_step_end(self, bundle, step):
            if step == 3:
                raise RuntimeError("failed after the step")
            return super().on_step_end(bundle, step)

    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5}, tag="after")
    session = TrainSession(AfterTheStep(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    with pytest.raises(RuntimeError, match="after the step"):
        session.run()
    if processes == 1:
        assert len(list_states(tmp_path / "after" / "result-state")) == 1
    else:
        assert (tmp_path / "after" / "result-step00000003.safetensors").is_file()


def test_a_failed_lone_save_names_the_methods_result_not_the_generic_path(tmp_path, monkeypatch):
    """save_alone's failure line: the method decides its file (TI writes embeddings/<name>-<step>.pt, not
    the runtime's intermediate path), so the line names the step-N result of the method and the writer's
    own reason (with the file it failed on), never a path nothing was meant to be written to."""
    from types import SimpleNamespace

    from sdcore.train import save_fallback
    from sdcore.train.checkpoints import intermediate_path

    output = tmp_path / "run" / "result.safetensors"
    embeddings = tmp_path / "run" / "embeddings"

    def write_result(session, path, *, final):
        raise PermissionError(errno.EACCES, "Permission denied", str(embeddings))

    monkeypatch.setattr(save_fallback, "write_result", write_result)
    session = SimpleNamespace(
        position=SimpleNamespace(step=3), options=SimpleNamespace(save_state=True), output=output,
        method=SimpleNamespace(name="ti"), fused=None, placement=None,
        accelerator=SimpleNamespace(distributed_type="MULTI_GPU", state=SimpleNamespace(), parallelism_config=None),
    )  # fmt: skip
    line = save_fallback.save_alone(session, "error")
    assert line == (
        "error in one of several processes: the weights after step 3 (the step-3 result of ti) could not be "
        f"written ({embeddings}: Permission denied (no permission: choose a folder you can write, or fix its "
        "permissions)); resume from the last saved state with --resume"
    )
    assert str(intermediate_path(output, step=3)) not in line
