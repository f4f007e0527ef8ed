"""--ema: an exponential moving average of the trained weights (sdcore.train.ema).

The expected averages are computed here by a hand-written loop over the raw weights each step left,
with the decay rules rewritten from the references: OneTrainer's EMAModuleWrapper.get_current_decay
``min((1 + optimization_step) / (10 + optimization_step), decay)`` with optimization_step = the optimizer
steps before this one, and its update only when ``(optimization_step + 1) % interval == 0``; diffusers'
EMAModel.get_decay (0 at the first step, then the same curve); ai-toolkit's ExponentialMovingAverage
without use_num_updates (the decay itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from runtime_methods import ConvOutMethod
from safetensors import safe_open
from safetensors.torch import load_file
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options, plugin_manager_with
from sdcore.testing.distributed import check_processes_equal_accumulation, torchrun_command
from sdcore.train.loop import TrainSession

KEYS = ("unet_conv_out.weight", "unet_conv_out.bias")  # ConvOutMethod's trained tensors, in parameter order


class Recording(ConvOutMethod):
    """ConvOutMethod that records its raw weights at the start and after every step."""

    def prepare(self, bundle):
        groups = super().prepare(bundle)
        self.raw = [self.trainable_state_dict()]
        return groups

    def on_step_end(self, bundle, step):
        self.raw.append(self.trainable_state_dict())
        return super().on_step_end(bundle, step)


def reference_decay(n: int, decay: float, warmup: str) -> float:
    """The decay of the update after optimizer step n (1-based), as each reference computes it."""
    if warmup == "none":  # ai-toolkit
        return decay
    optimization_step = n - 1  # OneTrainer: global_step // accumulation, read before the step counts
    if warmup == "diffusers" and optimization_step <= 0:  # diffusers: max(0, n - update_after_step - 1) <= 0
        return 0.0
    return min((1 + optimization_step) / (10 + optimization_step), decay)


def reference_ema(raw, *, decay, every=1, warmup="onetrainer", skipped=()):
    """The averages after each step (index = step) by a plain loop: s = d * s + (1 - d) * w."""
    s = {k: v.clone() for k, v in raw[0].items()}
    history = [dict(s)]
    for n in range(1, len(raw)):
        optimization_step = n - 1  # OneTrainer updates when (optimization_step + 1) % interval == 0
        if (optimization_step + 1) % every == 0 and n not in skipped:
            d = reference_decay(n, decay, warmup)
            s = {k: d * s[k] + (1 - d) * raw[n][k] for k in s}
        history.append(dict(s))
    return history


def _close(a, b):
    for k in KEYS:
        torch.testing.assert_close(a[k], b[k], rtol=2e-6, atol=1e-7)


def _equal(a, b):
    assert all(torch.equal(a[k], b[k]) for k in KEYS)


def _shadow(session):
    return dict(zip(KEYS, session.ema.shadow, strict=True))


@contextlib.contextmanager
def _spy_sampler():
    """A fake image generator recording the conv_out weights the sampler sees."""
    from PIL import Image

    seen: list[dict[str, torch.Tensor]] = []

    def generate_images(bundle, prompts, **kw):
        conv = bundle.unet.conv_out
        seen.append({KEYS[0]: conv.weight.detach().clone(), KEYS[1]: conv.bias.detach().clone()})
        return [Image.new("RGB", (kw["width"], kw["height"])) for _ in prompts]

    module = types.ModuleType("sdcore.generate.pipeline")
    module.generate_images = generate_images
    module.sampler_id = lambda name: name
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "sdcore.generate.pipeline", module)
        yield seen


def _session(options, method_class=Recording, **kw):
    return TrainSession(method_class(options), bundle=create_tiny_bundle("sd1"), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step run (save every 2 steps, samples every 2) with --ema (decay 0.9, update every 2)
    and without it."""
    root = tmp_path_factory.mktemp("ema")
    prompts = root / "prompts.txt"
    prompts.write_text("a red thing\n", encoding="utf-8")
    out = {}
    for name, ema in (("on", True), ("off", False)):
        o = contract_options(Recording, root, {"max_steps": 4, "save_every": 2, "sample_every": 2,
                                               "sample_prompts": str(prompts), "ema": ema, "ema_decay": 0.9,
                                               "ema_update_every": 2}, tag=name)  # fmt: skip
        with _spy_sampler() as seen:
            session = _session(o)
            result = session.run()
        out[name] = types.SimpleNamespace(session=session, result=result, seen=seen, options=o)
    return out


