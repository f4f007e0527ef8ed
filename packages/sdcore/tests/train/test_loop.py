"""The training runtime on tiny models: the contract, each option, saving, resume and failure paths."""

import dataclasses
import math
import os
import sys
import types
from dataclasses import replace

import pytest
import torch
from runtime_methods import ConvOutMethod, loss_target
from sdcore.errors import ConfigError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import (
    MethodContractTests,
    check_learning,
    contract_options,
    make_tiny_dataset,
    plugin_manager_with,
)
from sdcore.train.loop import TrainingDivergedError, TrainSession, train
from sdcore.train.method import Capabilities
from sdcore.train.noise import min_snr_weights, sample_noise


class TestConvOutContract(MethodContractTests):
    method_class = ConvOutMethod


def _opts(tmp_path, tag="run", **kw):
    return contract_options(ConvOutMethod, tmp_path, kw, tag=tag)


def _run(options, bundle=None, **kw):
    method = ConvOutMethod(options)
    result = train(method, bundle=bundle or create_tiny_bundle(options.model.split(":")[1]), **kw)
    return method, result


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_learns_on_v_prediction_and_sdxl(tmp_path, family):
    check_learning(ConvOutMethod, tmp_path, family=family, steps=30)


def test_sdxl_batch_carries_size_conditioning(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, family="sdxl")
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sdxl"))
    s.setup()
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    assert batch.original_sizes == [(64, 64)] * 2 and batch.crop_coords == [(0, 0)] * 2
    assert batch.target_sizes == [(64, 64)] * 2
    assert batch.conditioning.pooled.shape == (2, 64) and batch.conditioning.hidden_states.shape == (2, 77, 96)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a, _ = _run(_opts(tmp_path, "a", max_steps=3, flip=True, shuffle_caption=True))
    b, _ = _run(_opts(tmp_path, "b", max_steps=3, flip=True, shuffle_caption=True))
    c, _ = _run(_opts(tmp_path, "c", max_steps=3, flip=True, shuffle_caption=True, seed=99))
    sa, sb, sc = a.trainable_state_dict(), b.trainable_state_dict(), c.trainable_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    data = make_tiny_dataset(tmp_path / "two", n=2)
    big, r1 = _run(
        _opts(tmp_path, "big", data=str(data), batch_size=2, gradient_accumulation=1, max_steps=1, flip=True)
    )
    acc, r2 = _run(
        _opts(tmp_path, "acc", data=str(data), batch_size=1, gradient_accumulation=2, max_steps=1, flip=True)
    )
    assert r1.steps == r2.steps == 1
    assert r1.losses[0] == pytest.approx(r2.losses[0], rel=1e-5)
    sa, sb = big.trainable_state_dict(), acc.trainable_state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k


def test_epochs_and_steps_math(tmp_path):
    # 4 images, batch 2 -> 2 batches/epoch; accumulation 2 -> 1 step per epoch
    _, r = _run(_opts(tmp_path, "e", max_steps=None, epochs=3, gradient_accumulation=2))
    assert (r.steps, r.epochs) == (3, 3)
    _, r = _run(_opts(tmp_path, "d", max_steps=None, epochs=None))  # neither: one epoch
    assert (r.steps, r.epochs) == (2, 1)
    _, r = _run(_opts(tmp_path, "m", max_steps=3, epochs=5))  # both: whichever first
    assert r.steps == 3


def test_bf16_mixed_precision_keeps_trainable_fp32(tmp_path):
    o = _opts(tmp_path, max_steps=3, mixed_precision="bf16")
    bundle = create_tiny_bundle("sd1")
    _method, r = _run(o, bundle)
    assert bundle.unet.conv_out.weight.dtype == torch.float32
    assert bundle.unet.conv_in.weight.dtype == torch.bfloat16
    assert bundle.text_encoders[0].final_layer_norm.weight.dtype == torch.bfloat16
    assert all(math.isfinite(x) for x in r.losses)


def test_min_snr_weights_the_per_sample_loss(tmp_path):
    o = _opts(tmp_path)
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([20, 800])
    with torch.no_grad():
        plain = s.sample_loss(batch, noise, t, 0)
        s.options.min_snr_gamma = 5.0
        weighted = s.sample_loss(batch, noise, t, 0)
    expected = plain * min_snr_weights(s.bundle.noise_scheduler, t, 5.0)
    assert torch.allclose(weighted, expected) and not torch.allclose(weighted, plain)


def test_v_prediction_target_is_the_velocity(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, family="sd2")
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd2"))
    s.setup()
    assert s.bundle.noise_scheduler.config.prediction_type == "v_prediction"
    target, latents, noise, t = loss_target(s)
    velocity = s.bundle.noise_scheduler.get_velocity(latents, noise, t)
    assert torch.allclose(target, velocity)


def test_noise_offset_changes_training(tmp_path):
    _, a = _run(_opts(tmp_path, "a", max_steps=2))
    _, b = _run(_opts(tmp_path, "b", max_steps=2, noise_offset=0.1))
    assert a.losses[0] != b.losses[0] and all(math.isfinite(x) for x in b.losses)


def _count_vae_encodes(bundle):
    calls = {"n": 0}
    original = bundle.vae.encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    bundle.vae.encode = counting
    return calls


def test_latent_disk_cache_is_reused_and_invalidated(tmp_path):
    data = make_tiny_dataset(tmp_path / "cache-data", n=3)
    o = _opts(tmp_path, data=str(data), max_steps=1, cache_latents_to_disk=True, flip=True)
    b1 = create_tiny_bundle("sd1")
    c1 = _count_vae_encodes(b1)
    _run(o, b1)
    assert c1["n"] == 6  # 3 images x (plain, flipped)
    files = sorted((data / "1_tiny").glob("*.sdcore.npz"))
    assert len(files) == 3
    b2 = create_tiny_bundle("sd1")
    c2 = _count_vae_encodes(b2)
    _run(dataclasses.replace(o, output=str(tmp_path / "r2" / "x.safetensors")), b2)
    assert c2["n"] == 0  # unchanged images, same VAE: nothing encoded
    # an edited image is re-encoded, the others are not
    from PIL import Image

    img = data / "1_tiny" / "img00.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(img)
    b3 = create_tiny_bundle("sd1")
    c3 = _count_vae_encodes(b3)
    _run(dataclasses.replace(o, output=str(tmp_path / "r3" / "x.safetensors")), b3)
    assert c3["n"] == 2
    # another VAE never reuses these latents
    b4 = create_tiny_bundle("sd1", seed=5)
    c4 = _count_vae_encodes(b4)
    _run(dataclasses.replace(o, output=str(tmp_path / "r4" / "x.safetensors")), b4)
    assert c4["n"] == 6


def test_latent_cache_dir_and_uncached_training_match(tmp_path):
    cache_dir = tmp_path / "latents"
    cached, _ = _run(_opts(tmp_path, "a", max_steps=2, cache_latents_to_disk=True, cache_dir=str(cache_dir)))
    assert len(list(cache_dir.rglob("*.npz"))) == 4
    fresh, _ = _run(_opts(tmp_path, "b", max_steps=2, cache_latents=False))
    sa, sb = cached.trainable_state_dict(), fresh.trainable_state_dict()
    # the same seeded posterior sample is drawn with or without the cache
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_text_encoder_outputs_cached_with_caption_variants(tmp_path):
    o = _opts(tmp_path, max_steps=3, shuffle_caption=True, caption_variants=3)
    bundle = create_tiny_bundle("sd1")
    s = TrainSession(ConvOutMethod(o), bundle=bundle)
    s.setup()
    assert s.text_cache is not None
    assert all(len(v) == 3 for v in s.text_cache.variants)
    assert len({tuple(v) for v in s.text_cache.variants}) == 4
    calls = {"n": 0}
    te = bundle.text_encoders[0]
    original = te.forward

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    te.forward = counting
    s.run()
    assert calls["n"] == 0  # training used only cached outputs


