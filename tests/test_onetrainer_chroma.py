"""OneTrainer ``model_type: CHROMA_1`` configs read by ``sdcore train <method> --config config.json``.

The configs are written here in OneTrainer's field layout (OneTrainer is AGPL-3.0: its Chroma presets are
not copied; the values are our own). Expected meanings come from Nerogar/OneTrainer (mirror HEAD 23df3832):
``modules/util/enum/ModelType.py`` (CHROMA_1: transformer, text_encoder (T5), vae; flow matching),
``modules/modelSetup/BaseChromaSetup.py`` (layer presets; T5 mask always on; no guidance; the timestep
drawn with ``timestep_shift`` alone), ``modules/model/ChromaModel.py`` (T5 to the tokenizer's 512 tokens,
one padding token unmasked), ``modules/modelLoader/chroma/ChromaModelLoader.py`` (``transformer.model_name``
overrides the base folder's transformer), ``modules/modelSaver/chroma/ChromaModelSaver.py`` and
``modules/util/config/SampleConfig.py`` (Chroma's sample defaults).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: a LoRA config shaped as OneTrainer's UI saves a Chroma LoRA (its field names; values written here)
CHROMA_LORA = {
    "__version": 11, "training_method": "LORA", "model_type": "CHROMA_1", "base_model_name": "tiny:chroma",
    "lora_rank": 8, "lora_alpha": 4.0, "learning_rate": 2e-4, "batch_size": 2, "epochs": 3, "resolution": "512",
    "train_dtype": "BFLOAT_16", "output_dtype": "BFLOAT_16", "output_model_format": "DIFFUSERS_LORA",
    "output_model_destination": "models/chroma_lora.safetensors",
    "timestep_distribution": "INVERTED_PARABOLA", "noising_weight": 6.5, "timestep_shift": 2.0,
    "text_encoder_sequence_length": 512, "layer_filter": "attn,ff.net,proj_mlp", "layer_filter_preset": "attn-mlp",
    "transformer": {"train": True, "weight_dtype": "FLOAT_8", "attention_mask": False},
    "text_encoder": {"train": False, "weight_dtype": "BFLOAT_16"}, "vae": {"weight_dtype": "FLOAT_32"},
    "quantization": {"layer_filter": "transformer_block", "layer_filter_preset": "blocks"},
}  # fmt: skip


def _write(tmp_path: Path, config: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _load(tmp_path: Path, config: dict, method: str = "lora", notes: list[str] | None = None):
    from sdcore.train.config import load_options

    if method == "lora":
        from sdplugin_lora.method import LoraOptions as options
    else:
        from sdplugin_dreambooth.options import DreamBoothOptions as options
    return load_options(options, _write(tmp_path, config), notes=notes if notes is not None else [])


def _problems(tmp_path: Path, config: dict, method: str = "lora") -> list[str]:
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _load(tmp_path, config, method)
    return list(info.value.problems)


def test_chroma_lora_options(tmp_path):
    notes: list[str] = []
    o = _load(tmp_path, CHROMA_LORA, notes=notes)
    text = " | ".join(notes)
    assert (o.model, o.rank, o.alpha, o.lr, o.batch_size, o.epochs) == ("tiny:chroma", 8, 4.0, 2e-4, 2, 3)
    assert (o.algo, o.key_layout, o.mixed_precision, o.save_dtype) == ("lora", "diffusers", "bf16", "bf16")
    assert o.fp8_base is True and o.train_text_encoder is False  # FLOAT_8 storage of the frozen transformer
    # INVERTED_PARABOLA: OneTrainer's weighted buckets max(2 - w (x - (b + 0.5))^2, 0), shifted by timestep_shift
    # (BaseChromaSetup passes no resolution shift), then its flow loss against noise - latents
    assert (o.timestep_distribution, o.noising_weight, o.noising_bias) == ("inverted_parabola", 6.5, 0.0)
    assert (o.discrete_flow_shift, o.dynamic_timestep_shift) == (2.0, False)
    assert (o.model_prediction_type, o.weighting_scheme) == ("raw", "uniform")
    # T5's padding masked whatever transformer.attention_mask says (ChromaModel.encode_text, BaseChromaSetup)
    assert o.apply_t5_attn_mask is True
    # Chroma's T5 reads the tokenizer's 512 tokens (text_encoder_sequence_length is a Flux.2 field): the family's
    from sdcore.models.family import family_adapter

    assert o.t5xxl_max_token_length is None and family_adapter("chroma").t5_max_length(None) == 512
    # the preset's own patterns select a subset of sdcore's Chroma targets: the same filter, exactly, no note
    assert (o.layer_filter, o.layer_filter_regex) == ("attn,ff.net,proj_mlp", False)
    assert "layer_filter" not in text
    assert "quantization: accepted" in text


def test_legacy_top_level_weight_dtype_fills_the_parts_that_say_none(tmp_path):
    """OneTrainer's Chroma presets still carry the top-level ``weight_dtype`` of configs before version 10:
    ``TrainConfig.__migration_9`` copies it into each part whose ``weight_dtype`` is ``NONE`` and drops it (a
    built-in preset, loaded unmigrated, ignores it), so a part that gives its own dtype keeps it."""
    notes: list[str] = []
    preset = {k: v for k, v in CHROMA_LORA.items() if k != "__version"}  # presets carry no version
    o = _load(tmp_path, {**preset, "weight_dtype": "BFLOAT_16"}, notes=notes)
    assert o.fp8_base is True  # the transformer's own FLOAT_8 stays
    assert any("weight_dtype BFLOAT_16" in n and "no effect, every part gives its own" in n for n in notes)
    notes.clear()
    parts = {"transformer": {"train": True, "weight_dtype": "NONE"}, "text_encoder": {"train": False}}
    o = _load(tmp_path, {**preset, **parts, "weight_dtype": "FLOAT_8"}, notes=notes)
    assert o.fp8_base is True  # NONE took the legacy FLOAT_8: float8 storage of the frozen transformer
    assert any("the weight_dtype of transformer, which said NONE" in n for n in notes)
    o = _load(tmp_path, {**preset, **parts, "weight_dtype": "BFLOAT_16"})
    assert o.fp8_base is False
    problems = _problems(tmp_path, {**preset, "weight_dtype": "FLOAT_99"})
    assert len(problems) == 1 and "weight_dtype 'FLOAT_99': choose one of NONE" in problems[0]


def test_chroma_noise_settings_follow_onetrainers_chroma_path(tmp_path):
    notes: list[str] = []
    config = {**CHROMA_LORA, "timestep_distribution": "LOGIT_NORMAL", "noising_weight": 0.5, "noising_bias": -0.3,
              "dynamic_timestep_shifting": True, "timestep_shift": 3.0, "layer_filter": "",
              "layer_filter_preset": "blocks"}  # fmt: skip
    o = _load(tmp_path, config, notes=notes)
    # sigmoid(N(bias, weight + 1)), shifted s t / ((s - 1) t + 1) with timestep_shift: no dynamic shift on Chroma
    assert (o.timestep_sampling, o.logit_mean, o.logit_std) == ("logit_normal", -0.3, 1.5)
    assert (o.discrete_flow_shift, o.dynamic_timestep_shift) == (3.0, False)
    assert any("dynamic_timestep_shifting: OneTrainer shifts by resolution for Flux only" in n for n in notes)
    assert not any("layer_filter" in n for n in notes)  # blocks = every Linear of the blocks, exactly
    assert o.layer_filter == "transformer_block"


def test_chroma_text_encoder_training_and_guidance(tmp_path):
    notes: list[str] = []
    config = {**CHROMA_LORA, "text_encoder": {"train": True, "learning_rate": 5e-5},
              "transformer": {"train": True, "guidance_scale": 4.0}}  # fmt: skip
    o = _load(tmp_path, config, notes=notes)
    # T5 is Chroma's only text encoder: it trains alone (sdcore's train_t5 with train_text_encoder)
    assert (o.train_text_encoder, o.train_t5, o.te_lr) == (True, True, 5e-5)
    assert any("transformer.guidance_scale 4.0: no effect" in n for n in notes)


def test_chroma_parts_transformer_file_takes_t5_and_vae_from_the_base_folder(tmp_path):
    base, vae = tmp_path / "Chroma1-HD", tmp_path / "my_vae"
    base.mkdir()
    config = {**CHROMA_LORA, "base_model_name": str(base),
              "transformer": {"model_name": str(tmp_path / "Chroma1-HD.safetensors")}}  # fmt: skip
    o = _load(tmp_path, config)
    assert o.model == str(tmp_path / "Chroma1-HD.safetensors")
    assert (o.t5xxl, o.t5_tokenizer, o.vae) == (str(base / "text_encoder"), str(base / "tokenizer"), str(base / "vae"))
    o = _load(tmp_path, {**config, "vae": {"model_name": str(vae)}})
    assert o.vae == str(vae)  # vae.model_name wins over the base folder's vae, as ChromaModelLoader loads it
    problems = _problems(tmp_path, {**config, "base_model_name": "lodestones/Chroma1-HD"})
    assert (
        len(problems) == 1
        and "transformer.model_name" in problems[0]
        and "local Chroma diffusers folder" in problems[0]
    )


def test_chroma_fine_tune_is_dreambooth(tmp_path):
    notes: list[str] = []
    config = {
        "training_method": "FINE_TUNE", "model_type": "CHROMA_1", "base_model_name": "tiny:chroma",
        "learning_rate": 1e-5, "batch_size": 2, "epochs": 2, "train_dtype": "BFLOAT_16", "output_dtype": "BFLOAT_16",
        "output_model_format": "ORIGINAL_TRANSFORMER", "output_model_destination": "models/chroma.safetensors",
        "timestep_distribution": "INVERTED_PARABOLA", "noising_weight": 7.7,
        "transformer": {"train": True, "weight_dtype": "BFLOAT_16"},
        "text_encoder": {"train": True, "learning_rate": 2e-6, "stop_training_after": 0,
                         "stop_training_after_unit": "NEVER"},
        "vae": {"weight_dtype": "FLOAT_32"}, "optimizer": {"optimizer": "ADAFACTOR", "relative_step": False},
    }  # fmt: skip
    o = _load(tmp_path, config, "dreambooth", notes)
    assert (o.lr, o.save_format, o.save_dtype, o.optimizer) == (1e-5, "single-file", "bf16", "adafactor")
    # T5 (Chroma's text_encoder) is sdcore's third text-encoder slot
    assert (o.train_text_encoder, o.train_t5, o.te3_lr, o.te1_lr) == (True, True, 2e-6, None)
    assert any("ORIGINAL_TRANSFORMER: sdcore writes a ComfyUI checkpoint" in n for n in notes)
    assert _load(tmp_path, {**config, "output_model_format": "DIFFUSERS"}, "dreambooth").save_format == "diffusers"
    problems = _problems(tmp_path, {**config, "output_model_format": "SAFETENSORS"}, "dreambooth")
    assert problems == [f"{tmp_path / 'config.json'}: output_model_format 'SAFETENSORS': OneTrainer writes Chroma "
                        "as DIFFUSERS, ORIGINAL_TRANSFORMER or LEGACY_SAFETENSORS"]  # fmt: skip
    problems = _problems(tmp_path, {**config, "layer_filter": "attn"}, "dreambooth")
    assert len(problems) == 1 and "layer_filter 'attn': OneTrainer then trains only the matching" in problems[0]
    assert "run it with `sdcore train dreambooth`" in _problems(tmp_path, config)[0]


def test_chroma_refusals_one_line_each(tmp_path):
    config = {
        **CHROMA_LORA, "text_encoder_layer_skip": 2, "layer_filter": "", "layer_filter_preset": "attn-mlp-x",
        "output_model_format": "COMFY_LORA", "loss_weight_fn": "MIN_SNR_GAMMA",
        "text_encoder": {"train": False, "dropout_probability": 0.1},
    }  # fmt: skip
    problems = _problems(tmp_path, config)
    assert len(problems) == 5, problems
    expected = ("text_encoder_layer_skip 2", "layer_filter_preset 'attn-mlp-x'", "output_model_format 'COMFY_LORA'",
                "loss_weight_fn 'MIN_SNR_GAMMA'", "text_encoder.dropout_probability 0.1")  # fmt: skip
    for name in expected:
        assert sum(name in p for p in problems) == 1, (name, problems)
    assert all("\n" not in p for p in problems)
    # a custom filter (not the preset's own patterns) restricts the adapted modules: --layer-filter, with a note
    notes: list[str] = []
    custom = _load(tmp_path, {**CHROMA_LORA, "layer_filter": "attn,ff.net"}, notes=notes)
    assert (custom.layer_filter, custom.layer_filter_regex) == ("attn,ff.net", False)
    assert any("layer_filter 'attn,ff.net': applied to" in n for n in notes)


def test_chroma_samples_get_onetrainers_chroma_defaults(tmp_path):
    from sdcore.train.onetrainer_config import SAMPLE_NEGATIVE_DEFAULTS, read_sample_prompts

    path = _write(tmp_path, {**CHROMA_LORA, "samples": [{"prompt": "a ring"}, {"prompt": "b", "cfg_scale": 5.0,
                                                                                  "negative_prompt": ""}]})  # fmt: skip
    first, second = read_sample_prompts(path)
    # 1024 px, 30 steps, cfg 3.5 as real CFG (ChromaSampler: negative + cfg * (positive - negative)), no guidance
    assert (first.width, first.height, first.steps, first.cfg, first.guidance) == (1024, 1024, 30, 3.5, None)
    assert first.negative == SAMPLE_NEGATIVE_DEFAULTS["chroma"] and first.negative.startswith("This low-quality")
    assert (second.cfg, second.negative) == (5.0, "")


def test_cli_trains_a_onetrainer_chroma_lora_two_steps(tmp_path, sd_cli, pm, monkeypatch):
    """`sdcore train lora --config` with a CHROMA_1 config on the tiny Chroma: the transformer from a BFL file,
    T5 and the VAE from the base diffusers folder (OneTrainer's transformer.model_name), 2 images at batch 1
    for one epoch = 2 steps; the LoRA is written in diffusers keys with the translated rank and alpha."""
    from safetensors import safe_open
    from sdcore.models.family import family_adapter
    from sdcore.testing.datasets import make_tiny_dataset

    monkeypatch.chdir(tmp_path)
    bundle = family_adapter("chroma").create_tiny()
    bundle.save(tmp_path / "Chroma1-HD", format="diffusers")
    bundle.save(tmp_path / "Chroma1-HD.safetensors", format="bfl")
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    config = {
        **CHROMA_LORA, "base_model_name": "Chroma1-HD", "lora_rank": 4, "lora_alpha": 2.0, "learning_rate": 0.002,
        "epochs": 1, "batch_size": 1, "resolution": "64", "train_dtype": "FLOAT_32", "output_dtype": "FLOAT_32",
        "output_model_destination": "out/ot_chroma.safetensors", "learning_rate_warmup_steps": 0,
        "transformer": {"train": True, "model_name": "Chroma1-HD.safetensors", "gradient_checkpointing": False},
        "sample_after_unit": "NEVER",
        "concepts": [{"path": "data/1_sks", "name": "sks", "image": {"enable_crop_jitter": False}}],
    }  # fmt: skip
    path = _write(tmp_path, config)
    result = sd_cli(["train", "lora", "--config", str(path), "--no-progress"], pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = tmp_path / "out" / "ot_chroma.safetensors"
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        down = next(k for k in keys if k.endswith("single_transformer_blocks.0.proj_mlp.lora_A.weight"))
        assert f.get_tensor(down).shape[0] == 4
    # attn-mlp's patterns (attn, ff.net, proj_mlp), exactly as OneTrainer: no proj_out, no text-stream MLP
    assert not any(".proj_out." in k or ".ff_context." in k for k in keys)
    assert all(k.startswith("transformer.") for k in keys)  # no T5 LoRA (text_encoder.train false)
    assert meta["ss_max_train_steps"] == "2" and float(meta["ss_learning_rate"]) == 0.002


def test_a_fine_tunes_low_precision_text_encoder_stays_in_the_training_precision(tmp_path):
    """OneTrainer's Chroma Finetune 8GB/16GB presets store the frozen T5 as FLOAT_8. sdcore's fine-tune writes
    the whole model, so a T5 stored in fp8 would be written rounded: the translation keeps it in the training
    precision with a note (a LoRA run stores it: --text-encoder-weights-dtype)."""
    fine_tune = {**CHROMA_LORA, "training_method": "FINE_TUNE", "output_model_format": "DIFFUSERS",
                 "output_model_destination": "models/chroma", "layer_filter": "", "layer_filter_preset": "full",
                 "text_encoder": {"train": False, "weight_dtype": "FLOAT_8"}}  # fmt: skip
    for key in ("lora_rank", "lora_alpha"):
        fine_tune.pop(key)
    notes: list[str] = []
    o = _load(tmp_path, fine_tune, method="dreambooth", notes=notes)
    assert o.text_encoder_weights_dtype == "none"
    assert any("text_encoder.weight_dtype FLOAT_8: kept in the training precision" in n for n in notes)
    lora = _load(tmp_path, {**CHROMA_LORA, "text_encoder": {"train": False, "weight_dtype": "FLOAT_8"}})
    assert lora.text_encoder_weights_dtype == "fp8"
