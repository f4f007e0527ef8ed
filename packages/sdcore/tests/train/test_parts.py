"""Each runtime part alone: events, checkpoints, progress, placement, step, sampling, batches, dtypes,
and the typed method contract."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_methods import ConvOutMethod, ConvOutOptions
from sdcore.errors import PluginError, SdcoreError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.method import Capabilities, SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions


class _FakeAccelerator:
    """What the checkpoint and progress parts use of an ``accelerate.Accelerator``."""

    def __init__(self, main: bool = True) -> None:
        self.is_main_process = main
        self.num_processes = 1
        self.process_index = 0 if main else 1
        self.scaler = None
        self.logged: list[tuple[dict[str, float], int]] = []
        self.gradient_state = types.SimpleNamespace(sync=True)
        self.gradient_state._set_sync_gradients = lambda value: setattr(self.gradient_state, "sync", value)

    def wait_for_everyone(self) -> None:
        pass

    def log(self, values: dict[str, float], step: int) -> None:
        self.logged.append((values, step))


# --- the typed contract --------------------------------------------------------------------------


def test_options_are_typed_and_checked_and_capabilities_are_declared():
    method = ConvOutMethod(ConvOutOptions(train_text_norm=True))
    assert isinstance(method.options, ConvOutOptions)
    assert method.capabilities() == Capabilities(trains_text_encoder=True)
    with pytest.raises(TypeError, match="ConvOutOptions"):
        ConvOutMethod(TrainOptions())  # type: ignore[arg-type]
    # the base contract: nothing extra, no class images
    assert TrainingMethod.capabilities(method) == Capabilities()
    assert method.regularization_data() is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.capabilities().needs_pixels = True  # type: ignore[misc]


# --- events ----------------------------------------------------------------------------------------


def test_event_context_is_a_read_only_snapshot():
    from sdcore.train.events import TrainEventContext

    options = TrainOptions(lr=0.5)
    ctx = TrainEventContext("m", dataclasses.replace(options), Path("o"), Path("s"), total_steps=3, step=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.step = 2  # type: ignore[misc]
    ctx.options.lr = 1.0  # a copy: the run's options do not change
    assert options.lr == 0.5
    assert ctx.is_main_process and not hasattr(ctx, "bundle") and not hasattr(ctx, "session")


def test_hook_caller_names_the_failing_plugin_and_passes_sdcore_errors():
    from sdcore.testing.contract import plugin_manager_with
    from sdcore.train.events import HookCaller

    class Broken:
        def sdcore_on_train_step(self, context, step, logs):
            raise ValueError("boom")

    class Ours:
        def sdcore_before_train(self, context):
            raise SdcoreError("ours")

    call = HookCaller(plugin_manager_with(Broken()))
    with pytest.raises(PluginError, match=r"failed in sdcore_on_train_step: boom"):
        call("sdcore_on_train_step", context=None, step=1, logs={})
    with pytest.raises(SdcoreError, match="ours"):
        HookCaller(plugin_manager_with(Ours()))("sdcore_before_train", context=None)
    HookCaller(None)("sdcore_before_train", context=None)  # no manager: nothing to call


# --- checkpoints ---------------------------------------------------------------------------------


class _FileMethod(ConvOutMethod):
    """Saves a text file: enough for the checkpoint part, no model needed."""

    def save(self, bundle: Any, info: SaveInfo) -> Path:
        info.path.parent.mkdir(parents=True, exist_ok=True)
        info.path.write_text(f"{info.step} {info.final} {sorted(info.metadata)}")
        return info.path


def test_checkpoint_names_and_retention(tmp_path):
    from sdcore.train.checkpoints import Checkpoints, intermediate_path, output_paths, samples_dir
    from sdcore.train.method import RunFacts
    from sdcore.train.state import TrainPosition

    options = ConvOutOptions(output=str(tmp_path / "out" / "lora.safetensors"), save_limit=2)
    method = _FileMethod(options)
    final, state = output_paths(method, options)
    assert state == tmp_path / "out" / "lora-state" and samples_dir(state) == tmp_path / "out" / "lora-samples"
    assert intermediate_path(final, step=7).name == "lora-step00000007.safetensors"
    assert intermediate_path(final, epoch=2).name == "lora-000002.safetensors"  # kohya's epoch names
    ckpt = Checkpoints(method, options, _FakeAccelerator())
    bundle = types.SimpleNamespace(family="sd1")
    run = RunFacts(total_steps=9, started_at=0.0)
    for step in (3, 6, 9):
        ckpt.save_intermediate(bundle, TrainPosition(step=step), run, step=step, epoch=None)  # type: ignore[arg-type]
    kept = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert kept == ["lora-step00000006.safetensors", "lora-step00000009.safetensors"]
    text = (tmp_path / "out" / "lora-step00000009.safetensors").read_text()
    assert text.startswith("9 False") and "sdcore_method" in text
    other = Checkpoints(method, options, _FakeAccelerator(main=False))
    assert other.save_intermediate(bundle, TrainPosition(step=12), run, step=12, epoch=None) is None  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "lora-step00000012.safetensors").exists()


# --- progress ------------------------------------------------------------------------------------


def test_progress_averages_recent_losses_and_prints_only_on_the_main_process(capsys):
    from sdcore.train.progress import Progress

    acc = _FakeAccelerator()
    progress = Progress(TrainOptions(progress=True), acc, name="x")
    progress.tracking = True
    logs = [progress.step(i + 1, 0, float(i), 1e-3) for i in range(25)]
    assert logs[-1]["loss_avg"] == pytest.approx(sum(range(5, 25)) / 20)
    assert acc.logged[-1] == ({"train/loss": 24.0, "train/lr": 1e-3}, 25)
    progress.say("hello")
    Progress(TrainOptions(progress=True), _FakeAccelerator(main=False), name="x").say("quiet")
    err = capsys.readouterr().err
    assert "hello" in err and "quiet" not in err


# --- placement -----------------------------------------------------------------------------------


def test_trained_modules_share_parameters_whole_modules_when_everything_trains():
    from sdcore.train.placement import TrainedModules

    bundle = create_tiny_bundle("sd1")
    partial = list(bundle.unet.conv_out.parameters())
    module = TrainedModules(bundle, partial, lambda x: x * 2)
    assert list(module.whole) == [] and [id(p) for p in module.parameters()] == [id(p) for p in partial]
    assert module(torch.tensor(3.0)) == 6.0
    full = list(bundle.unet.parameters())
    module = TrainedModules(bundle, full, lambda: None)
    assert list(module.whole) == ["unet"] and module.whole["unet"] is bundle.unet
    assert {id(p) for p in module.parameters()} == {id(p) for p in full}


def test_place_model_keeps_trainables_fp32_and_casts_frozen_weights():
    from sdcore.train.placement import place_model

    bundle = create_tiny_bundle("sd1")
    trainable = list(bundle.unet.conv_out.parameters())
    place_model(bundle, trainable, Capabilities(), torch.device("cpu"), "bf16")
    assert all(p.dtype == torch.float32 for p in trainable)
    assert (
        bundle.unet.conv_in.weight.dtype == torch.bfloat16 and bundle.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    )
    assert bundle.unet.training and not bundle.vae.training
    kept = create_tiny_bundle("sd1")
    place_model(kept, list(kept.unet.conv_out.parameters()), Capabilities(cast_frozen_weights=False), "cpu", "bf16")
    assert kept.unet.conv_in.weight.dtype == torch.float32


def test_no_sync_clears_accelerates_sync_flag_only_inside():
    from sdcore.train.placement import Placement

    acc = _FakeAccelerator()
    placement = Placement(acc)
    with placement.no_sync(sync=False):
        assert acc.gradient_state.sync is False
    assert acc.gradient_state.sync is True
    with placement.no_sync(sync=True):
        assert acc.gradient_state.sync is True


# --- the step ------------------------------------------------------------------------------------


def test_objective_is_the_denoising_mse_weighted_per_sample(tmp_path):
    from sdcore.train.method import Batch
    from sdcore.train.noise import training_target
    from sdcore.train.step import Objective

    bundle = create_tiny_bundle("sd1")
    method = ConvOutMethod(contract_options(ConvOutMethod, tmp_path))
    objective = Objective(bundle, method, method.options)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    batch = Batch(
        latents=latents,
        captions=["a", "b"],
        is_class=torch.tensor([False, True]),
        loss_weights=torch.tensor([1.0, 0.25]),
        original_sizes=[(64, 64)] * 2,
        crop_coords=[(0, 0)] * 2,
        target_sizes=[(64, 64)] * 2,
    )
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        loss = objective.sample_loss(batch, noise, t, 0)
        noisy = bundle.noise_scheduler.add_noise(latents, noise, t)
        pred = objective.predict(noisy, t, objective.conditioning_for(batch), batch)
        target = training_target(bundle.noise_scheduler, latents, noise, t)
    manual = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * torch.tensor([1.0, 0.25])
    assert torch.allclose(loss, manual, atol=1e-6)


# --- sampling ------------------------------------------------------------------------------------


def test_sample_prompts_file_and_grid(tmp_path):
    from PIL import Image
    from sdcore.train.sampling import sample_prompt_list, write_grid

    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\na red thing\n\n  a blue thing  \n")
    assert [p.prompt for p in sample_prompt_list(TrainOptions(sample_prompts=str(prompts)))] == [
        "a red thing",
        "a blue thing",
    ]
    assert [p.prompt for p in sample_prompt_list(TrainOptions(sample_prompts="just one"))] == ["just one"]
    write_grid([Image.new("RGB", (8, 8))] * 5, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == (32, 16)


# --- batches -------------------------------------------------------------------------------------


def test_prefetcher_returns_what_was_submitted_once():
    from sdcore.train.batches import Prefetcher

    prefetcher = Prefetcher(workers=1)
    prefetcher.submit("k", lambda x: x + 1, 1)
    prefetcher.submit("k", lambda x: x + 100, 1)  # already pending: ignored
    assert prefetcher.take("k") == 2 and prefetcher.take("k") is None
    prefetcher.close()


# --- dtypes --------------------------------------------------------------------------------------


def test_one_dtype_table():
    from sdcore.dtypes import element_bytes, resolve_dtype, short_name, torch_dtype

    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("no") is torch.float32
    assert resolve_dtype("half") is torch.float16 and resolve_dtype(None) is None
    assert short_name(torch.bfloat16) == "bf16"
    with pytest.raises(SdcoreError, match="unknown dtype"):
        resolve_dtype("fp8")
    # the byte sizes the memory plan and the disk estimate use agree with torch's
    for name in ("fp32", "no", "fp16", "bf16"):
        assert element_bytes(name) == torch_dtype(name).itemsize
    with pytest.raises(SdcoreError, match="unknown dtype"):
        element_bytes("fp8")