def test_training_the_text_encoder_disables_the_cache_and_gets_gradients(tmp_path):
    o = _opts(tmp_path, max_steps=2, train_text_norm=True, lr=1e-2)
    bundle = create_tiny_bundle("sd1")
    before = bundle.text_encoders[0].final_layer_norm.weight.detach().clone()
    s = TrainSession(ConvOutMethod(o), bundle=bundle)
    s.run()
    assert s.text_cache is None
    assert not torch.equal(before, bundle.text_encoders[0].final_layer_norm.weight.detach())


class _Recorder:
    def __init__(self):
        self.events = []

    def sdcore_before_train(self, context):
        self.events.append(("before", context.total_steps))

    def sdcore_on_train_step(self, context, step, logs):
        self.events.append(("step", step, round(logs["lr"], 6)))

    def sdcore_after_train(self, context, result):
        self.events.append(("after", result.steps))

    def sdcore_on_train_error(self, context, error):
        self.events.append(("error", type(error).__name__))


def test_lifecycle_hooks(tmp_path):
    from sdcore.train.events import TrainEventContext

    class Contexts(_Recorder):
        def __init__(self):
            super().__init__()
            self.contexts = []

        def sdcore_on_train_step(self, context, step, logs):
            super().sdcore_on_train_step(context, step, logs)
            self.contexts.append(context)

    rec = Contexts()
    _run(_opts(tmp_path, max_steps=2), plugin_manager=plugin_manager_with(rec))
    assert rec.events == [("before", 2), ("step", 1, 0.001), ("step", 2, 0.001), ("after", 2)]
    # hooks get typed read-only snapshots, one per event, never the live session
    assert all(type(c) is TrainEventContext for c in rec.contexts)
    assert [c.step for c in rec.contexts] == [1, 2] and rec.contexts[0].family == "sd1"
    assert rec.contexts[0].output == tmp_path / "run" / "result.safetensors"


def test_ctrl_c_saves_a_resumable_state_then_reraises(tmp_path):
    class Stop(_Recorder):
        def sdcore_on_train_step(self, context, step, logs):
            if step == 2:
                raise KeyboardInterrupt

    rec = Stop()
    o = _opts(tmp_path, max_steps=5)
    with pytest.raises(KeyboardInterrupt):
        _run(o, plugin_manager=plugin_manager_with(rec))
    state = tmp_path / "run" / "result-state" / "step-00000002"
    assert (state / "train_state.json").exists() and (state / "optimizer.pt").exists()
    assert ("error", "KeyboardInterrupt") in rec.events
    _, r = _run(dataclasses.replace(o, resume="latest"))
    assert r.steps == 5 and len(r.losses) == 5


class _InterruptAt(_Recorder):
    """Raises KeyboardInterrupt (Ctrl-C) once step ``at`` is reported, keeping the method's weights of that step."""

    def __init__(self, method_box, at=2):
        super().__init__()
        self.method_box, self.at, self.weights = method_box, at, None

    def sdcore_on_train_step(self, context, step, logs):
        super().sdcore_on_train_step(context, step, logs)
        if step == self.at:
            self.weights = self.method_box[0].trainable_state_dict()
            raise KeyboardInterrupt


def _interrupted(o, at=2):
    """Train ``o`` until a Ctrl-C after step ``at``: (the KeyboardInterrupt, the network's weights at that step)."""
    method = ConvOutMethod(o)
    rec = _InterruptAt([method], at)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(method, bundle=create_tiny_bundle("sd1"), plugin_manager=plugin_manager_with(rec))
    return caught.value, rec.weights


def _assert_file_holds(path, weights):
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert saved.keys() == weights.keys()
    for key in weights:
        assert torch.equal(saved[key], weights[key]), key


@pytest.mark.parametrize("save_state", [True, False])
def test_ctrl_c_writes_the_weights_of_the_last_step_as_a_step_save_names_them(tmp_path, save_state):
    """An interrupted run leaves a file A1111/ComfyUI load right away (kohya writes nothing; OneTrainer's stop
    writes the model): the weights after the last finished step, where ``--save-every`` would have put them,
    with a state (the default) and without one (``--no-save-state``: before, nothing at all was kept)."""
    o = _opts(tmp_path, max_steps=5, save_state=save_state)
    error, weights = _interrupted(o)
    path = tmp_path / "run" / "result-step00000002.safetensors"
    assert error.sdcore_weights == path
    _assert_file_holds(path, weights)
    # the same bytes an uninterrupted run's --save-every 2 writes at step 2
    _run(_opts(tmp_path, "straight", max_steps=5, save_every=2, save_state=save_state))
    _assert_file_holds(path, _load(tmp_path / "straight" / "result-step00000002.safetensors"))
    assert not (tmp_path / "run" / "result.safetensors").exists()  # nothing pretends to be the finished result
    state = tmp_path / "run" / "result-state" / "step-00000002"
    assert (state / "train_state.json").exists() is save_state
    assert getattr(error, "sdcore_state", None) == (state if save_state else None)
    assert ("state saved in" in error.sdcore_saved) is save_state
    assert ("--resume latest" in error.sdcore_saved) is save_state
    assert str(path) in error.sdcore_saved


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ctrl_c_with_ema_writes_the_average_as_a_step_save_does(tmp_path):
    values = {"max_steps": 5, "ema": True, "ema_decay": 0.5, "lr": 1e-2}
    _interrupted(_opts(tmp_path, **values))
    _run(_opts(tmp_path, "straight", save_every=2, **values))
    want = _load(tmp_path / "straight" / "result-step00000002.safetensors")
    _assert_file_holds(tmp_path / "run" / "result-step00000002.safetensors", want)


def test_ctrl_c_before_the_first_step_writes_nothing_and_offers_no_resume(tmp_path, monkeypatch):
    def interrupted_loop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainSession, "_loop", interrupted_loop)
    with pytest.raises(KeyboardInterrupt) as caught:
        _run(_opts(tmp_path, max_steps=3))
    assert list((tmp_path / "run").glob("result*")) == []
    assert "nothing was saved" in caught.value.sdcore_saved and "--resume" not in caught.value.sdcore_saved


def test_ctrl_c_right_after_a_step_save_keeps_that_file(tmp_path, monkeypatch):
    """--save-every 2 has just written step 2's result: the interrupt names it instead of writing it again."""
    saves = []
    real = ConvOutMethod.save

    def counting(self, bundle, info):
        saves.append(info.path.name)
        return real(self, bundle, info)

    monkeypatch.setattr(ConvOutMethod, "save", counting)
    error, weights = _interrupted(_opts(tmp_path, max_steps=5, save_every=2))
    assert saves == ["result-step00000002.safetensors"]
    assert error.sdcore_weights == tmp_path / "run" / "result-step00000002.safetensors"
    _assert_file_holds(error.sdcore_weights, weights)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failing_weights_file_never_hides_the_interrupt_nor_loses_the_state(tmp_path, monkeypatch, failure):
    """Writing the weights fails (a full disk, or a second Ctrl-C while it writes): the run still ends with the
    first interrupt, the state is kept and the summary says the file could not be written."""

    def fails(self, bundle, info):
        raise failure

    monkeypatch.setattr(ConvOutMethod, "save", fails)
    o = _opts(tmp_path, max_steps=5)
    error, _ = _interrupted(o)
    state = tmp_path / "run" / "result-state" / "step-00000002"
    assert error.sdcore_state == state and (state / "train_state.json").exists()
    assert error.sdcore_weights is None
    assert "could not be written" in error.sdcore_saved and "--resume latest" in error.sdcore_saved
    monkeypatch.undo()
    _, r = _run(dataclasses.replace(o, resume="latest"))
    assert r.steps == 5


