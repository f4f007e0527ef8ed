"""kohya's --initial_step / --initial_epoch / --skip_until_initial_step in sdcore's runtime.

The reference for every expectation is kohya's train_network.py as read (not run): the start step
(initial_step, else (initial_epoch - 1) x optimizer steps per epoch, else the resumed state's), the
skip (same batches as an uninterrupted run, counter at K), the no-skip start (first batch of epoch
K // steps per epoch, counter at 0, ends with kohya's num_train_epochs) and the LR schedule (moved
only by --resume).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from runtime_methods import ConvOutMethod
from safetensors.torch import load_file
from sdcore.models.tiny import create_tiny_bundle
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.train import step as step_module
from sdcore.train.cli import build_train_command
from sdcore.train.initial import start_point
from sdcore.train.kohya import translate
from sdcore.train.loop import TrainSession, train
from sdcore.train.preflight import option_problems, run_preflight
from sdcore.train.state import TrainPosition

LR = 1e-3


def _opts(tmp_path, tag, **kw):
    # 4 images, batch 1: 4 optimizer steps per epoch; SGD without momentum keeps no state, so a
    # fresh optimizer from the same weights continues exactly like a resumed one
    base = {"batch_size": 1, "max_steps": 10, "optimizer": "sgd", "lr": LR, "flip": True, "keep_states": 0}
    return contract_options(ConvOutMethod, tmp_path, {**base, **kw}, tag=tag)


class Recorder:
    """Every optimizer step's sample refs and the LR it ran with; every save's name, step and epoch."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[int, tuple[tuple[int, int, int], ...], float]] = []
        original = step_module.optimizer_step

        def recording(group, *, step, placement, **kw):
            refs = tuple((r.entry, r.occurrence, r.epoch) for mb in group for r in mb)
            self.steps.append((step, refs, float(placement.scheduler.get_last_lr()[0])))
            return original(group, step=step, placement=placement, **kw)

        monkeypatch.setattr(step_module, "optimizer_step", recording)

    def take(self):
        steps, self.steps = self.steps, []
        return steps


def _run(options, bundle=None):
    method = ConvOutMethod(options)
    saves: list[tuple[str, int, int]] = []
    original = method.save

    def save(bundle, info):
        saves.append((Path(info.path).name, info.step, info.epoch))
        return original(bundle, info)

    method.save = save  # type: ignore[method-assign]
    result = train(method, bundle=bundle or create_tiny_bundle("sd1"))
    return method, result, saves


def _bundle_with(state_folder: Path):
    """A fresh tiny model whose trained part holds the weights of a saved state (the "same weights")."""
    bundle = create_tiny_bundle("sd1")
    trained = load_file(str(state_folder / "trainable.safetensors"))
    bundle.unet.conv_out.load_state_dict({k.split(".", 1)[1]: v for k, v in trained.items()})
    return bundle


def _same_weights(a, b):
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("accum", "k", "total"), [(1, 6, 10), (2, 3, 5)])
def test_skip_continues_like_resume_and_like_the_uninterrupted_run(tmp_path, monkeypatch, accum, k, total):
    """(a) A fresh run from the weights at step k with initial_step=k + skip sees the batches (so the
    noise, keyed by them) and losses of the uninterrupted run; so does a resume from the state at k.
    k=6 (accumulation 1) and k=3 (accumulation 2, 2 steps/epoch) both start inside epoch 2."""
    rec = Recorder(monkeypatch)
    kw = {"gradient_accumulation": accum, "max_steps": total}
    straight, want, _ = _run(_opts(tmp_path, "straight", save_every=k, **kw))
    want_steps = rec.take()
    state = Path(want.state_dir) / f"step-{k:08d}"
    assert state.is_dir()

    resumed, got, _ = _run(_opts(tmp_path, "resumed", resume=str(state), **kw))
    resumed_steps = rec.take()
    skipped, fresh, _ = _run(
        _opts(tmp_path, "fresh", initial_step=k, skip_until_initial_step=True, **kw), _bundle_with(state)
    )
    fresh_steps = rec.take()

    assert [s[:2] for s in fresh_steps] == [s[:2] for s in want_steps[k:]] == [s[:2] for s in resumed_steps]
    assert fresh.steps == got.steps == total
    assert fresh.losses == want.losses[k:] == got.losses[k:]
    assert _same_weights(skipped, straight) and _same_weights(resumed, straight)


