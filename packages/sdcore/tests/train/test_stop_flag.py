"""``train(..., stop=event)``: an application cancels a run from another thread, as Ctrl-C does from a shell."""

import dataclasses
import threading

import pytest
from runtime_methods import ConvOutMethod
from sdcore.errors import SdcoreError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options, plugin_manager_with
from sdcore.train import TrainingStopped, train


class _Events:
    def __init__(self):
        self.events = []

    def sdcore_on_train_step(self, context, step, logs):
        self.events.append(("step", step))

    def sdcore_after_train(self, context, result):
        self.events.append(("after", result.steps))

    def sdcore_on_train_error(self, context, error):
        self.events.append(("error", type(error).__name__))


def _opts(tmp_path, **kw):
    return contract_options(ConvOutMethod, tmp_path, {"max_steps": 5, **kw})


def test_a_run_stopped_from_another_thread_keeps_its_state_and_resumes(tmp_path, capsys):
    """The app trains in a worker thread and its UI thread presses "cancel" once step 2 is reported."""
    stop, reached, pressed = threading.Event(), threading.Event(), threading.Event()

    class Ui(_Events):
        def sdcore_on_train_step(self, context, step, logs):
            super().sdcore_on_train_step(context, step, logs)
            if step == 2:
                reached.set()
                assert pressed.wait(30)

    ui, outcome = Ui(), {}
    o = _opts(tmp_path)

    def work():
        try:
            train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"), plugin_manager=plugin_manager_with(ui), stop=stop)
        except BaseException as exc:  # the worker hands whatever ended it to the UI thread
            outcome["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    assert reached.wait(60)
    stop.set()
    pressed.set()
    worker.join(60)
    assert not worker.is_alive()
    error = outcome["error"]
    assert isinstance(error, TrainingStopped) and isinstance(error, SdcoreError)
    assert error.step == 2 and "after 2 steps" in str(error)
    state = tmp_path / "run" / "result-state" / "step-00000002"
    assert error.state == state and (state / "train_state.json").exists()
    assert not (tmp_path / "run" / "result.safetensors").exists()  # no result pretending to be finished
    # the weights after step 2, where --save-every puts that step's result, ready to load (as OneTrainer's stop)
    assert error.weights == tmp_path / "run" / "result-step00000002.safetensors" and error.weights.is_file()
    assert ui.events == [("step", 1), ("step", 2), ("error", "TrainingStopped")]
    assert capsys.readouterr().out == ""  # a library call prints nothing on stdout

    # the kept weights continue (exact resume itself is test_loop's and the contract's)
    r = train(ConvOutMethod(dataclasses.replace(o, resume=str(error.state))), bundle=create_tiny_bundle("sd1"))
    assert r.steps == 5 and r.output.exists()


def test_a_stop_set_before_the_first_step_trains_nothing(tmp_path):
    stop = threading.Event()
    stop.set()
    method = ConvOutMethod(_opts(tmp_path))
    with pytest.raises(TrainingStopped, match="after 0 steps") as caught:
        train(method, bundle=create_tiny_bundle("sd1"), stop=stop)
    assert caught.value.step == 0 and caught.value.state is None and caught.value.weights is None
    assert not (tmp_path / "run" / "result-state").exists()


def test_an_unset_stop_changes_nothing(tmp_path):
    a = ConvOutMethod(_opts(tmp_path, max_steps=2))
    r = train(a, bundle=create_tiny_bundle("sd1"), stop=threading.Event())
    assert r.steps == 2 and r.output.exists()


class _StopAt:
    """Sets the flag once step ``at`` is reported (the hook runs last in a step, after its saves)."""

    def __init__(self, at):
        self.at, self.flag = at, threading.Event()

    def sdcore_on_train_step(self, context, step, logs):
        if step == self.at:
            self.flag.set()


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_stop_between_accumulated_steps_resumes_to_the_uninterrupted_weights(tmp_path):
    """The flag is read before an optimizer step, never between its micro-batches: with accumulation 2 and
    EMA, stop at step 2 + resume ends with the weights (and the EMA average) of a run that never stopped."""
    import torch

    values = {"max_steps": 4, "batch_size": 1, "gradient_accumulation": 2, "lr": 1e-2, "ema": True}
    straight = train(ConvOutMethod(_opts(tmp_path / "a", **values)), bundle=create_tiny_bundle("sd1"))
    o = _opts(tmp_path / "b", **values)
    at = _StopAt(2)
    with pytest.raises(TrainingStopped) as caught:
        train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"), plugin_manager=plugin_manager_with(at), stop=at.flag)
    assert caught.value.step == 2
    resumed = train(ConvOutMethod(dataclasses.replace(o, resume="latest")), bundle=create_tiny_bundle("sd1"))
    want, got = _weights(straight.output), _weights(resumed.output)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_a_stop_right_after_a_periodic_save_writes_that_state_once(tmp_path, monkeypatch):
    """--save-every 2 has just written the state of step 2 when the flag is seen: the stop keeps that folder
    instead of deleting and writing the same state again (a window with no state at all, and the time of a
    full state for nothing)."""
    from sdcore.train import state as state_module

    written = []
    real = state_module.save_state

    def counting(root, position, **kw):
        written.append(position.step)
        return real(root, position, **kw)

    monkeypatch.setattr(state_module, "save_state", counting)
    at = _StopAt(2)
    o = _opts(tmp_path, save_every=2)
    with pytest.raises(TrainingStopped) as caught:
        train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"), plugin_manager=plugin_manager_with(at), stop=at.flag)
    folder = tmp_path / "run" / "result-state" / "step-00000002"
    assert caught.value.state == folder and (folder / "train_state.json").exists()
    assert written == [2]
    assert (tmp_path / "run" / "result-step00000002.safetensors").exists()  # the periodic save's result stays
    assert caught.value.weights == tmp_path / "run" / "result-step00000002.safetensors"  # named, not rewritten