@pytest.mark.parametrize("save_state", [True, False])
def test_a_second_ctrl_c_while_the_state_is_written_quits_saying_nothing_was_saved(tmp_path, monkeypatch, save_state):
    """Ctrl-C, then Ctrl-C again while the state is written (a big DreamBooth state takes a while): the user wants
    out. Nothing more is written (no weights file after it), the run ends with the first interrupt, and its
    summary says nothing was saved instead of a second KeyboardInterrupt that carries no summary at all."""
    from sdcore.train.checkpoints import Checkpoints

    def interrupted_again(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "save_state", interrupted_again)
    error, _ = _interrupted(_opts(tmp_path, max_steps=5, save_state=save_state))
    run = tmp_path / "run"
    if save_state:
        assert error.sdcore_saved == "interrupted again while the resumable state was written, so nothing was saved"
        assert error.sdcore_weights is None and not list(run.glob("result-step*"))
        assert getattr(error, "sdcore_state", None) is None
    else:  # no state to write: the second Ctrl-C never comes in between, and the weights are written
        assert error.sdcore_weights == run / "result-step00000002.safetensors" and error.sdcore_weights.is_file()
    assert "--resume" not in error.sdcore_saved


def test_a_failed_state_names_its_reason(tmp_path, monkeypatch):
    from sdcore.train.checkpoints import Checkpoints

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Checkpoints, "save_state", full)
    error, weights = _interrupted(_opts(tmp_path, max_steps=5))
    assert "the resumable state could not be saved (No space left on device" in error.sdcore_saved
    assert "--resume" not in error.sdcore_saved
    _assert_file_holds(error.sdcore_weights, weights)  # the weights file is still written


class _Processes:
    """An accelerator of two processes that records its barriers; ``interrupt_wait`` makes one raise Ctrl-C."""

    num_processes = 2

    def __init__(self, main, interrupt_wait=False):
        self.is_main_process, self.interrupt_wait, self.waits = main, interrupt_wait, 0

    def wait_for_everyone(self):
        self.waits += 1
        if self.interrupt_wait:
            raise KeyboardInterrupt


def _stopping_process(tmp_path, accelerator, save):
    """A session of ``accelerator``'s process, stopped after step 2, whose method writes with ``save``."""
    import contextlib

    method = types.SimpleNamespace(save=save, start_from_result=None, name="m")
    checkpoints = types.SimpleNamespace(
        last_step_result=None, final_result=None, save_info=lambda *a, **k: None, record_stopped=lambda *a: None
    )
    return types.SimpleNamespace(
        position=types.SimpleNamespace(step=2),
        _setup_done=True,
        is_main=accelerator.is_main_process,
        accelerator=accelerator,
        checkpoints=checkpoints,
        options=types.SimpleNamespace(save_state=False),
        method=method,
        output=tmp_path / "result.safetensors",
        bundle=None,
        _during=lambda phase: contextlib.nullcontext(),
        result_weights=contextlib.nullcontext,
        run_facts=lambda: None,
    )


def test_only_the_main_process_writes_the_stopped_weights_and_every_process_waits(tmp_path):
    """Under several processes the main one writes the file and the others wait for it (a launcher ending the job
    once one process exits must not cut the file off); a failing write still reaches that barrier, and a Ctrl-C
    while a process waits there ends the wait, not the first interrupt (so its summary is kept)."""
    written = []

    def save(bundle, info):
        written.append(info)
        return tmp_path / "result-step00000002.safetensors"

    def fails(bundle, info):
        raise OSError(28, "No space left on device")

    for main, save_with, interrupt_wait in [(True, save, False), (False, save, True), (True, fails, False)]:
        written.clear()
        accelerator = _Processes(main, interrupt_wait)
        session = _stopping_process(tmp_path, accelerator, save_with)
        error = KeyboardInterrupt()
        TrainSession._keep_stopped_weights(session, error, "interrupted", mixed=None, state_failed=None)
        assert accelerator.waits == 1
        assert error.sdcore_main is main
        assert len(written) == (1 if main and save_with is save else 0)
        if save_with is fails:
            assert error.sdcore_weights is None and "could not be written (No space left" in error.sdcore_saved
        else:
            assert error.sdcore_weights == (tmp_path / "result-step00000002.safetensors" if main else None)


class _NanAtStep3(ConvOutMethod):
    def compute_loss(self, ctx):
        if ctx.step == 2:
            return torch.full((ctx.noise.shape[0],), float("nan"))
        return None


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path):
    o = _opts(tmp_path, max_steps=5)
    with pytest.raises(TrainingDivergedError, match=r"step 3.*step-00000002"):
        train(_NanAtStep3(o), bundle=create_tiny_bundle("sd1"))
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "result-state" / "step-00000002" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_save_every_with_retention_and_epoch_saves(tmp_path):
    o = _opts(tmp_path, max_steps=6, save_every=2, save_limit=1)
    _, _r = _run(o)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "result-step00000004.safetensors",
        "result.safetensors",
    ]
    assert [p.name for p in (out / "result-state").iterdir() if not p.name.startswith(".")] == ["step-00000006"]
    o = _opts(tmp_path, "ep", max_steps=None, epochs=3, save_every_epochs=1, save_state=False)
    _run(o)
    names = sorted(p.name for p in (tmp_path / "ep").glob("*.safetensors"))
    # kohya's names: six-digit epoch numbers
    assert names == ["result-000001.safetensors", "result-000002.safetensors", "result.safetensors"]
    assert not (tmp_path / "ep" / "result-state").exists()
    o = _opts(tmp_path, "ep1", max_steps=None, epochs=3, save_every_epochs=1, save_limit=1, save_state=False)
    _run(o)
    names = sorted(p.name for p in (tmp_path / "ep1").glob("*.safetensors"))
    assert names == ["result-000002.safetensors", "result.safetensors"]


def _step_files(folder):
    """The intermediate step results in ``folder``, by step."""
    return sorted(int(p.stem.rsplit("step", 1)[1]) for p in folder.glob("result-step*.safetensors"))


def _recorded_names(state):
    """A train_state.json's intermediate results, by path only."""
    return [[f["path"] for f in files] for files in state["intermediate_results"]]


def test_save_limit_holds_across_a_ctrl_c_and_a_resume(tmp_path):
    """--save-every 1 --save-limit 2, Ctrl-C after step 3, --resume latest to step 5: the newest two step results
    of the whole run remain (kohya's save_last_n_steps deletes old files by their step's name, so it holds across
    resumes too). Before, the resumed run knew only its own saves and step 2's file stayed for good."""
    o = _opts(tmp_path, max_steps=5, save_every=1, save_limit=2)
    _interrupted(o, at=3)
    out = tmp_path / "run"
    assert _step_files(out) == [2, 3]
    _, r = _run(dataclasses.replace(o, resume="latest"))
    assert r.steps == 5
    assert _step_files(out) == [3, 4] and (out / "result.safetensors").is_file()


def test_a_ctrl_c_weights_file_counts_in_save_limit_across_resumes(tmp_path):
    """The weights a Ctrl-C writes between --save-every steps count among the --save-limit newest: the Ctrl-C
    itself deletes nothing, the resumed run prunes them in turn, and a resume that saves no further result
    still ends with the newest N (the oldest pruned when it starts)."""
    import json

    o = _opts(tmp_path, max_steps=9, save_every=2, save_limit=2)
    out = tmp_path / "run"
    first, _ = _interrupted(o, at=3)
    assert first.sdcore_weights == out / "result-step00000003.safetensors"
    assert _step_files(out) == [2, 3]
    sidecar = json.loads((out / "result-state" / "step-00000003" / "stopped_weights.json").read_text())
    assert sidecar["step"] == 3 and [f["path"] for f in sidecar["files"]] == ["result-step00000003.safetensors"]
    assert sidecar["files"][0]["size"] == (out / "result-step00000003.safetensors").stat().st_size
    resumed = dataclasses.replace(o, resume="latest")
    _interrupted(resumed, at=5)  # step 4 saved (step 2 pruned), then Ctrl-C writes step 5: nothing deleted by it
    assert _step_files(out) == [3, 4, 5]
    state = json.loads((out / "result-state" / "step-00000005" / "train_state.json").read_text())
    assert _recorded_names(state) == [["result-step00000003.safetensors"], ["result-step00000004.safetensors"]]
    _, r = _run(resumed)
    assert r.steps == 9
    assert _step_files(out) == [6, 8] and (out / "result.safetensors").is_file()
    # a resume with no save left: the interrupted file joins the list, the oldest goes at the start
    o = _opts(tmp_path, "short", max_steps=6, save_every=2, save_limit=2)
    _interrupted(o, at=5)
    assert _step_files(tmp_path / "short") == [2, 4, 5]
    _run(dataclasses.replace(o, resume="latest"))
    assert _step_files(tmp_path / "short") == [4, 5]