def test_skipped_batches_are_not_loaded(tmp_path, monkeypatch):
    """Skipping advances the order only: no image of a skipped batch is decoded."""
    import sdcore.train.data as data_module

    loads: list[str] = []
    original = data_module.load_pixels

    def counting(entry, *args, **kw):
        loads.append(entry.path.name)
        return original(entry, *args, **kw)

    monkeypatch.setattr(data_module, "load_pixels", counting)
    _run(_opts(tmp_path, "all", cache_latents=False))
    everything = len(loads)
    loads.clear()
    _run(_opts(tmp_path, "skip", cache_latents=False, initial_step=6, skip_until_initial_step=True))
    assert everything >= 10
    assert len(loads) <= 4 + 1  # the 4 trained samples (+ one prefetched for a next step)


def test_without_skip_the_data_restarts_at_the_epoch_and_the_counter_at_zero(tmp_path, monkeypatch):
    """(b) kohya without --skip_until_initial_step: epoch_to_start = K // steps per epoch, from that
    epoch's first batch; global_step restarts at 0; the loop ends with num_train_epochs =
    ceil(max_train_steps / steps per epoch), so fewer than max_train_steps steps train."""
    rec = Recorder(monkeypatch)
    _run(_opts(tmp_path, "straight", max_steps=12))
    want_steps = rec.take()
    _, got, saves = _run(_opts(tmp_path, "noskip", initial_step=6, save_every=2))
    got_steps = rec.take()

    per_epoch, k, total = 4, 6, 10
    epoch_to_start = k // per_epoch
    epochs = math.ceil(total / per_epoch)
    assert (epoch_to_start, epochs) == (1, 3)
    assert got.steps == (epochs - epoch_to_start) * per_epoch == 8 and len(got.losses) == 8
    assert [s[0] for s in got_steps] == list(range(8))  # the counter from 0
    assert [s[1] for s in got_steps] == [s[1] for s in want_steps[4:12]]  # epochs 2 and 3, from their start
    assert {r[2] for s in got_steps[:4] for r in s[1]} == {1}
    # (e) step saves count from 0 again; the epoch carries the offset
    assert saves[:3] == [
        ("result-step00000002.safetensors", 2, 1),
        ("result-step00000004.safetensors", 4, 2),
        ("result-step00000006.safetensors", 6, 2),
    ]
    assert saves[-1] == ("result.safetensors", 8, 3)


def _linear(step: int, total: int) -> float:
    """transformers' linear schedule without warmup, as kohya builds it: lr x max(0, (N - s) / N)."""
    return LR * max(0.0, (total - step) / total)


def test_lr_schedule_is_not_moved_without_resume(tmp_path, monkeypatch):
    """(c) kohya's help: initial_epoch/step do not move the LR scheduler; it starts from 0 unless
    --resume restored it (then it continues from the state, whatever the initial step)."""
    rec = Recorder(monkeypatch)
    _, want, _ = _run(_opts(tmp_path, "straight", lr_scheduler="linear", save_every=6))
    want_steps = rec.take()
    assert [s[2] for s in want_steps] == pytest.approx([_linear(i, 10) for i in range(10)])

    _run(_opts(tmp_path, "fresh", lr_scheduler="linear", initial_step=6, skip_until_initial_step=True))
    fresh_steps = rec.take()
    assert [s[0] for s in fresh_steps] == [6, 7, 8, 9]
    assert [s[2] for s in fresh_steps] == pytest.approx([_linear(i, 10) for i in range(4)])
    assert [s[2] for s in fresh_steps] != pytest.approx([s[2] for s in want_steps[6:]])

    # resume from step 6 but start at epoch 2 (K = 4): the batches of steps 5..10, the LR of the state
    state = Path(want.state_dir) / "step-00000006"
    _, got, _ = _run(
        _opts(
            tmp_path,
            "resumed",
            lr_scheduler="linear",
            resume=str(state),
            initial_epoch=2,
            skip_until_initial_step=True,
        )
    )
    resumed_steps = rec.take()
    assert [s[0] for s in resumed_steps] == [4, 5, 6, 7, 8, 9]
    assert [s[1] for s in resumed_steps] == [s[1] for s in want_steps[4:]]
    assert [s[2] for s in resumed_steps] == pytest.approx([_linear(6 + i, 10) for i in range(6)])
    assert got.losses[:4] == want.losses[:4]  # the history up to the start step is kept


