"""kohya's image options through the kohya translation and into the LoRA file's metadata."""

from __future__ import annotations

import pytest
from sdcore.train.config import load_options
from sdcore.train.method import SaveInfo
from sdplugin_lora.method import LoraOptions, kohya_training_metadata


def _load(tmp_path, items: dict, notes: list[str] | None = None) -> LoraOptions:
    import tomli_w

    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(items))
    return load_options(LoraOptions, cfg, notes=notes if notes is not None else [])


def test_kohya_names_translate_with_kohyas_cache_default(tmp_path):
    notes: list[str] = []
    o = _load(
        tmp_path,
        {
            "network_dim": 4,  # a run written in kohya's names (these five are sdcore's names too)
            "random_crop": True,
            "color_aug": True,
            "masked_loss": True,
            "alpha_mask": True,
            "conditioning_data_dir": "m",
        },
        notes,
    )
    assert (o.random_crop, o.color_aug, o.masked_loss, o.alpha_mask, o.conditioning_data_dir) == (
        True,
        True,
        True,
        True,
        "m",
    )
    # kohya caches nothing unless --cache_latents, and refuses the cache with these options
    assert o.cache_latents is False
    assert any("latents are not cached unless --cache_latents" in n for n in notes)
    # asked for explicitly, the cache stays on (and the pre-flight refuses it, as kohya asserts)
    assert _load(tmp_path, {"network_dim": 4, "random_crop": True, "cache_latents": True}).cache_latents is True
    assert _load(tmp_path, {"random_crop": True}).cache_latents is True  # sdcore's names: sdcore's defaults
    # off (what the GUI writes for untouched fields): sdcore's default cache stays
    off = _load(tmp_path, {"random_crop": False, "color_aug": False, "network_dim": 4})
    assert (off.random_crop, off.color_aug, off.cache_latents) == (False, False, True)
    face = _load(tmp_path, {"network_dim": 4, "face_crop_aug_range": "2.0,4.0"})
    assert (face.face_crop_aug_range, face.cache_latents, face.buckets) == ("2.0,4.0", False, False)
    listed = _load(tmp_path, {"face_crop_aug_range": [2.0, 3.0]})  # a TOML list, as kohya's dataset TOML has it
    assert listed.face_crop_aug_range == "2.0,3.0"


@pytest.mark.parametrize(("color_aug", "random_crop"), [(False, False), (True, False), (False, True)])
def test_lora_metadata_records_them_as_kohya(tmp_path, color_aug, random_crop):
    meta = kohya_training_metadata(
        LoraOptions(color_aug=color_aug, random_crop=random_crop),
        SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=0, metadata={}, final=False),
    )
    assert meta["ss_color_aug"] == str(color_aug) and meta["ss_random_crop"] == str(random_crop)
    assert meta["ss_face_crop_aug_range"] == "None"
    face = kohya_training_metadata(
        LoraOptions(face_crop_aug_range="2,4"),
        SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=0, metadata={}, final=False),
    )
    assert face["ss_face_crop_aug_range"] == "(2.0, 4.0)"  # str() of kohya's parsed tuple


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def test_cli_lists_missing_mask_images_and_exits_2(tmp_path):
    from click.testing import CliRunner
    from PIL import Image
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=3, size=64)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "img00.png")
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--masked_loss", "--conditioning_data_dir", str(masks), "--color_aug", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "2 image(s) without a mask image" in result.output and "img01.png" in result.output
    assert "img02.png" in result.output and "--no-cache-latents" in result.output


def test_a_lora_run_with_every_image_option_trains_and_records_them(tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image
    from safetensors import safe_open
    from sdcore.testing.datasets import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=(96, 64))
    for path in (data / "1_sks").glob("*.png"):
        rgba = np.array(Image.open(path).convert("RGBA"))
        rgba[:, :48, 3] = 0
        Image.fromarray(rgba, "RGBA").save(path)
    out = tmp_path / "o.safetensors"
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(out), "--resolution", "64",
            "--min-bucket-reso", "64", "--max-bucket-reso", "64", "--max-steps", "2", "--random-crop", "--color-aug",
            "--alpha-mask", "--flip", "--no-cache-latents", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_random_crop"] == "True" and meta["ss_color_aug"] == "True"