def test_the_disk_estimate_of_a_resume_counts_the_ctrl_c_file_as_the_run_keeps_it(tmp_path):
    """The pre-flight of a --resume counts the results its state recorded (the Ctrl-C's weights file included) with
    those still to come: without --save-limit the Ctrl-C file stays beside every save to the end (one result more
    than a run never stopped), with --save-limit N it is one of the N; the recorded ones still kept at the end are
    on disk already, so only the rest must be free. The run then keeps exactly what the estimate said."""
    from sdcore.train.preflight import run_preflight

    out = tmp_path / "run"
    o = _opts(tmp_path, max_steps=9, save_every=2, save_limit=0)
    fresh = run_preflight(ConvOutMethod(o), o).disk
    assert fresh is not None and fresh.intermediate_results == 4 and fresh.written_results == 0  # steps 2, 4, 6, 8
    _interrupted(o, at=3)
    assert _step_files(out) == [2, 3]
    resumed = dataclasses.replace(o, resume="latest")
    disk = run_preflight(ConvOutMethod(resumed), resumed).disk
    assert disk is not None
    assert (disk.intermediate_results, disk.written_results) == (5, 2)  # 2 and the Ctrl-C's 3 written; 4, 6, 8 to come
    assert disk.needed == disk.total - 2 * disk.result_bytes
    assert "5 intermediate results" in disk.line() and "(2 already written)" in disk.line()
    limited = dataclasses.replace(resumed, save_limit=2)  # the same state, now with a limit: the newest 2 of 5
    plan = run_preflight(ConvOutMethod(limited), limited).disk
    assert plan is not None and (plan.intermediate_results, plan.written_results) == (2, 0)  # 3 saves still to come
    _run(resumed)
    assert len(_step_files(out)) == disk.intermediate_results == 5
    o = _opts(tmp_path, "late", max_steps=9, save_every=2, save_limit=3)
    _interrupted(o, at=7)  # 2, 4, 6 and the Ctrl-C's 7; 8 still to come: 6 and 7 stay
    late = dataclasses.replace(o, resume="latest")
    disk = run_preflight(ConvOutMethod(late), late).disk
    assert disk is not None and (disk.intermediate_results, disk.written_results) == (3, 2)
    _run(late)
    assert _step_files(tmp_path / "late") == [6, 7, 8]


class FailsAtStep3(ConvOutMethod):
    """Raises in step 3, as one process of several failing alone (its save_alone path)."""

    def on_step_end(self, bundle, step):
        if step == 3:
            raise RuntimeError("failed in one process")
        return super().on_step_end(bundle, step)


