"""SimpleTuner's ``use_ema`` (+ ``ema_*``) and ``train_text_encoder`` (+ ``text_encoder_lr``) as ``--config``.

The expected values are SimpleTuner's (bghira/SimpleTuner bc8e6ab), rewritten here from its code, not copied
(AGPL-3.0): ``simpletuner/helpers/training/ema.py`` ``EMAModel.get_decay`` / ``should_update_ema``,
``helpers/training/trainer.py`` (``init_ema_model``: ``decay=ema_decay, warmup_steps=ema_warmup_steps``, the
rest at EMAModel's defaults; the EMA stepped with ``global_step`` after it is counted), the field registry's
defaults (``sections/training.py``: ema_decay 0.995, ema_update_interval 1, ema_warmup_steps 0, ema_device cpu;
``sections/logging_fields.py``: ema_validation comparison) and ``default_settings/safety_check.py`` (LyCORIS
refuses train_text_encoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.testing.datasets import make_tiny_dataset


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _sd1_run(tmp_path: Path, **extra: object) -> Path:
    """A tiny SD 1.x LoRA config (``--`` keys, booleans as strings) with one local image dataset."""
    images = make_tiny_dataset(tmp_path / "data", n=2, size=64) / "1_sks"
    backend = _write(
        tmp_path / "backend.json",
        [{"id": "subject", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
          "resolution": 64, "resolution_type": "pixel_area"}],
    )  # fmt: skip
    config = {
        "--model_family": "sd1x", "--model_type": "lora", "--pretrained_model_name_or_path": "tiny:sd1",
        "--data_backend_config": str(backend), "--output_dir": str(tmp_path / "out"), "--max_train_steps": 2,
        "--lora_rank": 4, "--lora_dropout": "0", "--learning_rate": "1e-3", "--train_batch_size": 1,
        "--seed": 3, "--mixed_precision": "no", "--gradient_checkpointing": "false", "--resolution": 64,
        "--resolution_type": "pixel_area", "--disable_bucket_pruning": "true",
        **extra,
    }  # fmt: skip
    return _write(tmp_path / "config.json", config)


def _load(path: Path, notes: list[str] | None = None, *, full: bool = False):
    from sdcore.train.config import load_options

    if full:
        from sdplugin_dreambooth.options import DreamBoothOptions as cls
    else:
        from sdplugin_lora.method import LoraOptions as cls
    return load_options(cls, path, notes=[] if notes is None else notes)


def simpletuner_decay(n: int, decay: float, warmup_steps: int = 0) -> float:
    """EMAModel.get_decay(optimization_step=n) as SimpleTuner builds it (min_decay 0, update_after_step 0,
    use_ema_warmup False): a warm-up of W steps copies before step W, then the fixed decay; without one, 0 at the
    first step, then (1 + s) / (10 + s) with s = n - 1, capped at the decay."""
    if warmup_steps > 0:
        return 0.0 if n < warmup_steps else decay
    s = max(0, n - 0 - 1)
    if s <= 0:
        return 0.0
    return max(min((1 + s) / (10 + s), decay), 0.0)


@pytest.mark.parametrize("warmup_steps", [0, 1, 5])
def test_use_ema_decay_is_simpletuners_get_decay_at_every_step(tmp_path, warmup_steps):
    from sdcore.train.ema import ema_decay_at

    extra = {"--use_ema": "true", "--ema_decay": "0.99"}
    if warmup_steps:
        extra["--ema_warmup_steps"] = warmup_steps
    o = _load(_sd1_run(tmp_path, **extra))
    assert o.ema and o.ema_decay == 0.99
    assert o.ema_warmup == ("copy" if warmup_steps else "diffusers")
    for n in range(1, 80):
        got = ema_decay_at(n, o.ema_decay, o.ema_warmup, o.ema_warmup_steps)
        assert got == pytest.approx(simpletuner_decay(n, 0.99, warmup_steps), abs=1e-15), n
    if warmup_steps == 1:  # W = 1 copies before no step: the fixed decay from the first update
        assert ema_decay_at(1, 0.99, "copy", 1) == 0.99


def test_use_ema_defaults_interval_and_device(tmp_path):
    notes: list[str] = []
    o = _load(_sd1_run(tmp_path / "a", **{"--use_ema": "true"}), notes)
    # sections/training.py: ema_decay 0.995, ema_update_interval 1, ema_device cpu (the average lives on the host)
    assert (o.ema, o.ema_decay, o.ema_update_every, o.ema_warmup, o.ema_warmup_steps, o.ema_device) == (
        True, 0.995, 1, "diffusers", 0, "cpu")  # fmt: skip
    assert any("use_ema: sdcore saves the average as the result" in n and "ema/ file" in n for n in notes)
    o = _load(_sd1_run(tmp_path / "b", **{"--use_ema": "1", "--ema_update_interval": "4",
                                          "--ema_device": "accelerator", "--ema_warmup_steps": "10"}))  # fmt: skip
    assert (o.ema_update_every, o.ema_device, o.ema_warmup, o.ema_warmup_steps) == (4, "same", "copy", 10)


def test_ema_validation_and_ema_keys_without_use_ema(tmp_path):
    notes: list[str] = []
    prompts = {"--validation_prompt": "a cat", "--validation_num_inference_steps": 2}
    _load(_sd1_run(tmp_path / "a", **{"--use_ema": "true", **prompts}), notes)
    assert any("ema_validation comparison: sdcore's samples use the average" in n for n in notes)
    notes.clear()
    _load(_sd1_run(tmp_path / "b", **{"--use_ema": "true", "--ema_validation": "ema_only", **prompts}), notes)
    assert not any(".ema_validation " in n for n in notes)  # sdcore's samples are SimpleTuner's ema_only
    notes.clear()
    o = _load(_sd1_run(tmp_path / "c", **{"--ema_decay": 0.9, "--ema_update_interval": 3}), notes)
    assert not o.ema
    assert any("ema_decay, ema_update_interval without use_ema: not used" in n for n in notes)


def test_bad_ema_values_are_one_line_each(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(_sd1_run(tmp_path, **{"--use_ema": "true", "--ema_decay": 1.5, "--ema_validation": "both"}))
    text = str(info.value)
    assert "ema_decay 1.5: a decay between 0 and 1 is needed" in text
    assert "ema_validation 'both': choose none, ema_only or comparison" in text


def test_train_text_encoder_and_its_learning_rate(tmp_path):
    notes: list[str] = []
    o = _load(_sd1_run(tmp_path / "a", **{"--train_text_encoder": "true", "--text_encoder_lr": "5e-5"}), notes)
    assert (o.train_text_encoder, o.te_lr, o.lr, o.train_t5) == (True, 5e-5, 1e-3, False)
    assert any("train_text_encoder: sdcore trains a LoRA on its CLIP encoder(s)" in n for n in notes)
    o = _load(_sd1_run(tmp_path / "b", **{"--train_text_encoder": "true"}))
    assert (o.train_text_encoder, o.te_lr) == (True, None)  # SimpleTuner: one group at learning_rate
    notes.clear()
    o = _load(_sd1_run(tmp_path / "c", **{"--text_encoder_lr": "5e-5"}), notes)
    assert not o.train_text_encoder and o.te_lr is None
    assert any("text_encoder_lr: without train_text_encoder" in n for n in notes)
    full = _load(_sd1_run(tmp_path / "d", **{"--model_type": "full", "--train_text_encoder": "true",
                                             "--text_encoder_lr": "2e-6"}), full=True)  # fmt: skip
    assert (full.train_text_encoder, full.te_lr) == (True, 2e-6)


def test_train_text_encoder_refused_where_simpletuner_trains_none(tmp_path):
    lycoris = _write(tmp_path / "lycoris.json", {"algo": "lokr", "linear_dim": 4, "factor": 4})
    with pytest.raises(ConfigError, match="train_text_encoder with lora_type lycoris: SimpleTuner refuses it"):
        _load(_sd1_run(tmp_path / "a", **{"--train_text_encoder": "true", "--lora_type": "lycoris",
                                          "--lycoris_config": str(lycoris)}))  # fmt: skip
    with pytest.raises(ConfigError, match="Chroma's only text encoder is T5"):
        _load(_sd1_run(tmp_path / "b", **{"--train_text_encoder": "true", "--model_family": "chroma",
                                          "--pretrained_model_name_or_path": "tiny:chroma"}))  # fmt: skip


def test_two_step_sd1_run_with_use_ema_and_train_text_encoder(tmp_path):
    """A SimpleTuner SD 1.x LoRA config with use_ema and train_text_encoder through the CLI: the saved LoRA
    holds text-encoder modules and records the EMA it averaged with."""
    from click.testing import CliRunner
    from safetensors import safe_open
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    path = _sd1_run(tmp_path, **{"--use_ema": "true", "--ema_decay": "0.9", "--train_text_encoder": "true",
                                 "--text_encoder_lr": "5e-4"})  # fmt: skip
    run = CliRunner().invoke(build_cli(get_plugin_manager()), ["train", "lora", "--config", str(path), "--no-progress"])
    assert run.exit_code == 0, run.output
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    te = [k for k in keys if k.startswith("lora_te")]
    unet = [k for k in keys if k.startswith("lora_unet")]
    assert te and unet, keys[:10]
    assert (meta["sdcore_ema_decay"], meta["sdcore_ema_update_every"], meta["sdcore_ema_warmup"]) == (
        "0.9", "1", "diffusers")  # fmt: skip
    assert meta["ss_text_encoder_lr"] == "0.0005"


def test_copy_warmup_option_problems_and_average():
    """--ema-warmup copy needs --ema-warmup-steps; the average before step W is the weights, then the decay."""
    import torch
    from sdcore.train.ema import WeightEMA, ema_metadata
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import option_problems

    def problems(**kw):
        return [p for p in option_problems(TrainOptions(model="m", data="d", output="o", **kw)) if "ema" in p]

    assert problems(ema=True, ema_warmup="copy") == ["--ema-warmup copy needs --ema-warmup-steps of at least 1, got 0"]
    assert problems(ema=True, ema_warmup_steps=5) == ["--ema-warmup-steps 5: read only by --ema-warmup copy"]
    assert problems(ema=True, ema_warmup="copy", ema_warmup_steps=3) == []
    meta = ema_metadata(TrainOptions(model="m", data="d", output="o", ema=True, ema_warmup="copy", ema_warmup_steps=3))
    assert (meta["sdcore_ema_warmup"], meta["sdcore_ema_warmup_steps"]) == ("copy", "3")

    weight = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([weight], decay=0.5, warmup="copy", warmup_steps=3)
    expected = torch.zeros(3)
    for n, value in enumerate((1.0, 2.0, 4.0, 8.0), start=1):
        with torch.no_grad():
            weight.fill_(value)
        ema.update(n)
        d = simpletuner_decay(n, 0.5, 3)
        expected = d * expected + (1 - d) * torch.full((3,), value)
        assert torch.equal(ema.shadow[0], expected), n
    assert expected[0].item() == (2.0 * 0.5 + 4.0 * 0.5) * 0.5 + 8.0 * 0.5  # copied at step 2, decayed from 3
