"""Chroma runs written for other trainers: kohya's flux_train_network.py ``--model_type chroma`` (its script
defaults, ``guidance_scale`` 0 as its docs require), ai-toolkit's ``arch: chroma``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def _kohya(tmp_path, model, body=""):
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    path = tmp_path / "kohya.toml"
    path.write_text(f'pretrained_model_name_or_path = "{model}"\nlearning_rate = 1e-4\n{body}', encoding="utf-8")
    notes: list[str] = []
    return load_options(TrainOptions, path, notes=notes), " | ".join(notes)


def test_kohya_model_type_chroma_gets_the_scripts_defaults_and_checks(tmp_path):
    from sdcore.errors import ConfigError

    o, notes = _kohya(tmp_path, "tiny:chroma", 'model_type = "chroma"\napply_t5_attn_mask = true\n')
    assert (o.timestep_sampling, o.model_prediction_type, o.discrete_flow_shift, o.guidance_scale) == (
        "sigma", "sigma_scaled", 3.0, 0.0)  # fmt: skip
    assert "chroma: guidance_scale 0.0" in notes
    o, _ = _kohya(tmp_path, "tiny:chroma", 'model_type = "chroma"\ntimestep_sampling = "sigmoid"\n'
                  "discrete_flow_shift = 3.0\nguidance_scale = 0.0\n")  # fmt: skip
    assert (o.timestep_sampling, o.discrete_flow_shift) == ("sigmoid", 1.0)  # kohya does not shift its sigmoid
    with pytest.raises(ConfigError) as info:
        _kohya(tmp_path, "tiny:chroma", 'model_type = "flux"\nguidance_scale = 3.5\n')
    problems = info.value.problems
    assert len(problems) == 2
    assert "model_type = 'flux' but the model is Chroma" in problems[0]
    assert "guidance_scale 3.5: Chroma is trained with guidance 0" in problems[1]


def _job(tmp_path, model: dict, train: dict):
    path = tmp_path / "job.json"
    process = {"type": "sd_trainer", "model": model, "datasets": [{"folder_path": "imgs"}], "train": train,
               "network": {"type": "lora", "linear": 4, "linear_alpha": 4}}  # fmt: skip
    path.write_text(json.dumps({"job": "extension", "config": {"name": "run", "process": [process]}}), encoding="utf-8")
    return path


def test_aitoolkit_arch_chroma(tmp_path):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    path = _job(tmp_path, {"name_or_path": "tiny:chroma", "arch": "chroma"},
                {"noise_scheduler": "flowmatch", "timestep_type": "flux_shift"})  # fmt: skip
    o = load_options(LoraOptions, path, notes=[])
    # chroma_model.py: Flux's resolution-dependent scheduler, PEFT-format transformer LoRA (alpha = rank)
    assert (o.timestep_sampling, o.discrete_flow_shift, o.dynamic_timestep_shift) == ("shift_table", 1.0, True)
    assert (o.alpha, o.key_layout) == (4, "diffusers")


# OneTrainer's CHROMA_1 configs: tests/test_onetrainer_chroma.py