def test_a_lone_processs_weights_count_in_save_limit_as_a_ctrl_c_file_does(tmp_path, monkeypatch):
    """An error that stops one process of several writes the weights alone (save_alone: no state, which needs every
    process); that file is named in the newest state's stopped_weights.json, so the run resumed from that state
    prunes it in turn, as a Ctrl-C's. Before, it stayed for good beside the --save-limit newest."""
    import json

    from accelerate import Accelerator

    out = tmp_path / "run"
    o = _opts(tmp_path, max_steps=6, save_every=2, save_limit=1)
    session = TrainSession(FailsAtStep3(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    with monkeypatch.context() as patched:
        patched.setattr(Accelerator, "num_processes", property(lambda self: 2))
        with pytest.raises(RuntimeError, match="one process"):
            session.run()
    assert _step_files(out) == [2, 3]
    sidecar = json.loads((out / "result-state" / "step-00000002" / "stopped_weights.json").read_text())
    assert sidecar["step"] == 3 and [f["path"] for f in sidecar["files"]] == ["result-step00000003.safetensors"]
    _, r = _run(dataclasses.replace(o, resume="latest"))  # adopts 2 and 3, keeps 3; step 4 replaces it
    assert r.steps == 6 and _step_files(out) == [4]


def test_a_second_stop_after_the_same_state_keeps_the_first_in_its_sidecar(tmp_path):
    """Two stops' weights noted after one state (a lone process's file, then a Ctrl-C of the run resumed from that
    state before it saved another): the sidecar keeps the first as an earlier save, and a resume counts both,
    oldest first; the same file noted again is listed once."""
    import json
    import types

    from sdcore.train.checkpoints import Checkpoints

    out = tmp_path / "run"
    state = out / "result-state" / "step-00000002"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text("{}")
    o = _opts(tmp_path, max_steps=8, save_limit=1)
    checkpoints = Checkpoints(ConvOutMethod(o), o, types.SimpleNamespace(is_main_process=True))
    first, second = out / "result-step00000003.safetensors", out / "result-step00000004.safetensors"
    first.write_bytes(b"3")
    checkpoints.record_stopped(first, state, 3)
    second.write_bytes(b"44")
    checkpoints.record_stopped(second, state, 4)
    checkpoints.record_stopped(second, state, 4)
    sidecar = json.loads((state / "stopped_weights.json").read_text())
    assert [f["path"] for f in sidecar["files"]] == [second.name]
    assert [[f["path"] for f in e["files"]] for e in sidecar["earlier"]] == [[first.name]]
    resumed = Checkpoints(ConvOutMethod(o), o, types.SimpleNamespace(is_main_process=True))
    resumed.adopt_results(state, {})
    assert resumed.saved_results == [second] and not first.exists() and second.exists()  # --save-limit 1


def test_a_lone_process_after_resuming_another_outputs_state_notes_nothing_there(tmp_path, monkeypatch):
    """A run resumed from another --output's state (same folder) whose process then fails alone writes its weights
    under its own name; the state it resumed from is not its own, so its sidecar stays unwritten: that state's run,
    resumed with --save-limit, would otherwise delete a file of another output's run."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    o = _opts(tmp_path, max_steps=4, save_every=2, save_limit=1, keep_states=0)
    _run(o)
    state = out / "result-state" / "step-00000002"
    other = dataclasses.replace(o, output=str(out / "other.safetensors"), resume=str(state))
    session = TrainSession(FailsAtStep3(other), bundle=create_tiny_bundle("sd1"))
    session.setup()
    with monkeypatch.context() as patched:
        patched.setattr(Accelerator, "num_processes", property(lambda self: 2))
        with pytest.raises(RuntimeError, match="one process"):
            session.run()
    lone = out / "other-step00000003.safetensors"
    assert lone.exists() and not (state / "stopped_weights.json").exists()
    _run(dataclasses.replace(o, resume=str(state)))  # the first run again from step 2, --save-limit 1
    assert lone.exists()


def test_a_hand_edited_sidecar_counts_nothing_and_deletes_nothing(tmp_path, caplog):
    """A stopped_weights.json whose 'earlier' is no list (edited by hand) is named in the log and counted as no
    sidecar: the resume neither fails with a traceback nor deletes the files it names."""
    import json

    from sdcore.train.checkpoints import Checkpoints

    out = tmp_path / "run"
    state = out / "result-state" / "step-00000002"
    state.mkdir(parents=True)
    o = _opts(tmp_path, max_steps=8, save_limit=1)
    checkpoints = Checkpoints(ConvOutMethod(o), o, types.SimpleNamespace(is_main_process=True))
    first, second = out / "result-step00000003.safetensors", out / "result-step00000004.safetensors"
    first.write_bytes(b"3")
    checkpoints.record_stopped(first, state, 3)
    second.write_bytes(b"44")
    checkpoints.record_stopped(second, state, 4)
    sidecar = json.loads((state / "stopped_weights.json").read_text())
    for earlier in (5, True, "result-step00000003.safetensors", {"files": sidecar["earlier"][0]["files"]}):
        (state / "stopped_weights.json").write_text(json.dumps({**sidecar, "earlier": earlier}))
        resumed = Checkpoints(ConvOutMethod(o), o, types.SimpleNamespace(is_main_process=True))
        resumed.adopt_results(state, {})
        assert resumed.saved_results == [] and first.exists() and second.exists(), earlier
    assert "unreadable" in caplog.text


def test_a_recorded_path_through_a_symlink_loop_is_skipped_not_a_traceback(tmp_path):
    """A state naming a file under a folder that is a symlink loop (edited by hand): Path.resolve raises
    RuntimeError there (Python < 3.13), which ended the resume and the pre-flight with a traceback; the entry is
    skipped like any path the run cannot vouch for."""
    import json

    from sdcore.train.checkpoints import Checkpoints

    out = tmp_path / "run"
    state = out / "result-state" / "step-00000002"
    state.mkdir(parents=True)
    (out / "a").symlink_to("b")
    (out / "b").symlink_to("a")
    mine = out / "result-step00000003.safetensors"
    mine.write_bytes(b"3")
    st = mine.lstat()
    files = [{"path": "a/x.safetensors", "size": 1, "mtime_ns": 1}]
    ok = [{"path": mine.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}]
    (state / "stopped_weights.json").write_text(json.dumps({"step": 3, "files": files, "earlier": [{"files": ok}]}))
    o = _opts(tmp_path, max_steps=8, save_limit=2)
    resumed = Checkpoints(ConvOutMethod(o), o, types.SimpleNamespace(is_main_process=True))
    resumed.adopt_results(state, {})
    assert resumed.saved_results == [mine] and mine.exists()


def test_a_ctrl_c_after_the_final_result_names_it_and_writes_no_step_copy(tmp_path, monkeypatch):
    """Ctrl-C in the moment after the final result was written (the peak line, waiting for the other processes):
    the weights of the last step are that file, so the line names it and no NAME-stepNNNNNNNN copy is written."""
    from sdcore.train.checkpoints import Checkpoints

    written = Checkpoints.save_result

    def then_interrupted(self, *args, **kwargs):
        written(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "save_result", then_interrupted)
    o = _opts(tmp_path, max_steps=3)
    with pytest.raises(KeyboardInterrupt) as caught:
        _run(o)
    out = tmp_path / "run"
    assert (out / "result.safetensors").exists() and _step_files(out) == []
    assert caught.value.sdcore_weights == out / "result.safetensors"
    assert not (out / "result-state" / "step-00000003" / "stopped_weights.json").exists()


def test_save_limit_after_a_resume_skips_files_the_user_moved_and_never_deletes_elsewhere(tmp_path):
    """Between the runs the user deleted one step result, renamed another, replaced a third with a file of their
    own under its name and put one under a pruned step's name: the resumed run counts only the recorded files
    that are still as the run wrote them (size and mtime) and never touches the others (no name pattern)."""
    import json

    o = _opts(tmp_path, max_steps=9, save_every=1, save_limit=4)
    _interrupted(o, at=5)
    out = tmp_path / "run"
    assert _step_files(out) == [2, 3, 4, 5]
    folder = out / "result-state" / "step-00000005"
    record = json.loads((folder / "train_state.json").read_text())
    assert _recorded_names(record) == [[f"result-step0000000{n}.safetensors"] for n in (2, 3, 4, 5)]
    (out / "result-step00000002.safetensors").unlink()
    (out / "result-step00000003.safetensors").rename(out / "kept.safetensors")
    replaced = out / "result-step00000004.safetensors"  # recorded, but now the user's own file
    replaced.unlink()
    replaced.write_bytes(b"the user's own file")
    mine = out / "result-step00000001.safetensors"  # the run wrote and pruned this name; now it is the user's
    mine.write_bytes(b"mine")
    _, r = _run(dataclasses.replace(o, resume="latest", save_limit=1))
    assert r.steps == 9
    # 5 adopted and pruned by 6, 6 by 7, 7 by 8 (the limit now 1); 1 and 4 are the user's
    assert _step_files(out) == [1, 4, 8]
    assert mine.read_bytes() == b"mine" and replaced.read_bytes() == b"the user's own file"
    assert (out / "kept.safetensors").is_file()


def _hand_edited(tmp_path, entries, *, output=None, sidecar=None):
    """Checkpoints of a --save-limit 1 run adopting a state of ``run/result`` whose list is ``entries``: the
    results it would keep. Each entry names a file as the run records it, with that file's true size and mtime
    when it exists (so only the path decides)."""
    import json
    import types

    from sdcore.train.checkpoints import Checkpoints

    out = tmp_path / "run"
    folder = out / "result-state" / "step-00000004"
    folder.mkdir(parents=True, exist_ok=True)

    def as_recorded(item):
        if not isinstance(item, str):
            return item
        st = (out / item).lstat() if os.path.lexists(out / item) else None
        return {"path": item, "size": st.st_size if st else 0, "mtime_ns": st.st_mtime_ns if st else 0}

    recorded = entries
    if isinstance(entries, list):
        recorded = [[as_recorded(i) for i in e] if isinstance(e, list) else e for e in entries]
    (folder / "stopped_weights.json").unlink(missing_ok=True)
    if sidecar is not None:
        (folder / "stopped_weights.json").write_text(json.dumps({"step": 4, "files": [as_recorded(sidecar)]}))
    o = _opts(tmp_path, max_steps=8, save_limit=1, output=str(output or out / "result.safetensors"))
    checkpoints = Checkpoints(ConvOutMethod(o), o, types.SimpleNamespace(is_main_process=True))
    checkpoints.adopt_results(folder, {"intermediate_results": recorded})
    return checkpoints


def test_a_hand_edited_state_never_makes_the_run_delete_what_it_did_not_write(tmp_path):
    """train_state.json / stopped_weights.json edited by hand (or written on Windows and read here): paths outside
    the result's folder, through a link out of it, Windows spellings, the folder itself, the result, the state or
    samples folder, junk values: none is adopted, nothing is deleted; only the plain step file that is the run's
    is kept (one, with --save-limit 1)."""
    out = tmp_path / "run"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"not the run's")
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "linked.safetensors").symlink_to(outside / "x.safetensors")
    (out / "result.safetensors").write_bytes(b"the result")
    (out / "result-samples").mkdir()
    (out / "result-samples" / "s.png").write_bytes(b"png")
    (out / "data").mkdir()
    (out / "data" / "img.png").write_bytes(b"png")
    for n in (3, 4):
        (out / f"result-step0000000{n}.safetensors").write_bytes(b"step")
    hostile = [
        ["../elsewhere/x.safetensors"],
        [str(outside / "x.safetensors")],
        ["link/x.safetensors"],
        ["link"],
        ["."],
        [""],
        [{"path": "data", "size": 4096, "mtime_ns": 1}],  # a path typed in by hand: not the file the run wrote
        ["data/../data"],
        ["..\\elsewhere\\x.safetensors"],
        ["C:/elsewhere/x.safetensors"],
        ["C:x.safetensors"],
        ["\\\\server\\share\\x.safetensors"],
        ["result.safetensors"],
        ["result-state"],
        ["result-state/step-00000004/train_state.json"],
        ["result-samples/s.png"],
        ["result-samples"],
        "junk",
        [7, None, {"path": "result-step00000003.safetensors"}],  # no size/mtime: not adopted
        ["result-step00000003.safetensors"],
    ]
    checkpoints = _hand_edited(tmp_path, hostile, sidecar="result-step00000004.safetensors")
    # the one kept: step 4 (from the sidecar); step 3 was pruned, it being a plain step file with its fingerprint
    assert checkpoints.saved_results == [out.absolute() / "result-step00000004.safetensors"]
    assert not (out / "result-step00000003.safetensors").exists()
    assert (outside / "x.safetensors").read_bytes() == b"not the run's"
    assert (out / "link").is_symlink() and (out / "data" / "img.png").is_file()
    assert (out / "result.safetensors").is_file() and (out / "result-samples" / "s.png").is_file()
    assert (out / "result-state" / "step-00000004").is_dir()
    # a link recorded as a result (the run never writes one, but it may be listed by hand): left, not followed
    checkpoints = _hand_edited(tmp_path, [["linked.safetensors"], ["result-step00000004.safetensors"]])
    assert checkpoints.saved_results == [out.absolute() / "result-step00000004.safetensors"]
    assert (out / "linked.safetensors").is_symlink()
    assert (outside / "x.safetensors").read_bytes() == b"not the run's"
    # a record that is no list at all (a number, a dict) is ignored, not a traceback
    for junk in (5, {"a": 1}, "text"):
        assert _hand_edited(tmp_path, junk).saved_results == []  # type: ignore[arg-type]


def test_a_resume_into_another_output_adopts_nothing(tmp_path):
    """--resume of one run's state with another --output (in the same folder or elsewhere): the recorded names
    are not this result's, whoever wrote the files under them there; nothing earlier is pruned."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "result-step00000003.safetensors").write_bytes(b"step")
    (out / "other-step00000003.safetensors").write_bytes(b"another run's")
    for output in (out / "other.safetensors", tmp_path / "moved" / "result.safetensors"):
        checkpoints = _hand_edited(
            tmp_path, [["result-step00000003.safetensors"], ["other-step00000003.safetensors"]], output=output
        )
        assert checkpoints.saved_results == []
    assert (out / "result-step00000003.safetensors").is_file() and (out / "other-step00000003.safetensors").is_file()


def test_a_state_without_the_results_list_still_resumes(tmp_path):
    """A state written before the list existed (no intermediate_results, no sidecar): the run resumes, prunes only
    what it writes itself and leaves the earlier results."""
    import json

    o = _opts(tmp_path, max_steps=6, save_every=1, save_limit=2)
    _interrupted(o, at=3)
    out = tmp_path / "run"
    for state in (out / "result-state").iterdir():
        path = state / "train_state.json"
        record = json.loads(path.read_text())
        del record["intermediate_results"]
        path.write_text(json.dumps(record))
        (state / "stopped_weights.json").unlink(missing_ok=True)
    _, r = _run(dataclasses.replace(o, resume="latest"))
    assert r.steps == 6
    assert _step_files(out) == [2, 3, 4, 5]


def test_save_limit_deletes_every_file_a_save_wrote(tmp_path, monkeypatch):
    """A method whose save writes a companion (TI's --format copy, APT's -neg pair) names it in saved_files:
    retention deletes both, within a run and after a resume (the state records the pair)."""
    from safetensors.torch import save_file

    real = ConvOutMethod.save

    def with_companion(self, bundle, info):
        path = real(self, bundle, info)
        save_file({"x": torch.zeros(1)}, str(path.with_name(path.stem + "-extra.safetensors")))
        return path

    monkeypatch.setattr(ConvOutMethod, "save", with_companion)
    monkeypatch.setattr(
        ConvOutMethod, "saved_files", lambda self, path: [path, path.with_name(path.stem + "-extra.safetensors")]
    )
    o = _opts(tmp_path, max_steps=5, save_every=1, save_limit=1)
    _interrupted(o, at=2)
    out = tmp_path / "run"
    names = sorted(p.name for p in out.glob("result-step*"))
    assert names == ["result-step00000002-extra.safetensors", "result-step00000002.safetensors"]
    _run(dataclasses.replace(o, resume="latest"))
    names = sorted(p.name for p in out.glob("result-step*"))
    assert names == ["result-step00000004-extra.safetensors", "result-step00000004.safetensors"]


def test_output_folder_gets_method_name_and_metadata(tmp_path):
    o = _opts(tmp_path, max_steps=1, output=str(tmp_path / "outdir"))
    _, r = _run(o)
    assert r.output == tmp_path / "outdir" / "convout.safetensors"
    from safetensors import safe_open

    with safe_open(str(r.output), "pt") as f:
        meta = f.metadata()
    assert meta["sdcore_method"] == "convout" and meta["sdcore_family"] == "sd1"
    # kohya's ss_* keys belong to the LoRA plugin (sdplugin_lora.method.kohya_training_metadata)
    assert not [k for k in meta if k.startswith("ss_")]


def test_sample_images_are_rendered_into_a_grid(tmp_path, monkeypatch):
    from PIL import Image

    calls = []

    def fake_generate(bundle, prompts, **kw):
        calls.append((list(prompts), kw))
        return [Image.new("RGB", (kw["width"], kw["height"]), (i * 40, 0, 0)) for i, _ in enumerate(prompts)]

    module = types.ModuleType("sdcore.generate.pipeline")
    module.generate_images = fake_generate
    module.sampler_id = lambda name: name
    monkeypatch.setitem(sys.modules, "sdcore.generate.pipeline", module)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red thing\n# comment\n\na blue thing\n", encoding="utf-8")
    _run(_opts(tmp_path, max_steps=4, sample_every=2, sample_prompts=str(prompts), sample_steps=3))
    assert [c[0] for c in calls] == [["a red thing", "a blue thing"]] * 2
    assert calls[0][1]["steps"] == 3
    grid = Image.open(tmp_path / "run" / "result-samples" / "step00000004.png")
    assert grid.size == (128, 64)


def test_kohya_sample_prompt_options_reach_the_sampler_not_the_prompt(tmp_path, monkeypatch):
    from PIL import Image

    calls = []

    def fake_generate(bundle, prompts, **kw):
        calls.append((list(prompts), kw))
        return [Image.new("RGB", (kw["width"], kw["height"])) for _ in prompts]

    module = types.ModuleType("sdcore.generate.pipeline")
    module.generate_images = fake_generate
    module.sampler_id = lambda name: name
    monkeypatch.setitem(sys.modules, "sdcore.generate.pipeline", module)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red thing --n blurry --w 96 --h 32 --s 2 --d 5 --l 4.5 --ss euler\na blue thing\n")
    o = _opts(tmp_path, max_steps=None, epochs=3, sample_every_epochs=1, sample_prompts=str(prompts), sample_steps=3)
    _run(o)
    red = [c for c in calls if c[0] == ["a red thing"]]
    blue = [c for c in calls if c[0] == ["a blue thing"]]
    assert len(red) == len(blue) == 3  # epochs 1 and 2, then the final render
    kw = red[0][1]
    assert (kw["negative_prompt"], kw["width"], kw["height"], kw["steps"], kw["seed"], kw["cfg"], kw["sampler"]) == (
        ["blurry"],
        96,
        64,  # kohya's sample rule: down to a multiple of 8, at least 64 (sdcore.train.sample_prompts.SIZE_RULES)
        2,
        5,
        4.5,
        "euler",
    )
    kw = blue[0][1]
    assert (kw["steps"], kw["seed"], kw["sampler"], kw["cfg"]) == (3, o.seed + 1, "euler_a", 7.0)  # the family default
    folder = tmp_path / "run" / "result-samples"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch000001.png", "epoch000002.png", "final.png"]


class _PixelMethod(ConvOutMethod):
    def capabilities(self) -> Capabilities:
        return replace(super().capabilities(), needs_pixels=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"output": ""}, "no output given"),
        ({"mixed_precision": "fp16"}, "fp16 needs a CUDA GPU"),
        ({"cache_latents": False, "cache_latents_to_disk": True}, "needs --cache-latents"),
        ({"sample_every": 5}, "needs --sample-prompts"),
        ({"optimizer": "adamw8bit"}, "bitsandbytes"),
        ({"caption_dropout": 1.5}, "between 0 and 1"),
        ({"batch_size": 0}, "at least 1"),
    ],
)
def test_config_conflicts_fail_before_loading_a_model(tmp_path, monkeypatch, overrides, message):
    import importlib.util

    if overrides.get("mixed_precision") == "fp16" and torch.cuda.is_available():
        pytest.skip("has a GPU")
    if overrides.get("optimizer") == "adamw8bit" and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes installed")
    import sdcore.train.loop as loop

    monkeypatch.setattr(loop, "load_bundle", lambda o: pytest.fail("model loaded before validation"))
    o = _opts(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        train(ConvOutMethod(o))


def test_pixel_methods_get_pixels_and_refuse_latent_caching(tmp_path):
    o = _opts(tmp_path)
    with pytest.raises(ConfigError, match="--no-cache-latents"):
        train(_PixelMethod(o))
    o = _opts(tmp_path, cache_latents=False)
    s = TrainSession(_PixelMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    assert batch.pixels.shape == (2, 3, 64, 64) and batch.pixels.min() >= -1 and batch.pixels.max() <= 1


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    plain, _ = _run(_opts(tmp_path, "a", max_steps=2, train_text_norm=True))
    ckpt_bundle = create_tiny_bundle("sd1")
    ckpt, _ = _run(_opts(tmp_path, "b", max_steps=2, train_text_norm=True, gradient_checkpointing=True), ckpt_bundle)
    assert ckpt_bundle.unet.is_gradient_checkpointing
    sa, sb = plain.trainable_state_dict(), ckpt.trainable_state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


class _FullPrecisionBase(ConvOutMethod):
    def capabilities(self) -> Capabilities:
        return replace(super().capabilities(), cast_frozen_weights=False)


def test_methods_can_keep_frozen_weights_in_full_precision(tmp_path):
    o = _opts(tmp_path, max_steps=1, mixed_precision="bf16")
    bundle = create_tiny_bundle("sd1")
    train(_FullPrecisionBase(o), bundle=bundle)
    assert bundle.unet.conv_in.weight.dtype == torch.float32
    assert bundle.vae.encoder.conv_in.weight.dtype == torch.float32


def test_tensorboard_logs(tmp_path):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "logs"
    _run(_opts(tmp_path, max_steps=2, log_dir=str(logs)))
    assert list(logs.rglob("events.out.tfevents.*"))


def test_resume_with_changed_batch_size_warns(tmp_path, capsys):
    o = _opts(tmp_path, max_steps=2)
    _run(o)
    _, r = _run(dataclasses.replace(o, resume="latest", max_steps=3, batch_size=1, progress=True))
    assert r.steps == 3
    assert "resuming with changed batch_size" in capsys.readouterr().err


def test_resume_of_a_non_square_kohya_resolution_does_not_warn(tmp_path, capsys, caplog):
    """kohya's --resolution W,H is kept as the tuple resolution_size; the state records it as a JSON list, so the
    resume compares the options as the state records them (a tuple against the list would warn on every resume)."""
    o = _opts(tmp_path, max_steps=2, resolution=78, resolution_size=(96, 64), buckets=False)
    _run(o)
    _run(dataclasses.replace(o, resume="latest", max_steps=3, progress=True))
    assert "resuming with changed" not in capsys.readouterr().err + caplog.text
    _run(dataclasses.replace(o, resume="latest", max_steps=4, resolution=80, resolution_size=(100, 64), progress=True))
    said = capsys.readouterr().err
    assert "warning: resuming with changed resolution (78 -> 80), resolution_size ([96, 64] -> [100, 64])" in said
    assert said.count("resuming with changed") == 1  # once, with its values (a log warning printed it twice)


def test_resume_errors_are_clear(tmp_path):
    o = _opts(tmp_path, max_steps=1, resume="latest")
    with pytest.raises(ConfigError, match="no saved state"):
        _run(o)
    o = _opts(tmp_path, max_steps=1, resume=str(tmp_path))
    with pytest.raises(ConfigError, match="not a training state folder"):
        _run(o)


def test_real_sample_images_during_training(tmp_path):
    pytest.importorskip("sdcore.generate.pipeline")
    from PIL import Image

    _run(_opts(tmp_path, max_steps=2, sample_every=2, sample_prompts="tiny, red stripes", sample_steps=2))
    grid = Image.open(tmp_path / "run" / "result-samples" / "step00000002.png")
    assert grid.size == (64, 64)


def test_a_failing_plugin_hook_is_named_and_the_state_saved(tmp_path):
    from sdcore.errors import PluginError

    class Broken:
        def sdcore_on_train_step(self, context, step, logs):
            if step == 2:
                raise RuntimeError("boom")

    pm = plugin_manager_with()
    pm.register(Broken(), name="broken")
    pm.register(_Recorder(), name="recorder")
    with pytest.raises(PluginError, match=r"plugin 'broken' failed in sdcore_on_train_step: boom"):
        _run(_opts(tmp_path, max_steps=4), plugin_manager=pm)
    assert (tmp_path / "run" / "result-state" / "step-00000002" / "train_state.json").exists()


def test_sigterm_saves_a_resumable_state(tmp_path):
    import os
    import signal

    class Term:
        def sdcore_on_train_step(self, context, step, logs):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        _run(_opts(tmp_path, max_steps=3), plugin_manager=plugin_manager_with(Term()))
    assert (tmp_path / "run" / "result-state" / "step-00000001" / "train_state.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_caption_variants_change_between_epochs(tmp_path):
    data = make_tiny_dataset(tmp_path / "tags", n=2)
    (data / "1_tiny" / "img00.txt").write_text("a, b, c, d, e, f", encoding="utf-8")
    o = _opts(tmp_path, max_steps=1, shuffle_caption=True, caption_variants=4, data=str(data))
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    chosen = set()
    for epoch in range(12):
        for refs in s.data.epoch_plan(epoch):
            for ref in refs:
                if ref.entry == 0:
                    chosen.add(s.text_cache.choose(0, ref.seed(o.seed, "caption")))
    assert len(set(s.text_cache.variants[0])) == 4
    assert len(chosen) >= 3 and chosen <= set(s.text_cache.variants[0])


def test_output_path_rules(tmp_path):
    from sdcore.train.loop import intermediate_path, output_paths

    m = ConvOutMethod(_opts(tmp_path))
    assert output_paths(m, _opts(tmp_path, output=str(tmp_path / "a.safetensors"))) == (
        tmp_path / "a.safetensors",
        tmp_path / "a-state",
    )
    assert output_paths(m, _opts(tmp_path, output=str(tmp_path / "dir")))[0] == tmp_path / "dir" / "convout.safetensors"
    assert output_paths(m, _opts(tmp_path, output=str(tmp_path / "x.pt")))[0] == tmp_path / "x.pt"
    assert intermediate_path(tmp_path / "a.safetensors", step=7) == tmp_path / "a-step00000007.safetensors"
    assert intermediate_path(tmp_path / "model", epoch=2) == tmp_path / "model-000002"
    assert intermediate_path(tmp_path / "a.safetensors", epoch=12) == tmp_path / "a-000012.safetensors"
    assert intermediate_path(tmp_path / "a.safetensors", step=1234) == tmp_path / "a-step00001234.safetensors"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cached_text_outputs_equal_direct_encoding(tmp_path, family):
    from sdcore.models.text import encode_prompts

    data = make_tiny_dataset(tmp_path / "long", n=3)
    (data / "1_tiny" / "img01.txt").write_text(", ".join(f"tag{i}" for i in range(40)), encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(data), "max_steps": 1}, family=family)
    bundle = create_tiny_bundle(family)
    s = TrainSession(ConvOutMethod(o), bundle=bundle)
    s.setup()
    prompts = [s.text_cache.variants[i][0] for i in range(3)]
    with torch.no_grad():
        direct = encode_prompts(bundle, prompts)
    cached = s.text_cache.batch(prompts)
    assert cached.hidden_states.shape == direct.hidden_states.shape and direct.hidden_states.shape[1] == 77 * 2
    assert torch.allclose(cached.hidden_states, direct.hidden_states, atol=1e-5)
    if family == "sdxl":
        assert torch.allclose(cached.pooled, direct.pooled, atol=1e-5)


def test_a_corrupt_latent_cache_file_is_re_encoded(tmp_path):
    data = make_tiny_dataset(tmp_path / "corrupt", n=2)
    o = _opts(tmp_path, data=str(data), max_steps=1, cache_latents_to_disk=True)
    _run(o)
    files = sorted((data / "1_tiny").glob("*.sdcore.npz"))
    files[0].write_bytes(b"PK\x03\x04 not really a zip")
    bundle = create_tiny_bundle("sd1")
    calls = _count_vae_encodes(bundle)
    _run(dataclasses.replace(o, output=str(tmp_path / "again" / "x.safetensors")), bundle)
    assert calls["n"] == 1
    import numpy as np

    with np.load(files[0]) as reread:
        assert reread["latents"].shape == (4, 8, 8)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_planted_pickle_in_a_state_is_refused_and_nothing_runs(tmp_path):
    import pickle

    from sdcore.errors import UnsafeFileError

    o = _opts(tmp_path, max_steps=1)
    _run(o)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os_system_proxy, (f"touch {marker}",))

    import os

    os_system_proxy = os.system
    state = tmp_path / "run" / "result-state" / "step-00000001"
    with open(state / "optimizer.pt", "wb") as handle:
        pickle.dump(Evil(), handle)
    with pytest.raises(UnsafeFileError, match=r"optimizer\.pt"):
        _run(dataclasses.replace(o, resume="latest", max_steps=2))
    assert not marker.exists()


def test_uncached_images_are_prefetched_in_background_threads(tmp_path, monkeypatch):
    import threading

    import sdcore.train.data as runtime_data

    threads = []
    original = runtime_data.load_pixels

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime_data, "load_pixels", recording)
    cached, _ = _run(_opts(tmp_path, "a", max_steps=4, batch_size=1))
    fresh, _ = _run(_opts(tmp_path, "b", max_steps=4, batch_size=1, cache_latents=False))
    assert any(name.startswith("sdcore-prefetch") for name in threads)
    sa, sb = cached.trainable_state_dict(), fresh.trainable_state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_run_method_contract_helper_and_a_method_that_does_not_learn(tmp_path, monkeypatch):
    """``run_method_contract`` (for plugins without pytest classes) runs every check in order, each in its
    own folder, with the overrides; the checks themselves run in TestConvOutContract above."""
    from sdcore.testing import contract

    calls = []
    names = ("check_config_roundtrip", "check_one_step", "check_learning", "check_save_load", "check_resume",
             "check_determinism")  # fmt: skip

    def recorder(name):
        def check(cls, folder, overrides, *, family):
            calls.append((name, cls, folder, overrides, family))

        check.__name__ = name  # the helper names each check's folder after it
        return check

    for name in names:
        monkeypatch.setattr(contract, name, recorder(name))
    contract.run_method_contract(ConvOutMethod, {"train_text_norm": True}, tmp_path=tmp_path / "ok")
    assert [c[0] for c in calls] == list(names)
    assert all(c[1] is ConvOutMethod and c[3] == {"train_text_norm": True} and c[4] == "sd1" for c in calls)
    assert [c[2] for c in calls] == [tmp_path / "ok" / name for name in names] and all(c[2].is_dir() for c in calls)

    class Lazy(ConvOutMethod):
        def prepare(self, bundle):
            groups = super().prepare(bundle)
            for g in groups:
                g["lr"] = 1e-12
            return groups

    with pytest.raises(AssertionError, match="did not learn"):
        check_learning(Lazy, tmp_path / "lazy", steps=5)


