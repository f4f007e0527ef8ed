"""DreamBooth with --fused-backward-pass (kohya's fused_backward_pass): the same weights, no gradients held."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sdcore.models.family import family_adapter
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.loop import TrainSession
from sdplugin_dreambooth.method import DreamBoothMethod
from sdplugin_dreambooth.options import DreamBoothOptions

#: kohya's Adafactor: translate_kohya adds relative_step=True; scale_parameter/warmup_init as transformers'
KOHYA_ADAFACTOR = "relative_step=True scale_parameter=True warmup_init=False"


def _options(tmp_path: Path, tag: str, **overrides) -> DreamBoothOptions:
    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=2, repeats=1)
    base = dict(
        model="tiny:sdxl",
        data=str(data),
        output=str(tmp_path / tag / "db.safetensors"),
        resolution=64,
        min_bucket_reso=64,
        batch_size=1,
        lr=1e-3,
        seed=0,
        progress=False,
        save_dtype="fp32",
        save_state=False,
        max_steps=3,
        max_grad_norm=0.0,
        train_text_encoder=True,
        te_lr=5e-4,
        lr_scheduler="linear",
    )
    base.update(overrides)
    return DreamBoothOptions(**base)


def _train(options: DreamBoothOptions) -> tuple[TrainSession, dict[str, torch.Tensor]]:
    bundle = family_adapter(options.model.split(":")[1]).create_tiny()
    session = TrainSession(DreamBoothMethod(options), bundle=bundle)
    session.run()
    return session, {k: v.clone() for k, v in session.method.trainable_state_dict().items()}


@pytest.mark.parametrize(
    ("family", "optimizer", "args"),
    [
        ("sdxl", "adafactor", KOHYA_ADAFACTOR),
        ("flux", "adafactor", KOHYA_ADAFACTOR),
        ("sd1", "adamw", ""),
        ("sd1", "adafactor", ""),
    ],
)
def test_the_same_weights_with_and_without_it(tmp_path, family, optimizer, args):
    common = dict(model=f"tiny:{family}", optimizer=optimizer, optimizer_args=args)
    _, plain = _train(_options(tmp_path, "plain", **common))
    session, fused = _train(_options(tmp_path, "fused", fused_backward_pass=True, **common))
    start = family_adapter(family).create_tiny().denoiser.state_dict()
    unet = [k for k in plain if k.startswith("unet.")]
    assert unet and any(k.startswith("text_encoder_") for k in plain)  # the UNet and the text encoders trained
    assert any(not torch.equal(plain[k], start[k.removeprefix("unet.")]) for k in unet)
    for key, value in plain.items():
        assert torch.equal(value, fused[key]), key  # bit for bit
    assert all(p.grad is None for p in session.params)


def test_gradients_never_pile_up_during_backward(tmp_path):
    options = _options(tmp_path, "count", fused_backward_pass=True, max_steps=1, optimizer="adafactor")
    session = TrainSession(DreamBoothMethod(options), bundle=create_tiny_bundle("sdxl"))
    session.setup()
    alive: list[int] = []
    params = session.params
    start = [p.detach().clone() for p in params]
    for p in params:  # registered after the runtime's: runs once this tensor has stepped
        p.register_post_accumulate_grad_hook(lambda _p: alive.append(sum(q.grad is not None for q in params)))
    session.run()
    stepped = sum(not torch.equal(p, s) for p, s in zip(params, start, strict=True))
    # every tensor that got a gradient stepped in backward (the first text encoder's last layer feeds
    # nothing SDXL reads, so it has none: in an ordinary step too)
    assert len(alive) == stepped > 300
    assert max(alive) == 0


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def test_kohyas_flag_on_the_command_line_and_every_problem_at_once(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=2, repeats=1)
    base = ["train", "dreambooth", "--model", "tiny:sdxl", "--data", str(data), "--output",
            str(tmp_path / "o.safetensors"), "--resolution", "64", "--min-bucket-reso", "64", "--no-progress"]  # fmt: skip
    ok = CliRunner().invoke(
        _cli(), [*base, "--fused_backward_pass", "--optimizer_type", "AdaFactor", "--max-steps", "1", "--dry-run"]
    )
    assert ok.exit_code == 0, ok.output
    assert "clips each tensor by its own norm" in ok.output  # kohya's default max_grad_norm 1.0
    bad = CliRunner().invoke(
        _cli(), [*base, "--fused-backward-pass", "--optimizer", "prodigy", "--mixed-precision", "fp16", "--dry-run"]
    )
    assert bad.exit_code == 2, bad.output
    assert "optimizer whose step is per tensor" in bad.output and "grad scaler must see every gradient" in bad.output
    assert "Traceback" not in bad.output


def test_a_kohya_toml_with_accumulation_is_told_that_kohya_refuses_it(tmp_path):
    """kohya's train_util.get_optimizer asserts gradient_accumulation_steps == 1 with fused_backward_pass; sdcore runs
    the pair (the tensors step in the last micro-batch's backward) and its note says both, not "OneTrainer's rule"
    alone as for a OneTrainer config."""
    data = make_tiny_dataset(tmp_path / "data", n=2, repeats=1)
    config = tmp_path / "kohya.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "tiny:sdxl"\ntrain_data_dir = "{data.as_posix()}"\n'
        f'output_dir = "{(tmp_path / "out").as_posix()}"\nresolution = "64"\nfused_backward_pass = true\n'
        'optimizer_type = "AdaFactor"\ngradient_accumulation_steps = 2\nmax_train_steps = 1\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(_cli(), ["train", "dreambooth", "--config", str(config), "--no-progress", "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the plan wraps long notes
    assert (
        "--fused-backward-pass with --gradient-accumulation 2: the tensors step in the backward of each update's last "
        "micro-batch (kohya refuses --fused_backward_pass with gradient_accumulation_steps above 1 "
        "(train_util.get_optimizer asserts it); sdcore runs it with OneTrainer's rule)"
    ) in text


def test_optimizer_groups_give_the_same_weights(tmp_path):
    common = dict(model="tiny:sdxl", optimizer="adamw", max_steps=2)
    _, plain = _train(_options(tmp_path, "plain", **common))
    _, grouped = _train(_options(tmp_path, "groups", fused_optimizer_groups=8, **common))
    for key, value in plain.items():
        assert torch.equal(value, grouped[key]), key


def test_kohya_names_translate():
    from sdcore.train.config import load_options

    o = load_options(
        DreamBoothOptions, None, kohya={"fused_backward_pass": True, "optimizer_type": "Adafactor", "max_grad_norm": 0}
    )
    assert o.fused_backward_pass and o.optimizer == "adafactor" and o.max_grad_norm == 0
    assert load_options(DreamBoothOptions, None, kohya={"fused_optimizer_groups": "10"}).fused_optimizer_groups == 10
    off = load_options(DreamBoothOptions, None, kohya={"fused_optimizer_groups": 0, "fused_backward_pass": False})
    assert off.fused_optimizer_groups == 0 and not off.fused_backward_pass  # what kohya_ss writes when untouched


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_blockwise_optimizers_give_the_same_weights_and_step_block_by_block(tmp_path, family):
    from sdcore.train.fused import parameter_blocks

    common = dict(model=f"tiny:{family}", optimizer="adafactor", optimizer_args=KOHYA_ADAFACTOR, max_steps=2)
    _, plain = _train(_options(tmp_path, "plain", **common))
    options = _options(tmp_path, "blocks", blockwise_fused_optimizers=True, **common)
    session = TrainSession(DreamBoothMethod(options), bundle=family_adapter(family).create_tiny())
    session.setup()
    keys = parameter_blocks(session.bundle)
    params = session.params
    held: list[set[str]] = []  # the blocks whose gradients are alive after each tensor's hook
    for p in params:
        p.register_post_accumulate_grad_hook(
            lambda _p: held.append({keys[id(q)] for q in params if q.grad is not None})
        )
    session.run()
    blockwise = {k: v.clone() for k, v in session.method.trainable_state_dict().items()}
    for key, value in plain.items():
        assert torch.equal(value, blockwise[key]), key
    assert max(len(b) for b in held) >= 1  # a block's gradients wait for its last one ...
    names = {k for k in keys.values() if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert len(names) >= 2 and all(len(b & names) <= 2 for b in held)  # ... and blocks step one after another
