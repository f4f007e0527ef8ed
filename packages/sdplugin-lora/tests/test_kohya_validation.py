"""kohya's validation loss and full_bf16 through ``sdcore train lora``: the LoRA network's dtype, the
saved file's dtype (kohya: ``save_precision``, else the network's own dtype) and the ``ss_*`` keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sdcore.testing.contract import make_tiny_dataset


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def _run(data: Path, out: Path, *extra: str) -> None:
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(out),
            "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--batch-size", "1",
            "--max-steps", "2", "--lr", "1e-3", "--no-progress", "--rank", "2", *extra]  # fmt: skip
    result = CliRunner().invoke(_cli(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        (["--full_bf16", "--mixed_precision", "bf16"], torch.bfloat16),  # kohya: no save_precision -> bf16
        (["--full_bf16", "--mixed_precision", "bf16", "--save_precision", "float"], torch.float32),
        (["--full-bf16", "--mixed-precision", "bf16", "--save-dtype", "fp16"], torch.float16),
    ],
)
def test_full_bf16_saves_what_kohya_saves(tmp_path, flags, dtype):
    from sdplugin_lora.format import read_lora

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out.safetensors"
    _run(data, out, *flags)
    from safetensors.torch import load_file

    tensors = load_file(str(out))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {dtype}
    lora = read_lora(out)
    assert lora.metadata["ss_full_fp16"] == "False" and lora.metadata["ss_mixed_precision"] == "bf16"


def test_a_full_bf16_network_trains_in_bf16(tmp_path):
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    o = contract_options(LoraMethod, tmp_path, {"mixed_precision": "bf16", "full_bf16": True, "rank": 2})
    s = TrainSession(LoraMethod(o), bundle=create_tiny_bundle("sd1"))
    result = s.run()
    assert all(p.dtype == torch.bfloat16 for p in s.params)
    assert result.losses and all(v == v for v in result.losses)  # finite, not NaN
    state = s.method.network.state_dict()
    # every trained factor is bf16; only the alpha buffers (a constant per module) stay fp32 in memory
    assert {k.rsplit(".", 1)[1] for k, t in state.items() if t.dtype != torch.bfloat16} == {"alpha"}
    assert any(t.dtype == torch.bfloat16 for t in state.values())


def test_validation_metadata_is_kohyas(tmp_path):
    from sdplugin_lora.format import read_lora

    data = make_tiny_dataset(tmp_path / "data", n=4, size=64, repeats=2)
    out = tmp_path / "val.safetensors"
    _run(data, out, "--validation_split", "0.5", "--validation_seed", "3", "--validate_every_n_steps", "1")
    meta = read_lora(out).metadata
    assert {k: meta[k] for k in meta if "validat" in k} == {
        "ss_validation_seed": "3",
        "ss_validation_split": "0.5",
        "ss_max_validation_steps": "None",
        "ss_validate_every_n_epochs": "None",
        "ss_validate_every_n_steps": "1",
        "ss_num_validation_images": "4",  # 2 held-out images x 2 repeats
    }
    assert meta["ss_num_train_images"] == "4"  # the two that train, x 2 repeats


def test_cli_preflight_refuses_bad_values_with_exit_2(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--no-progress", "--full_bf16", "--validation_split", "1.5", "--validate-every-n-epochs", "0"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2, result.output
    for part in ("--full-bf16 needs --mixed-precision bf16", "--validation-split must be in [0, 1)",
                 "--validate-every-n-epochs must be at least 1"):  # fmt: skip
        assert part in result.output
    assert "Traceback" not in result.output


def test_validation_runs_the_network_without_dropout(tmp_path):
    import contextlib

    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    o = contract_options(LoraMethod, tmp_path, {"rank": 2, "dropout": 0.5, "validation_split": 0.5, "batch_size": 1})
    s = TrainSession(LoraMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    for m in s.method.network.modules():  # non-zero factors, so dropout on the hidden would show
        if hasattr(m, "lora_up"):
            torch.nn.init.normal_(m.lora_up.weight, std=0.5)
    with_dropout_set = s.validate()
    s.method.sampling = lambda bundle: contextlib.nullcontext({})  # no eval switch: dropout would be active
    assert s.validate() != pytest.approx(with_dropout_set, rel=1e-6)
    del s.method.sampling
    for m in s.method.network.modules():
        if hasattr(m, "dropout"):
            m.dropout = 0.0
    assert s.validate() == pytest.approx(with_dropout_set, rel=1e-6)  # eval mode: dropout was off
    assert s.method.network.training  # and training mode is back