def test_the_resume_contract_fails_a_ctrl_c_that_keeps_no_weights_or_other_ones(tmp_path, monkeypatch):
    """check_resume holds every method's Ctrl-C to the files its --save-every writes at that step."""
    from sdcore.testing.contract import check_resume

    def keeps_nothing(self, exc, why, **kwargs):
        exc.sdcore_weights, exc.sdcore_saved = None, "nothing"

    with monkeypatch.context() as patched:
        patched.setattr(TrainSession, "_keep_stopped_weights", keeps_nothing)
        with pytest.raises(AssertionError, match="Ctrl-C after step 2 wrote no weights file"):
            check_resume(ConvOutMethod, tmp_path / "none")

    class Stale(ConvOutMethod):  # writes the weights it started with instead of those of the step
        def save(self, bundle, info):
            if info.final or info.path.parent.name != "parts":
                return super().save(bundle, info)
            from safetensors.torch import save_file

            save_file({k: torch.zeros_like(v) for k, v in self.trainable_state_dict().items()}, str(info.path))
            return info.path

    with pytest.raises(AssertionError, match="differs from --save-every's file"):
        check_resume(Stale, tmp_path / "stale")


def test_resume_warns_when_the_guidance_the_run_trains_at_changes(tmp_path, capsys, caplog):
    """--guidance-scale (the value FLUX.1 dev's guidance embedding gets: what the run learns to predict at) compared
    as the run resolves it (:func:`sdcore.train.objectives.training_guidance`): a state saved when the option's
    default was the number 1.0 resumes without a word on a run that gives none (it trains at 1.0 still), but a
    control-LoRA state saved then (1.0) resumes at 30 now, and a changed given value warns as the other options do."""
    from sdcore.train.checkpoints import resumed_guidance_change

    o = _opts(tmp_path, max_steps=2, guidance_scale=1.0)  # as every state saved before the default became None
    _run(o)
    _run(dataclasses.replace(o, resume="latest", max_steps=3, guidance_scale=None, progress=True))
    assert "resuming with changed" not in capsys.readouterr().err
    _run(dataclasses.replace(o, resume="latest", max_steps=4, guidance_scale=3.5, progress=True))
    assert "warning: resuming with changed guidance_scale (1 -> 3.5)" in capsys.readouterr().err

    unset = dataclasses.replace(o, guidance_scale=None)
    assert resumed_guidance_change({"guidance_scale": 1.0}, unset, control=True) == (1.0, 30.0)
    assert resumed_guidance_change({"guidance_scale": None}, unset, control=True) is None
    assert resumed_guidance_change({"guidance_scale": 30.0}, unset, control=True) is None
    assert resumed_guidance_change({}, unset, control=True) is None  # no record: nothing to compare


class FailsAtStep3Alone(FailsAtStep3):
    """Raises in step 3 of a one-process run."""


def test_a_failure_without_a_state_still_writes_the_trained_weights(tmp_path, capsys):
    """--no-save-state (and a kohya run without save_state, sd-scripts' default): an error keeps the weights after
    the last finished step, as Ctrl-C does; without this the steps trained were lost."""
    out = tmp_path / "run"
    o = _opts(tmp_path, max_steps=6, save_state=False)
    session = TrainSession(FailsAtStep3Alone(o), bundle=create_tiny_bundle("sd1"))
    with pytest.raises(RuntimeError, match="one process"):
        session.run()
    written = out / "result-step00000003.safetensors"
    assert _step_files(out) == [3] and not (out / "result-state").exists()
    assert f"error: the weights after step 3 are in {written} (no resumable state)" in capsys.readouterr().err
    # with a state (sdcore's default) the state holds them: no extra file
    o = _opts(tmp_path, "withstate", max_steps=6)
    session = TrainSession(FailsAtStep3Alone(o), bundle=create_tiny_bundle("sd1"))
    with pytest.raises(RuntimeError, match="one process"):
        session.run()
    assert _step_files(tmp_path / "withstate") == []