def test_initial_epoch_maps_to_kohyas_step(tmp_path, monkeypatch):
    """(d) initial_step = (initial_epoch - 1) x ceil(batches per epoch / accumulation)."""
    rec = Recorder(monkeypatch)
    kw = {"gradient_accumulation": 2, "max_steps": 6}
    o = _opts(tmp_path, "skip", initial_epoch=3, skip_until_initial_step=True, **kw)
    session = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    batches = len(session.data.epoch_plan(0))
    k = (3 - 1) * math.ceil(batches / 2)
    assert (batches, k) == (4, 4)
    assert (session.position.step, session.position.epoch, session.position.batch) == (k, 2, 0)
    result = session.run()
    steps = rec.take()
    assert result.steps == 6 and [s[0] for s in steps] == [4, 5]
    plan = [(r.entry, r.occurrence, r.epoch) for mb in session.data.epoch_plan(2) for r in mb]
    assert [r for s in steps for r in s[1]] == plan

    # step 0 / epoch 1 are "as not given" (kohya's help), also when resuming
    for kw0 in ({"initial_step": 0}, {"initial_epoch": 1}, {"initial_step": 0, "initial_epoch": 1}):
        o = _opts(tmp_path, "zero", skip_until_initial_step=True, **kw0, **kw)
        assert start_point(o, session.data, total_steps=6, max_epochs=None) is None
        assert start_point(o, session.data, total_steps=6, max_epochs=None, resumed=TrainPosition(3, 1, 2)) is None
    # with initial_step 0 the epoch counts (0 = not given)
    o = _opts(tmp_path, "zero", initial_step=0, initial_epoch=2, skip_until_initial_step=True, **kw)
    start = start_point(o, session.data, total_steps=6, max_epochs=None)
    assert start is not None and start.initial_step == 2

    # initial_step overrides initial_epoch
    o = _opts(tmp_path, "both", initial_epoch=3, initial_step=1, skip_until_initial_step=True, **kw)
    session = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    assert (session.position.step, session.position.epoch, session.position.batch) == (1, 0, 2)

    # without the skip: epoch_to_start = 4 // 2 = 2 of ceil(6 / 2) = 3 epochs, counter from 0
    _, result, _ = _run(_opts(tmp_path, "noskip", initial_epoch=3, **kw))
    assert (result.steps, result.epochs) == (2, 3)


def test_step_names_samples_and_metadata_carry_the_offset(tmp_path, monkeypatch):
    """(e) with the skip the counter starts at K: step saves, states, samples and the saved step and
    epoch (LoRA's ss_steps/ss_epoch) are those of the uninterrupted run."""
    _, _, want_saves = _run(_opts(tmp_path, "straight", save_every=4))
    _, got, saves = _run(
        _opts(
            tmp_path,
            "skip",
            save_every=4,
            initial_step=6,
            skip_until_initial_step=True,
            sample_prompts="a red square",
            sample_every=4,
            sample_steps=1,
        )
    )
    assert saves == [("result-step00000008.safetensors", 8, 2), ("result.safetensors", 10, 2)]
    assert saves == [s for s in want_saves if s[1] > 6]
    assert sorted(p.name for p in Path(got.state_dir).iterdir()) == ["step-00000008", "step-00000010"]
    samples = Path(got.output).parent / "result-samples"
    assert sorted(p.name for p in samples.iterdir() if p.suffix == ".png") == ["final.png", "step00000008.png"]


