"""--cpu-offload-checkpointing in a LoRA run on the tiny FLUX.1, SD3 and Chroma: the same losses and the same
trained factors as plain --gradient-checkpointing, with the block inputs really copied (on this CPU-only
machine the offload and compute devices are one, so the test makes every move a real copy)."""

from __future__ import annotations

import pytest
import torch
from sdcore.models.load import load_model
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train
from sdcore.train.offload_checkpointing import ActivationOffload
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod


def _run(tmp_path, family, tag, **extra):
    values = {"rank": 4, "max_steps": 3, "t5xxl_max_token_length": 16, **extra}
    options = contract_options(LoraMethod, tmp_path, values, family=family, tag=tag)
    bundle = load_model(f"tiny:{family}")
    result = train(LoraMethod(options), bundle=bundle)
    return bundle, result, read_lora(options.output)


@pytest.mark.parametrize("family", ["flux", "sd3", "chroma"])
def test_offloaded_checkpointing_trains_exactly_like_plain_checkpointing(tmp_path, monkeypatch, family):
    moves = {"offload": 0, "compute": 0}

    class Counting(ActivationOffload):
        always_copy = True

        def to_offload(self, tensor):
            moves["offload"] += 1
            return super().to_offload(tensor)

        def to_compute(self, tensor):
            moves["compute"] += 1
            return super().to_compute(tensor)

    monkeypatch.setattr("sdcore.train.offload_checkpointing.ActivationOffload", Counting)
    _, plain, plain_lora = _run(tmp_path, family, "plain", gradient_checkpointing=True)
    bundle, offloaded, lora = _run(tmp_path, family, "offload", cpu_offload_checkpointing=True)
    denoiser = bundle.denoiser
    installed = getattr(denoiser, "_sdcore_checkpoint_inner", None) or denoiser._gradient_checkpointing_func
    assert isinstance(installed, Counting) and denoiser.gradient_checkpointing  # the option turned it on
    assert moves["offload"] > 0 and moves["compute"] > moves["offload"]
    assert offloaded.losses == plain.losses and len(plain.losses) == 3
    assert sorted(lora.modules) == sorted(plain_lora.modules)
    for key, module in lora.modules.items():
        assert torch.equal(module.up, plain_lora.modules[key].up), key
        assert torch.equal(module.down, plain_lora.modules[key].down), key
    assert any(m.up.abs().sum() > 0 for m in lora.modules.values())  # it trained
    assert lora.metadata["ss_gradient_checkpointing"] == "True"  # kohya writes the turned-on flag


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def test_cli_refuses_it_on_a_unet_and_with_block_swap_and_notes_the_checkpointing(tmp_path):
    from click.testing import CliRunner
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = ["--data", str(data), "--output", str(tmp_path / "o.safetensors"), "--resolution", "64", "--dry-run"]
    result = CliRunner().invoke(_cli(), ["train", "lora", "--model", "tiny:sd1", *out, "--cpu-offload-checkpointing"])
    assert result.exit_code == 2, result.output
    assert "--cpu-offload-checkpointing: keeps transformer blocks' inputs in host memory" in result.output
    assert "Traceback" not in result.output
    flux = ["train", "lora", "--model", "tiny:flux", *out]
    result = CliRunner().invoke(_cli(), [*flux, "--cpu_offload_checkpointing", "--blocks_to_swap", "2"])
    assert result.exit_code == 2 and "cpu_offload_checkpointing with blocks_to_swap: kohya refuses" in result.output
    result = CliRunner().invoke(_cli(), [*flux, "--cpu-offload-checkpointing", "--blocks-to-swap", "2"])
    assert result.exit_code == 2 and "--cpu-offload-checkpointing with --blocks-to-swap" in result.output
    result = CliRunner().invoke(_cli(), [*flux, "--cpu-offload-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "--cpu-offload-checkpointing: gradient checkpointing is on" in result.output
