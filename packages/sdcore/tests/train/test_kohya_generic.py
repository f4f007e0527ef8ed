"""kohya's generic train_util options (cache_text_encoder_outputs_to_disk, caption_separator,
resize_interpolation, ddp_*, torch_compile, deepspeed ...): what each becomes in sdcore."""

from __future__ import annotations

from dataclasses import fields

import pytest
from runtime_methods import ConvOutOptions
from sdcore.errors import ConfigError
from sdcore.train import kohya
from sdcore.train.config import load_options
from sdcore.train.options import TrainOptions

PRESENT = [f.name for f in fields(TrainOptions)]


# --- cache_text_encoder_outputs_to_disk ---------------------------------------------------------


def test_te_cache_to_disk_turns_the_in_memory_cache_on():
    out = kohya.translate({"cache_text_encoder_outputs_to_disk": True}, PRESENT, where="cfg")
    assert not out.problems and out.values == {"cache_text_encoder_outputs": True}
    assert any("not written to .npz files" in n for n in out.notes)
    # kohya (sdxl_train_util, sd3/flux scripts) turns caching on even over an explicit false
    items = {"cache_text_encoder_outputs": False, "cache_text_encoder_outputs_to_disk": True}
    out = kohya.translate(items, PRESENT, where="cfg")
    assert not out.problems and out.values == {"cache_text_encoder_outputs": True}
    # off (what the kohya_ss GUI writes for an untouched field): nothing changes, no note
    out = kohya.translate({"cache_text_encoder_outputs_to_disk": False}, PRESENT, where="cfg")
    assert not out.problems and not out.values and not out.notes


def test_te_cache_to_disk_from_a_kohya_toml(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        "[model_arguments]\ncache_text_encoder_outputs = false\ncache_text_encoder_outputs_to_disk = true\n",
        encoding="utf-8",
    )
    notes: list[str] = []
    o = load_options(ConvOutOptions, cfg, notes=notes)
    assert o.cache_text_encoder_outputs is True
    assert any(n.startswith("cache_text_encoder_outputs_to_disk:") for n in notes)
    assert "cache_text_encoder_outputs_to_disk" in kohya.flag_names()  # a store_true flag on kohya's CLI
