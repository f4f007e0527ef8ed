"""Logs a user can read (issue 17): plain progress lines when piped, ``--no-progress`` hides only
the bar, "saved" and "interrupted" said once."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner
from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.train.cli import build_train_command
from sdcore.train.loop import train
from sdcore.train.progress import PlainProgress, progress_bar


def test_plain_progress_prints_lines_not_frames():
    out = io.StringIO()
    bar = PlainProgress(total=100, desc="lora", stream=out, interval=0.0)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(loss="0.1234", lr="1.00e-04", refresh=False)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and len(text.splitlines()) == 3
    assert text.splitlines()[-1].startswith("lora: step 3/100 (3%), loss 0.1234, lr 1.00e-04")
    assert "ETA" in text


def test_plain_progress_is_rate_limited():
    out = io.StringIO()
    bar = PlainProgress(total=1000, desc="x", stream=out, interval=3600)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert out.getvalue().count("\n") == 1 and "step 1000/1000 (100%)" in out.getvalue()


def test_progress_bar_uses_tqdm_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(total=3, desc="x", stream=io.StringIO()), PlainProgress)
    from tqdm import tqdm

    assert isinstance(progress_bar(total=3, desc="x", stream=Tty()), tqdm)
    hidden = progress_bar(total=3, desc="x", enabled=False)
    hidden.update(2)
    assert hidden.n == 2


def test_piped_training_log_has_no_carriage_returns_and_is_small(tmp_path, capsys):
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 40, "progress": True, "batch_size": 1})
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert len(err) < 2000, err  # 40 steps: the summary, a few plain lines at most
    assert "step 40/40 (100%)" in err and "training images" in err


def test_no_progress_hides_only_the_bar(tmp_path, capsys):
    data = tmp_path / "data"
    from sdcore.testing.contract import make_tiny_dataset

    make_tiny_dataset(data, n=4, size=64)
    (data / "broken.png").write_bytes(b"not an image")
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 2, "progress": False})
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    err = capsys.readouterr().err
    assert "training images" in err and "broken.png" in err  # summary and its skipped files
    assert "step 2/2" not in err


def _command():
    return build_train_command(MethodSpec(name="convout", summary="t", method="runtime_methods:ConvOutMethod"))


def _args(tmp_path, o) -> list[str]:
    return [
        "--model", "tiny:sd1", "--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--resolution", "64",
        "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--max-steps", "3",
    ]  # fmt: skip


def test_saved_is_printed_once(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path)
    result = CliRunner().invoke(_command(), _args(tmp_path, o))
    assert result.exit_code == 0, result.output
    assert result.output.count("saved ") == 1 and "after 3 steps" in result.output
    assert "\r" not in result.output


def test_interrupted_is_printed_once_with_the_state(tmp_path, monkeypatch):
    o = contract_options(ConvOutMethod, tmp_path)

    def stop(self, bundle, step):
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ConvOutMethod, "on_step_end", stop)
    result = CliRunner().invoke(_command(), _args(tmp_path, o))
    assert result.exit_code == 130, result.output
    said = [line for line in result.output.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1, result.output
    line = said[0]
    assert "r-state" in line and "step-00000002" in line and "--resume latest" in line
    weights = tmp_path / "r-step00000002.safetensors"  # beside the state: a file A1111/ComfyUI load right away
    assert str(weights) in line and weights.is_file()


def test_interrupted_without_a_state_names_the_weights_and_offers_no_resume(tmp_path, monkeypatch):
    """``--no-save-state``: before, Ctrl-C kept nothing and the line still said "--resume latest"."""
    o = contract_options(ConvOutMethod, tmp_path)

    def stop(self, bundle, step):
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ConvOutMethod, "on_step_end", stop)
    result = CliRunner().invoke(_command(), [*_args(tmp_path, o), "--no-save-state"])
    assert result.exit_code == 130, result.output
    said = [line for line in result.output.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1, result.output
    weights = tmp_path / "r-step00000002.safetensors"
    assert str(weights) in said[0] and weights.is_file()
    assert "--resume" not in said[0] and "--no-save-state" in said[0]
    assert not (tmp_path / "r-state").exists()


def test_a_second_ctrl_c_while_the_run_ends_still_names_what_the_first_kept(tmp_path, monkeypatch):
    """The state and the weights file are written, then a second Ctrl-C comes while the run closes (a tracker
    finishing, say): the line still names both, not "training had not started, so nothing was saved"."""
    from sdcore.train.progress import Progress

    o = contract_options(ConvOutMethod, tmp_path)

    def stop(self, bundle, step):
        if step == 2:
            raise KeyboardInterrupt

    def again(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ConvOutMethod, "on_step_end", stop)
    monkeypatch.setattr(Progress, "end_trackers", again)  # runs in the run's `finally`
    result = CliRunner().invoke(_command(), _args(tmp_path, o))
    assert result.exit_code == 130, result.output
    said = [line for line in result.output.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1, result.output
    weights = tmp_path / "r-step00000002.safetensors"
    assert str(weights) in said[0] and weights.is_file()
    assert "step-00000002" in said[0] and "--resume latest" in said[0]
    assert "not started" not in said[0]


def test_interrupted_while_loading_says_nothing_was_saved(tmp_path, monkeypatch):
    from sdcore.train.loop import TrainSession

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainSession, "setup", interrupted)
    o = contract_options(ConvOutMethod, tmp_path)
    result = CliRunner().invoke(_command(), _args(tmp_path, o))
    assert result.exit_code == 130, result.output
    assert "interrupted: training had not started, so nothing was saved" in result.output
    assert "--resume" not in result.output


@pytest.mark.parametrize("progress", [True, False])
def test_cli_summary_shown_with_and_without_progress(tmp_path, progress):
    o = contract_options(ConvOutMethod, tmp_path)
    args = _args(tmp_path, o) + ([] if progress else ["--no-progress"])
    result = CliRunner().invoke(_command(), args)
    assert result.exit_code == 0 and "training images" in result.output


def test_method_step_values_reach_bar_trackers_and_hooks():
    """What ``TrainingMethod.on_step_end`` returns (e.g. LoRA max-norm's keys_scaled) is reported like the
    runtime's own values: on the bar, to the trackers as ``train/<name>``, and in the hooks' logs."""
    from sdcore.train.options import TrainOptions
    from sdcore.train.progress import Progress

    class Accelerator:
        is_main_process = True

        def __init__(self):
            self.logged = []

        def log(self, values, step):
            self.logged.append((step, values))

    acc = Accelerator()
    progress = Progress(TrainOptions(progress=False), acc, name="x")
    out = io.StringIO()
    progress.bar = PlainProgress(total=2, stream=out, interval=0.0)
    progress.tracking = True
    logs = progress.step(1, 0, 0.5, 1e-4, extra={"keys_scaled": 3, "loss": 9.0})
    assert logs["keys_scaled"] == 3.0 and logs["loss"] == 0.5  # a method cannot overwrite the runtime's values
    assert acc.logged == [(1, {"train/loss": 0.5, "train/lr": 1e-4, "train/keys_scaled": 3.0})]
    assert "keys_scaled 3" in progress.bar.postfix  # shown with the next printed line
    progress.bar.close()
    assert progress.step(2, 0, 0.5, 1e-4) == {"loss": 0.5, "loss_avg": 0.5, "lr": 1e-4, "epoch": 1}
