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


def test_aitoolkit_chroma_says_where_its_shift_and_t5_differ(tmp_path):
    """ai-toolkit's Chroma differs from its Flux in two places sdcore does not copy, so the translation says so.

    - The resolution shift: BaseSDTrainProcess (jobs/process/BaseSDTrainProcess.py, ``patch_size = 2`` only for
      ``is_flux``/flex, else ``unet.config.patch_size``) hands ``set_train_timesteps`` patch size 1 for Chroma
      (chroma_model.py's FakeConfig), and custom_flowmatch_sampler.py counts ``h * w // patch_size**2`` tokens:
      4x the packed token count sdcore (and ChromaPipeline at inference) uses.
    - T5: chroma_model.py ``get_prompt_embeds`` calls the encoder without the attention mask (the padding is
      masked in the transformer only); kohya, OneTrainer and ChromaPipeline give the encoder the mask, as sdcore.
    """
    from sdcore.train.config import load_options
    from sdcore.train.objectives import flux_shift_mu
    from sdplugin_lora.method import LoraOptions

    def aitoolkit_mu(h, w, patch):  # custom_flowmatch_sampler.calculate_shift with Chroma's scheduler_config
        m = (1.15 - 0.5) / (4096 - 256)
        return h * w // patch**2 * m + (0.5 - m * 256)

    # sdcore's resolution shift is the packed (patch 2) one; ai-toolkit's Chroma gets patch 1, a larger shift
    assert flux_shift_mu(128, 128) == pytest.approx(aitoolkit_mu(128, 128, 2))
    assert aitoolkit_mu(128, 128, 1) > flux_shift_mu(128, 128) + 2.0

    notes: list[str] = []
    path = _job(tmp_path, {"name_or_path": "tiny:chroma", "arch": "chroma"},
                {"noise_scheduler": "flowmatch", "timestep_type": "shift"})  # fmt: skip
    o = load_options(LoraOptions, path, notes=notes)
    assert (o.timestep_sampling, o.dynamic_timestep_shift) == ("shift_table", True)
    shift_notes = [n for n in notes if "timestep_type shift" in n and "patch size 1" in n]
    t5_notes = [n for n in notes if "without T5's attention mask" in n]
    assert len(shift_notes) == 1 and len(t5_notes) == 1, notes

    notes = []  # the sigmoid table has no resolution shift: only the T5 note
    load_options(LoraOptions, _job(tmp_path, {"name_or_path": "tiny:chroma", "arch": "chroma"},
                                   {"noise_scheduler": "flowmatch"}), notes=notes)  # fmt: skip
    assert not [n for n in notes if "patch size 1" in n] and len([n for n in notes if "T5" in n]) == 1, notes


def test_kohya_lora_on_chroma_leaves_the_text_encoder_frozen_unless_train_t5xxl(tmp_path):
    """flux_train_network.py trains CLIP-L unless --network_train_unet_only and T5 only with train_t5xxl;
    Chroma has no CLIP-L, so a kohya LoRA run there trains no text encoder and its T5 outputs can be
    cached (the same kohya run on FLUX.1 dev trains CLIP-L)."""
    pytest.importorskip("sdplugin_lora")
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    def run(model, extra=""):
        path = tmp_path / "kohya.toml"
        path.write_text(
            f'pretrained_model_name_or_path = "{model}"\nnetwork_module = "networks.lora_flux"\n'
            f"cache_text_encoder_outputs = true\n{extra}",
            encoding="utf-8",
        )
        notes: list[str] = []
        return load_options(LoraOptions, path, notes=notes), " | ".join(notes)

    o, notes = run("tiny:chroma", 'model_type = "chroma"\n')
    assert (o.train_text_encoder, o.train_t5, o.cache_text_encoder_outputs) == (False, False, True)
    assert "the text encoder is trained" not in notes
    o, _ = run("tiny:chroma", 'model_type = "chroma"\nnetwork_args = ["train_t5xxl=True"]\n')
    assert (o.train_text_encoder, o.train_t5) == (True, True)
    o, notes = run("tiny:flux")
    assert o.train_text_encoder is True and "the text encoder is trained unless" in notes


def test_kohya_lora_on_chroma_with_train_t5xxl_false_keeps_the_text_encoder_frozen(tmp_path):
    """network_args values are strings: kohya's lora_flux.py create_network reads ``train_t5xxl = True if
    train_t5xxl == "True" else False`` (networks/lora_flux.py:575-577), so ``train_t5xxl=False`` trains no T5, and on
    Chroma (no CLIP-L: flux_train_network.py:50-53, 70) no text encoder at all: the T5 outputs are cached."""
    pytest.importorskip("sdplugin_lora")
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    path = tmp_path / "kohya.toml"
    path.write_text(
        'pretrained_model_name_or_path = "tiny:chroma"\nmodel_type = "chroma"\nnetwork_module = "networks.lora_flux"\n'
        'cache_text_encoder_outputs = true\nnetwork_args = ["train_t5xxl=False"]\n',
        encoding="utf-8",
    )
    notes: list[str] = []
    o = load_options(LoraOptions, path, notes=notes)
    assert (o.train_text_encoder, o.train_t5, o.cache_text_encoder_outputs) == (False, False, True)
    assert not [n for n in notes if "cache_text_encoder_outputs:" in n or "the text encoder is trained" in n]
