"""The text-encoder stop for LoRA (sdcore.train.te_stop): ``--stop-text-encoder-at N`` trains the ``lora_te*``
modules in steps 1..N, ``--stop-text-encoder-after-epochs N`` in the steps of epochs 1..N (OneTrainer's EPOCH
unit, ``TimedActionMixin.single_action_elapsed``: epochs 0..N-1); after that they are bit-identical while the
UNet modules keep training, also across a resume."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from sdcore.testing.contract import _bundle, check_resume, contract_options, plugin_manager_with
from sdcore.train.loop import train
from sdplugin_lora.method import LoraMethod, LoraOptions


class _Snapshots:
    """The text-encoder and UNet LoRA tensors after every optimizer step (an ``sdcore_on_train_step`` hook)."""

    def __init__(self, method: LoraMethod) -> None:
        self.method = method
        self.te: dict[int, dict[str, torch.Tensor]] = {}
        self.unet: dict[int, dict[str, torch.Tensor]] = {}

    def sdcore_on_train_step(self, context, step, logs):
        state = {k: v.detach().clone() for k, v in self.method._require_network().state_dict().items()}
        self.te[step] = {k: v for k, v in state.items() if k.startswith("lora_te")}
        self.unet[step] = {k: v for k, v in state.items() if k.startswith("lora_unet")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(tmp_path: Path, **overrides) -> tuple[LoraMethod, _Snapshots]:
    values = {"train_text_encoder": True, "rank": 4, "lr": 1e-2, "save_state": False, **overrides}
    method = LoraMethod(contract_options(LoraMethod, tmp_path, values))
    watch = _Snapshots(method)
    train(method, bundle=_bundle("sd1"), plugin_manager=plugin_manager_with(watch))
    return method, watch


def _check_stop(watch: _Snapshots, trained: int, total: int) -> None:
    """The text encoder changes in every step up to ``trained`` and never after; the UNet in every step."""
    assert sorted(watch.te) == list(range(1, total + 1))
    for step in range(2, trained + 1):
        assert not _same(watch.te[step], watch.te[step - 1]), f"text encoder did not train in step {step}"
    for step in range(trained + 1, total + 1):
        assert _same(watch.te[step], watch.te[trained]), f"text encoder changed in step {step}"
    for step in range(2, total + 1):
        assert not _same(watch.unet[step], watch.unet[step - 1]), f"UNet did not train in step {step}"


def test_step_form_trains_the_text_encoder_for_n_steps_then_freezes_it(tmp_path):
    method, watch = _run(tmp_path, stop_text_encoder_at=2, max_steps=5)
    _check_stop(watch, trained=2, total=5)
    te_params = [p for m in method._require_network() if m.lora_name.startswith("lora_te") for p in m.parameters()]
    assert te_params and all(not p.requires_grad and p.grad is None for p in te_params)
    with method.sampling(_bundle("sd1")):  # samples switch the network to eval and back to train
        pass
    modules = list(method._require_network())
    assert all(m.training != m.lora_name.startswith("lora_te") for m in modules), "stopped modules stay in eval"


def test_epoch_form_stops_at_the_first_step_of_epoch_n_plus_1(tmp_path):
    # 4 images, batch 1: 4 optimizer steps per epoch, so after 1 epoch the text encoder trained steps 1-4
    from sdcore.train.data import build_train_data

    options = contract_options(LoraMethod, tmp_path, {"batch_size": 1})
    assert build_train_data(options, balance_class=True).steps_in_epoch(0, 1) == 4
    _method, watch = _run(tmp_path, stop_text_encoder_after_epochs=1, batch_size=1, max_steps=6)
    _check_stop(watch, trained=4, total=6)


def test_without_a_stop_the_text_encoder_trains_every_step(tmp_path):
    _method, watch = _run(tmp_path, max_steps=3)
    _check_stop(watch, trained=3, total=3)


@pytest.mark.parametrize(
    "stop",
    [
        {"stop_text_encoder_at": 4},  # interrupted at step 3, the stop falls in the resumed part
        {"stop_text_encoder_after_epochs": 1},  # 2 steps per epoch: interrupted at 3, past the stop
    ],
)
def test_resume_across_the_stop_equals_an_uninterrupted_run(tmp_path, stop):
    check_resume(LoraMethod, tmp_path, {"rank": 4, "train_text_encoder": True, "lr": 1e-2, **stop}, steps=6)


def _preflight(tmp_path: Path, **overrides):
    from sdcore.train.preflight import run_preflight

    options = contract_options(LoraMethod, tmp_path, {"max_steps": 4, **overrides})
    return run_preflight(LoraMethod(options), options, plan=False)


def test_preflight_problems_all_at_once(tmp_path):
    report = _preflight(tmp_path, stop_text_encoder_at=0, stop_text_encoder_after_epochs=2, ddp_static_graph=True)
    text = "\n".join(report.problems)
    assert "--stop-text-encoder-at must be at least 1 when given, got 0" in text
    assert "give the text-encoder stop as steps or as epochs, not both" in text
    both = "--stop-text-encoder-at and --stop-text-encoder-after-epochs"
    assert f"{both} need a run that trains the text encoder (--train-text-encoder)" in text  # LoRA on the UNet only
    assert "--ddp-static-graph" in text
    report = _preflight(tmp_path, stop_text_encoder_at=3)
    assert "--stop-text-encoder-at needs a run that trains the text encoder (--train-text-encoder)" in report.problems
    report = _preflight(tmp_path, te_only=True, stop_text_encoder_at=2)
    assert any("--te-only: nothing would train after the stop" in p for p in report.problems)


def test_preflight_notes_where_it_stops_or_that_it_never_does(tmp_path):
    # 4 images, batch 2: 2 steps per epoch; 4 steps = 2 epochs
    report = _preflight(tmp_path, train_text_encoder=True, stop_text_encoder_after_epochs=1)
    assert not report.problems
    assert "--stop-text-encoder-after-epochs 1: the text encoder trains for steps 1-2 of 4, then it is frozen" in (
        report.notes
    )
    report = _preflight(tmp_path, train_text_encoder=True, stop_text_encoder_at=4)
    assert "--stop-text-encoder-at 4: the run has 4 steps, so the text encoder trains to the end" in report.notes
    report = _preflight(tmp_path, train_text_encoder=True, epochs=2, max_steps=None, stop_text_encoder_after_epochs=2)
    assert any("the run has 2 epoch(s), so the text encoder trains to the end" in n for n in report.notes)


def test_kohya_stop_text_encoder_training_stays_dreambooths(tmp_path):
    """kohya's train_network.py has no --stop_text_encoder_training (the GUI ignores it for LoRA): LoRA's own
    --stop-text-encoder-at does not make the kohya name a LoRA option."""
    from sdcore.train import kohya
    from sdplugin_dreambooth.options import DreamBoothOptions

    lora = [f.name for f in fields(LoraOptions)]
    dreambooth = [f.name for f in fields(DreamBoothOptions)]
    assert "stop_text_encoder_at" in lora
    assert "stop_text_encoder_training" not in kohya.cli_names(lora)
    assert "stop_text_encoder_training" in kohya.cli_names(dreambooth)
    problems = kohya.translate({"stop_text_encoder_training": 5}, lora, where="c").problems
    assert problems == ["c: stop_text_encoder_training is not an option of this method (kohya's dreambooth option)"]
    assert kohya.translate({"stop_text_encoder_training": 5}, dreambooth, where="c").values == {
        "stop_text_encoder_at": 5
    }


def test_the_options_are_the_same_fields_in_lora_and_dreambooth():
    from sdcore.train.te_stop import TextEncoderStopOptions
    from sdplugin_dreambooth.options import DreamBoothOptions

    shared = {f.name for f in fields(TextEncoderStopOptions)}
    assert shared == {"stop_text_encoder_at", "stop_text_encoder_after_epochs"}
    for options_class in (LoraOptions, DreamBoothOptions):
        assert issubclass(options_class, TextEncoderStopOptions)


@pytest.mark.slow
def test_two_processes_stop_the_text_encoder_as_one_process_does(tmp_path):
    """DDP (find_unused_parameters): the text-encoder tensors stop getting gradients mid-run; two processes
    still equal one process with gradient accumulation 2, before and after the stop."""
    from sdcore.testing.distributed import check_processes_equal_accumulation, torchrun_command

    if torchrun_command() is None:
        pytest.skip("torchrun not available")
    check_processes_equal_accumulation(
        LoraMethod, tmp_path, {"rank": 2, "train_text_encoder": True, "stop_text_encoder_at": 2, "max_steps": 4}
    )