def test_bad_values_are_reported_together(tmp_path):
    o = _opts(tmp_path, "bad", initial_step=-1, initial_epoch=0)
    problems = option_problems(o)
    assert "--initial-step must be 0 or more (0 = the first step, as not given), got -1" in problems
    assert "--initial-epoch must be at least 1 (1 = the first epoch, as not given), got 0" in problems


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"initial_step": 10}, "--initial-step 10 must be below the run's 10 steps"),
        ({"initial_epoch": 4, "max_steps": 12}, "--initial-epoch 4 (step 12) must be below the run's 12 steps"),
        ({"initial_step": 0, "initial_epoch": 4, "max_steps": 12}, "--initial-epoch 4 (step 12) must be below"),
        ({"initial_step": 9}, None),
        ({"initial_epoch": 3}, None),  # step 8 < 10
    ],
)
def test_initial_step_must_be_below_the_step_limit(tmp_path, kw, expected):
    report = run_preflight(ConvOutMethod(_opts(tmp_path, "limit", **kw)), _opts(tmp_path, "limit", **kw), plan=False)
    found = [p for p in report.problems if "must be below" in p]
    if expected is None:
        assert not found, report.problems
    else:
        assert len(found) == 1 and found[0].startswith(expected), report.problems


def test_cli_reports_every_problem_with_exit_2_before_loading(tmp_path, no_model_load):
    o = _opts(tmp_path, "cli")
    command = build_train_command(MethodSpec(name="convout", summary="t", method="runtime_methods:ConvOutMethod"))
    result = CliRunner().invoke(
        command,
        ["--model", "tiny:sd1", "--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--resolution", "64",
         "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--max-steps", "4",
         "--initial-epoch", "0", "--lr", "-1"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--initial-epoch must be at least 1" in result.output and "--lr must be positive" in result.output
    assert "Traceback" not in result.output
    # kohya's spellings: the step limit, found from the dataset before any model loads
    result = CliRunner().invoke(
        command,
        ["--model", "tiny:sd1", "--train_data_dir", o.data, "--output", str(tmp_path / "r.safetensors"),
         "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--max_train_steps", "4",
         "--initial_step", "4", "--skip_until_initial_step"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--initial-step 4 must be below the run's 4 steps" in result.output
    assert "Traceback" not in result.output


def test_kohya_names_translate():
    from sdcore.train import kohya

    for name in ("initial_step", "initial_epoch", "skip_until_initial_step"):
        assert name not in kohya.UNSUPPORTED and name in kohya.ALIASES
    assert "skip_until_initial_step" in kohya.flag_names()  # a store_true flag on kohya's command line
    fields = {f.name for f in dataclasses.fields(ConvOutMethod.options_class)}
    out = translate({"initial_epoch": "3", "skip_until_initial_step": True}, fields, where="t")
    assert not out.problems
    assert out.values == {"initial_epoch": 3, "skip_until_initial_step": True}
    # kohya's help: 0 (step) / 1 (epoch) mean "as not given"; the kohya_ss GUI writes 0 when untouched
    out = translate({"initial_step": 0, "initial_epoch": 0, "skip_until_initial_step": False}, fields, where="t")
    assert not out.problems and out.values.get("initial_step") is None and out.values.get("initial_epoch") is None
    out = translate({"initial_step": 250}, fields, where="t")
    assert out.values == {"initial_step": 250}


def test_dry_run_notes_where_kohyas_meaning_surprises(tmp_path):
    o = _opts(tmp_path, "notes")
    command = build_train_command(MethodSpec(name="convout", summary="t", method="runtime_methods:ConvOutMethod"))
    base = ["--model", "tiny:sd1", "--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--resolution", "64",
            "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--max-steps", "10", "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(command, [*base, "--initial-step", "6"])
    assert result.exit_code == 0, result.output
    assert "the LR schedule starts from its beginning; only --resume moves it" in result.output
    assert "without --skip-until-initial-step: only the start epoch moves" in result.output
    result = CliRunner().invoke(command, [*base, "--initial-step", "6", "--skip-until-initial-step"])
    assert "only --resume moves it" in result.output and "only the start epoch moves" not in result.output
    result = CliRunner().invoke(command, [*base, "--skip-until-initial-step"])
    assert "nothing to skip" in result.output
    result = CliRunner().invoke(command, base)
    assert "initial-step" not in result.output
