"""LoRA on an fp8 base (--fp8-base / kohya's --fp8_base) and the memory options' pre-flight checks."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.fp8 import Fp8Linear
from sdcore.train.loop import train
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod


def _train(tmp_path, tag, **kw):
    options = contract_options(LoraMethod, tmp_path, {"rank": 4, "max_steps": 3, **kw}, tag=tag)
    bundle = create_tiny_bundle("sd1")
    method = LoraMethod(options)
    result = train(method, bundle=bundle)
    return bundle, result, options


def test_lora_trains_and_saves_on_an_fp8_base(tmp_path):
    plain_bundle, _, plain_options = _train(tmp_path, "plain")
    bundle, result, options = _train(tmp_path, "fp8", fp8_base=True)
    # the frozen UNet layers were stored in fp8 for the run; the LoRA factors trained in fp32
    fp8_layers = [m for m in bundle.unet.modules() if isinstance(m, Fp8Linear)]
    assert fp8_layers and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8_layers)
    assert bundle.unet.conv_norm_out.weight.dtype == torch.float32  # norms untouched
    saved = read_lora(options.output)
    plain = read_lora(plain_options.output)
    assert sorted(saved.modules) == sorted(plain.modules)
    assert saved.metadata["ss_fp8_base"] == "True" and plain.metadata["ss_fp8_base"] == "False"  # as kohya writes
    ups = {k: m.up.float() for k, m in saved.modules.items()}
    assert all(m.down.dtype == torch.float32 for m in saved.modules.values())
    # lora_up starts at zero: non-zero factors mean the gradients reached the adapter through fp8 layers
    trained = [k for k, up in ups.items() if up.abs().sum() > 0]
    assert len(trained) == len(ups)
    # and they went the same way as on the full-precision base (fp8 rounding is a small perturbation)
    a = torch.cat([ups[k].flatten() for k in sorted(ups)])
    b = torch.cat([plain.modules[k].up.float().flatten() for k in sorted(ups)])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
    assert not torch.equal(a, b)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    del plain_bundle


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def test_kohya_names_reach_the_options_and_block_swap_on_a_unet_is_refused(tmp_path):
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.safetensors")]
    result = CliRunner().invoke(_cli(), [*args, "--fp8_base", "--blocks_to_swap", "2", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "--blocks-to-swap: the Stable Diffusion 1.x unet has no repeated transformer blocks to swap" in result.output
    result = CliRunner().invoke(_cli(), [*args, "--fp8-base", "--blocks-to-swap", "-1", "--dry-run"])
    assert result.exit_code == 2 and "--blocks-to-swap must be 0 (off) or more, got -1" in result.output
    result = CliRunner().invoke(_cli(), [*args, "--fp8_base", "--resolution", "64", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "estimated peak memory" in result.output


def test_kohya_metadata_records_fp8_storage_however_it_was_asked_for():
    """kohya's ss_fp8_base says the frozen weights were stored in fp8: --fp8-base or --base-weights-dtype fp8;
    nf4/int8 are not fp8."""
    from pathlib import Path

    from sdcore.train.method import SaveInfo
    from sdplugin_lora.method import LoraOptions, kohya_training_metadata

    info = SaveInfo(path=Path("x.safetensors"), step=1, epoch=0, metadata={}, final=True)
    recorded = {
        str(values): kohya_training_metadata(LoraOptions(**values), info)["ss_fp8_base"]
        for values in ({}, {"fp8_base": True}, {"base_weights_dtype": "fp8"}, {"base_weights_dtype": "nf4"})
    }
    assert list(recorded.values()) == ["False", "True", "True", "False"]
