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


@pytest.mark.parametrize(("color_aug", "random_crop"), [(False, False), (True, False), (False, True)])
def test_lora_metadata_records_them_as_kohya(tmp_path, color_aug, random_crop):
    meta = kohya_training_metadata(
        LoraOptions(color_aug=color_aug, random_crop=random_crop),
        SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=0, metadata={}, final=False),
    )
    assert meta["ss_color_aug"] == str(color_aug) and meta["ss_random_crop"] == str(random_crop)