def test_decay_rules_follow_the_references():
    from sdcore.train.ema import ema_decay_at

    for n in range(1, 40):
        for warmup in ("onetrainer", "diffusers", "none"):
            assert ema_decay_at(n, 0.999, warmup) == pytest.approx(reference_decay(n, 0.999, warmup), abs=1e-15)
    assert ema_decay_at(1, 0.999) == pytest.approx(0.1)  # OneTrainer's first update keeps 10% of the start
    assert ema_decay_at(1, 0.999, "diffusers") == 0.0  # diffusers' first update copies the weights
    assert ema_decay_at(2, 0.999, "diffusers") == pytest.approx(2 / 11)
    assert ema_decay_at(10_000, 0.999) == 0.999 and ema_decay_at(1, 0.5, "none") == 0.5


def test_average_follows_the_formula_and_update_interval(runs):
    on = runs["on"]
    raw = on.session.method.raw
    assert len(raw) == 5
    expected = reference_ema(raw, decay=0.9, every=2)
    _close(_shadow(on.session), expected[4])
    assert not torch.equal(expected[1][KEYS[0]], raw[1][KEYS[0]])  # step 1 updated nothing: still the start
    _equal(expected[1], raw[0])
    # after the run the model holds the raw weights again, bit for bit
    _equal(on.session.method.trainable_state_dict(), raw[4])


def test_raw_trajectory_is_unchanged_by_ema(runs):
    on, off = runs["on"].session, runs["off"].session
    assert on.losses == off.losses
    for a, b in zip(on.method.raw, off.method.raw, strict=True):
        _equal(a, b)
    assert off.ema is None


def test_saved_results_and_samples_hold_the_average(runs):
    on, off = runs["on"], runs["off"]
    expected = reference_ema(on.session.method.raw, decay=0.9, every=2)
    folder = Path(on.options.output).parent
    final = load_file(str(on.result.output))
    _equal(final, _shadow(on.session))  # the final result is the average itself
    _close(load_file(str(folder / "result-step00000002.safetensors")), expected[2])
    # the sampler saw the average at steps 2 and 4; without --ema the raw weights
    assert len(on.seen) == 2
    _close(on.seen[0], expected[2])
    _equal(on.seen[1], final)
    _equal(off.seen[1], off.session.method.raw[4])
    meta = safe_open(str(on.result.output), "pt").metadata()
    assert (meta["sdcore_ema_decay"], meta["sdcore_ema_update_every"], meta["sdcore_ema_warmup"]) == ("0.9", "2",
                                                                                                      "onetrainer")  # fmt: skip
    plain = safe_open(str(off.result.output), "pt").metadata()
    assert not any(k.startswith("sdcore_ema") for k in plain)
    # the state keeps the raw weights and the average apart
    state = Path(on.result.last_state)
    _equal(load_file(str(state / "trainable.safetensors")), on.session.method.raw[4])
    ema = load_file(str(state / "ema.safetensors"))
    _equal({KEYS[0]: ema["ema.0"], KEYS[1]: ema["ema.1"]}, final)
    assert not (Path(off.result.last_state) / "ema.safetensors").exists()


def test_interrupted_and_resumed_run_ends_with_the_same_average(runs, tmp_path):
    straight = runs["on"]

    class Stop:
        def sdcore_on_train_step(self, context, step, logs):
            if step == 2:
                raise KeyboardInterrupt

    o = dataclasses.replace(straight.options, output=str(tmp_path / "run" / "result.safetensors"))
    with _spy_sampler(), pytest.raises(KeyboardInterrupt):
        _session(o, plugin_manager=plugin_manager_with(Stop())).run()
    assert (tmp_path / "run" / "result-state" / "step-00000002" / "ema.safetensors").exists()
    with _spy_sampler():
        resumed = _session(dataclasses.replace(o, resume="latest"))
        result = resumed.run()
    _equal(_shadow(resumed), _shadow(straight.session))
    _equal(load_file(str(result.output)), load_file(str(straight.result.output)))
    _equal(resumed.method.trainable_state_dict(), straight.session.method.raw[4])


