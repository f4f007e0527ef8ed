"""kohya's SD3/Flux-only ``ss_*`` keys: ``ss_apply_lg_attn_mask`` (sd3_train_network.py's update_metadata)
and ``ss_model_type`` (flux_train_network.py's; always "flux" here, sdcore has no Chroma), written only
for runs of those families, as kohya's scripts for them write them."""

from __future__ import annotations

import pytest
from sdcore.train.method import RunFacts, SaveInfo
from sdplugin_lora.method import LoraOptions, flow_metadata, kohya_training_metadata


def _meta(tmp_path, family, **options):
    run = RunFacts(total_steps=1, started_at=0.0, family=family)
    info = SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=0, metadata={}, final=False, run=run)
    o = LoraOptions(**options)
    return {**kohya_training_metadata(o, info), **flow_metadata(o, family)}  # as LoraMethod.metadata joins them


@pytest.mark.parametrize("mask", [True, False])
def test_sd3_records_the_lg_mask_as_kohya(tmp_path, mask):
    meta = _meta(tmp_path, "sd3", apply_lg_attn_mask=mask)
    assert meta["ss_apply_lg_attn_mask"] == str(mask) and "ss_model_type" not in meta


def test_flux_records_its_model_type_and_other_families_neither(tmp_path):
    meta = _meta(tmp_path, "flux")
    assert meta["ss_model_type"] == "flux" and "ss_apply_lg_attn_mask" not in meta
    for family in ("sd1", "sdxl"):
        meta = _meta(tmp_path, family)
        assert "ss_model_type" not in meta and "ss_apply_lg_attn_mask" not in meta
