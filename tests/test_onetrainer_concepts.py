"""``sdcore train lora --data concepts.json``: a OneTrainer concepts file (every concept a full object, as
its UI saves it) trains to the last step, records its folders and repeats as kohya's metadata does, and a
file with settings sdcore cannot reproduce stops in the pre-flight (exit 2, every problem, no model load)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from click.testing import CliRunner
from sdcore.testing.contract import make_tiny_dataset

# fmt: off
UI_CONCEPT = {
    "__version": 2,
    "image": {"__version": 0, "enable_crop_jitter": True, "enable_random_flip": False, "enable_fixed_flip": False,
              "enable_random_rotate": False, "enable_fixed_rotate": False, "random_rotate_max_angle": 0.0,
              "enable_random_brightness": False, "enable_fixed_brightness": False,
              "random_brightness_max_strength": 0.0, "enable_random_contrast": False, "enable_fixed_contrast": False,
              "random_contrast_max_strength": 0.0, "enable_random_saturation": False,
              "enable_fixed_saturation": False, "random_saturation_max_strength": 0.0, "enable_random_hue": False,
              "enable_fixed_hue": False, "random_hue_max_strength": 0.0, "enable_resolution_override": False,
              "resolution_override": "512", "enable_random_circular_mask_shrink": False,
              "enable_random_mask_rotate_crop": False},
    "text": {"__version": 0, "prompt_source": "sample", "prompt_path": "", "enable_tag_shuffling": False,
             "tag_delimiter": ",", "keep_tags_count": 1, "tag_dropout_enable": False, "tag_dropout_mode": "FULL",
             "tag_dropout_probability": 0.0, "tag_dropout_special_tags_mode": "NONE", "tag_dropout_special_tags": "",
             "tag_dropout_special_tags_regex": False, "caps_randomize_enable": False,
             "caps_randomize_mode": "capslock, title, first, random", "caps_randomize_probability": 0.0,
             "caps_randomize_lowercase": False},
    "name": "", "path": "", "seed": 123456, "enabled": True, "type": "STANDARD", "include_subdirectories": False,
    "image_variations": 1, "text_variations": 1, "balancing": 1.0, "balancing_strategy": "REPEATS",
    "loss_weight": 1.0, "concept_stats": {},
}
# fmt: on


def _concept(path: Path, **changes) -> dict:
    out = copy.deepcopy(UI_CONCEPT)
    out.update(path=str(path), name=path.name)
    for key, value in changes.items():
        part, _, name = key.partition("__")
        if name:
            out[part][name] = value
        else:
            out[key] = value
    return out


def _args(cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "lora", "--model", "tiny:sd1", "--data", str(cfg), "--output", str(out), "--resolution", "64",
            "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--batch-size", "2", "--max-steps", "3",
            "--lr", "1e-3", "--no-progress", "--rank", "2", "--no-cache-latents", *extra]  # fmt: skip


def test_train_lora_with_a_concepts_file_reaches_its_last_step(tmp_path, pm):
    from sdcore.cli import build_cli
    from sdplugin_lora.format import read_lora

    a = make_tiny_dataset(tmp_path / "a", n=2, name="mychar") / "1_mychar"
    b = make_tiny_dataset(tmp_path / "b", n=2, name="style") / "1_style"
    val = make_tiny_dataset(tmp_path / "v", n=1, name="val") / "1_val"
    cfg = tmp_path / "training_concepts" / "concepts.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps([
        _concept(a, balancing=3.0, image__enable_random_flip=True, text__enable_tag_shuffling=True),
        _concept(b, balancing=2, balancing_strategy="SAMPLES", text__prompt_source="filename", loss_weight=0.5),
        _concept(val, type="VALIDATION"),
        _concept(tmp_path / "off", enabled=False),
    ], indent=4))  # fmt: skip
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(build_cli(pm), _args(cfg, out, "--validate-every-n-steps", "3"))
    assert result.exit_code == 0, result.output
    assert "disabled; skipped" in result.output
    meta = read_lora(out).metadata
    assert meta["ss_max_train_steps"] == "3"
    assert meta["ss_training_finished_at"] != "None"
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs == {"1_mychar": {"n_repeats": 3, "img_count": 2}, "1_style": {"n_repeats": 1, "img_count": 2}}
    assert meta["ss_num_train_images"] == str(2 * 3 + 2 * 1) and meta["ss_num_validation_images"] == "1"


def test_train_refuses_what_sdcore_cannot_reproduce_before_loading_the_model(tmp_path, pm):
    from sdcore.cli import build_cli

    a = make_tiny_dataset(tmp_path / "a", n=3, name="x") / "1_x"
    cfg = tmp_path / "concepts.json"
    cfg.write_text(json.dumps([
        _concept(a, balancing=1.5, image__enable_random_brightness=True),
        _concept(a, type="PRIOR_PREDICTION"),
    ]))  # fmt: skip
    out = tmp_path / "out.safetensors"
    # a model that does not exist: the dataset's problems are reported with it, nothing loads
    args = _args(cfg, out)
    args[args.index("tiny:sd1")] = str(tmp_path / "missing.safetensors")
    result = CliRunner().invoke(build_cli(pm), args)
    assert result.exit_code == 2, result.output
    text = result.output
    assert "balancing 1.5 REPEATS = 4 samples per epoch from 3 images" in text
    assert "image.enable_random_brightness: sdcore has no brightness augmentation" in text
    assert "type PRIOR_PREDICTION" in text and "missing.safetensors" in text
    assert "Traceback" not in text and not out.exists()