@pytest.mark.parametrize("name", ["ema.safetensors", "trainable.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_state_file_is_a_one_line_error(runs, tmp_path, name, damage):
    """safetensors raises its own SafetensorError (an Exception, not a ValueError) on a damaged file:
    the resume must still end in a ConfigError naming the state, never a traceback."""
    import shutil

    from sdcore.errors import ConfigError

    on = runs["on"]
    state = tmp_path / "state"
    shutil.copytree(on.result.last_state, state)
    target = state / name
    target.write_bytes(target.read_bytes()[:100] if damage == "truncated" else b"garbage")
    o = dataclasses.replace(on.options, output=str(tmp_path / "out" / "result.safetensors"), resume=str(state))
    with _spy_sampler(), pytest.raises(ConfigError, match="unreadable") as caught:
        _session(o).run()
    assert str(state) in str(caught.value)


def test_resume_must_keep_the_ema_settings(runs):
    from sdcore.train.preflight import resume_problems

    on, off = runs["on"], runs["off"]
    state = str(on.result.last_state)
    method = Recording(on.options)
    assert resume_problems(method, dataclasses.replace(on.options, resume=state), Path(state)) == []
    assert resume_problems(method, dataclasses.replace(on.options, resume=state, ema_device="cpu"), Path(state)) == []
    (problem,) = resume_problems(method, dataclasses.replace(on.options, resume=state, ema_decay=0.99), Path(state))
    assert "--ema-decay 0.9 -> 0.99" in problem and state in problem
    (problem,) = resume_problems(method, dataclasses.replace(on.options, resume=state, ema_update_every=1), Path(state))
    assert "--ema-update-every 2 -> 1" in problem
    plain = str(off.result.last_state)  # a state without an average cannot continue one
    (problem,) = resume_problems(method, dataclasses.replace(on.options, resume=plain), Path(plain))
    assert "--ema False -> True" in problem


def test_a_skipped_optimizer_step_is_not_averaged(tmp_path, monkeypatch):
    """fp16's grad scaler skips steps with inf/NaN gradients (accelerate's step_was_skipped); the
    average moves only after steps that stepped."""
    import sdcore.train.step as step_module

    real = step_module.optimizer_step

    def optimizer_step(group, *, step, **kw):
        outcome = real(group, step=step, **kw)
        return dataclasses.replace(outcome, stepped=step != 1)  # the second step "skipped"

    monkeypatch.setattr(step_module, "optimizer_step", optimizer_step)
    o = contract_options(Recording, tmp_path, {"max_steps": 3, "ema": True, "ema_decay": 0.8, "ema_warmup": "none"})
    session = _session(o)
    session.run()
    expected = reference_ema(session.method.raw, decay=0.8, warmup="none", skipped=(2,))
    _close(_shadow(session), expected[3])
    with pytest.raises(AssertionError):
        _close(_shadow(session), reference_ema(session.method.raw, decay=0.8, warmup="none")[3])


def test_cpu_ema_and_diffusers_warmup(tmp_path):
    o = contract_options(Recording, tmp_path, {"max_steps": 2, "ema": True, "ema_device": "cpu",
                                               "ema_warmup": "diffusers", "save_state": False})  # fmt: skip
    session = _session(o)
    session.run()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in session.ema.shadow)
    _close(_shadow(session), reference_ema(session.method.raw, decay=0.999, warmup="diffusers")[2])


def test_a_failed_save_rescues_the_average(tmp_path, disk_full_at):

    from sdcore.errors import SaveFailedError

    o = contract_options(Recording, tmp_path, {"max_steps": 2, "ema": True})
    result_path = Path(o.output)
    disk_full_at(result_path)
    session = _session(o)
    with pytest.raises(SaveFailedError, match="No space left on device") as info:
        session.run()
    rescued_files = list((result_path.parent / "result-state").glob("sdcore-rescue-result-*/result.safetensors"))
    assert len(rescued_files) == 1 and str(rescued_files[0]) in str(info.value)  # one rescue, named in the error
    assert not result_path.exists()
    saved = load_file(str(rescued_files[0]))
    assert saved.keys() == set(KEYS)
    assert not all(torch.equal(saved[k], session.method.raw[2][k]) for k in KEYS)  # the average, not the raw weights
    _equal(saved, _shadow(session))
    _equal(session.method.trainable_state_dict(), session.method.raw[2])  # the raw weights back


# --- memory plan and pre-flight ------------------------------------------------------------------------


def test_memory_estimate_counts_the_fp32_copy_where_it_lives():
    from sdcore.models.layout import ModelLayout
    from sdcore.models.load import bundled_config
    from sdcore.train.memory import ParameterPlan, estimate_memory
    from sdcore.train.options import TrainOptions

    layout = ModelLayout("sd15", "sd1", "epsilon", bundled_config("sd1"), "test")
    params = ParameterPlan({"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
                           trainable=12_750_000, added=12_750_000, result=12_750_000)  # fmt: skip

    def estimate(device, **kw):
        return estimate_memory(layout, params, TrainOptions(model="m", data="d", output="o", **kw), device=device)

    for device in ("cuda", "cpu"):
        plain, ema = estimate(device), estimate(device, ema=True)
        assert ema.ema == 12_750_000 * 4 and ema.total - plain.total == 12_750_000 * 4
        assert ", EMA 49" in ema.line() and "EMA" not in plain.line()
    assert estimate("cuda", ema=True, ema_device="cpu").total == estimate("cuda").total  # host memory
    assert estimate("cpu", ema=True, ema_device="cpu").ema == 12_750_000 * 4  # a CPU run: the same memory


def test_dry_run_shows_the_ema_copy(tmp_path):
    from click.testing import CliRunner
    from sdcore.specs import MethodSpec
    from sdcore.train.cli import build_train_command

    data = contract_options(ConvOutMethod, tmp_path).data
    command = build_train_command(MethodSpec(name="convout", summary="t", method="runtime_methods:ConvOutMethod"))
    args = ["--model", "tiny:sd1", "--data", data, "--output", str(tmp_path / "r.safetensors"), "--resolution", "64",
            "--min-bucket-reso", "64", "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(command, [*args, "--ema"])
    assert result.exit_code == 0, result.output
    assert "estimated peak memory:" in result.output and ", EMA " in result.output
    assert ", EMA " not in CliRunner().invoke(command, args).output


def test_preflight_problems(monkeypatch):
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import option_problems

    def problems(**kw):
        found = option_problems(TrainOptions(model="m", data="d", output="o", **kw))
        return [p for p in found if "ema" in p.lower()]

    assert problems(ema=True) == []
    # unused without --ema, but a value no run could use is said at once (the declared ranges)
    assert problems(ema_decay=5.0, ema_update_every=0) == [
        "--ema-decay must be between 0 and 1 (exclusive), got 5.0",
        "--ema-update-every must be at least 1, got 0",
    ]
    assert problems(ema_decay=0.5, ema_update_every=3) == []  # in range, unused: nothing to say
    assert problems(ema=True, ema_decay=1.0, ema_update_every=0) == [
        "--ema-decay must be between 0 and 1 (exclusive), got 1.0",
        "--ema-update-every must be at least 1, got 0",
    ]
    assert problems(ema=True, ema_decay=0.0) == ["--ema-decay must be between 0 and 1 (exclusive), got 0.0"]
    assert "choose one of same, cpu" in problems(ema=True, ema_device="gpu")[0]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    (fsdp,) = problems(ema=True)
    assert fsdp.startswith("--ema with FSDP: each process holds only a shard")
    assert problems() == []
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert problems(ema=True)[0].startswith("--ema with DeepSpeed")


# --- methods ------------------------------------------------------------------------------------------------


def test_lora_from_the_command_line_saves_the_average(tmp_path, sd_cli):
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.format import read_lora

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    common = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--max-steps", "3", "--resolution", "64",
              "--min-bucket-reso", "64", "--no-progress", "--rank", "2", "--save-dtype", "fp32", "--lr", "0.01"]  # fmt: skip
    pm = get_plugin_manager()
    for name, extra in (("ema", ["--ema", "--ema-decay", "0.5", "--ema-warmup", "none"]), ("raw", [])):
        result = sd_cli([*common, *extra, "--output", str(tmp_path / f"{name}.safetensors")], pm=pm)
        assert result.exit_code == 0, result.output
    assert read_lora(tmp_path / "ema.safetensors").metadata["sdcore_ema_decay"] == "0.5"
    assert "sdcore_ema_decay" not in read_lora(tmp_path / "raw.safetensors").metadata
    ema, raw = load_file(str(tmp_path / "ema.safetensors")), load_file(str(tmp_path / "raw.safetensors"))
    # the up matrices start at zero and the average (decay 0.5, no warm-up) keeps 1/8 of that start after
    # 3 steps: 0.125 * 0 + 0.125 * w1 + 0.25 * w2 + 0.5 * w3, not the raw w3
    ups = [k for k in raw if "lora_up" in k]
    assert ups and all(not torch.equal(ema[k], raw[k]) for k in ups)
    assert sum(float(ema[k].norm()) for k in ups) < sum(float(raw[k].norm()) for k in ups)


def test_dreambooth_trains_with_the_runtime_ema(tmp_path):
    from sdplugin_dreambooth.method import DreamBoothMethod

    o = contract_options(DreamBoothMethod, tmp_path, {"max_steps": 2, "ema": True, "ema_decay": 0.5,
                                                      "ema_warmup": "none", "save_state": False})  # fmt: skip
    session = TrainSession(DreamBoothMethod(o), bundle=create_tiny_bundle("sd1"))
    session.run()
    params = session.params
    assert len(session.ema.shadow) == len(params) > 100  # every UNet tensor
    # the saved checkpoint holds the average: the UNet conv_out of the saved file equals the shadow
    from sdcore.models.load import load_model

    saved = load_model(str(session.output))
    index = next(i for i, p in enumerate(params) if p is session.bundle.unet.conv_out.weight)
    torch.testing.assert_close(saved.unet.conv_out.weight.float(), session.ema.shadow[index], rtol=0, atol=0)
    assert not torch.equal(session.ema.shadow[index], session.bundle.unet.conv_out.weight)


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_two_processes_keep_the_same_average_as_one(tmp_path):
    """DDP: every process holds the same weights, so the same average; the main process saves it."""
    values = {"ema": True, "ema_decay": 0.5, "ema_warmup": "none", "max_steps": 3}
    check_processes_equal_accumulation(ConvOutMethod, tmp_path, values, extra_pythonpath=[str(Path(__file__).parent)])
    single = load_file(str(tmp_path / "single" / "result.safetensors"))
    multi = load_file(str(tmp_path / "multi" / "result.safetensors"))
    raw = load_file(str(tmp_path / "multi-trained.safetensors"))  # the worker's raw weights after the run
    for key in KEYS:
        torch.testing.assert_close(multi[key], single[key], rtol=0, atol=1e-6)
    assert not torch.equal(multi[KEYS[0]], raw[KEYS[0]])


def test_an_ema_state_with_other_tensor_names_is_a_clear_error():
    """A readable ema.safetensors that does not hold this run's ``ema.<i>`` tensors (another tool's file, a
    hand edit) names what is missing instead of raising a KeyError."""
    from sdcore.errors import ConfigError
    from sdcore.train.ema import WeightEMA

    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3))]
    ema = WeightEMA(params, decay=0.9)
    with pytest.raises(ConfigError, match=r"the state: no EMA tensor ema\.1"):
        ema.load_state_dict({"ema.0": torch.ones(2, 3), "shadow.1": torch.ones(3)})
    assert torch.equal(ema.shadow[0], torch.zeros(2, 3))  # nothing was loaded


def test_applying_swaps_fp32_weights_without_a_copy_and_copies_the_rest():
    """An fp32 weight trades storage with its shadow for the block (no second copy of a full fine-tune's model),
    a bf16 one is copied in and back; both come back bit for bit and the shadow is untouched."""
    from sdcore.train.ema import WeightEMA

    fp32 = torch.nn.Parameter(torch.randn(4, 3))
    half = torch.nn.Parameter(torch.randn(5).to(torch.bfloat16))
    ema = WeightEMA([fp32, half], decay=0.5, warmup="none")
    with torch.no_grad():
        fp32.add_(1.0)
        half.add_(1.0)
    ema.update(1)
    raw = [fp32.detach().clone(), half.detach().clone()]
    shadow = [t.clone() for t in ema.shadow]
    storage = fp32.data_ptr()
    with ema.applied():
        assert fp32.data_ptr() != storage and torch.equal(fp32, shadow[0])  # the shadow's own storage
        assert torch.equal(half, shadow[1].to(torch.bfloat16))
    assert fp32.data_ptr() == storage and torch.equal(fp32, raw[0]) and torch.equal(half, raw[1])
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, shadow, strict=True))
