"""A OneTrainer concepts file in the runtime: a concept's ``loss_weight`` weights each of its samples'
loss, its balancing repeats its images, and a ``VALIDATION`` concept is held out (never trained) and
is what the validation loss runs on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.testing.datasets import make_tiny_dataset

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from test_onetrainer import concept  # the UI-saved concept object


def test_loss_weight_balancing_and_validation_concept_in_the_runtime(tmp_path):
    from sdcore.train.loop import TrainSession

    root = make_tiny_dataset(tmp_path / "d", n=3)
    heavy, light = root / "1_sks", make_tiny_dataset(tmp_path / "e", n=2, concept="other") / "1_other"
    val = make_tiny_dataset(tmp_path / "v", n=2, concept="val") / "1_val"
    cfg = tmp_path / "concepts.json"
    cfg.write_text(
        json.dumps(
            [
                concept(heavy, balancing=2.0, loss_weight=2.5),
                concept(light, balancing=4, balancing_strategy="SAMPLES", loss_weight=0.5),
                concept(val, type="VALIDATION"),
            ]
        )
    )
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(cfg), "batch_size": 1})
    # crop jitter (on in OneTrainer's defaults) with cached latents: one crop per image kept in the cache, as
    # OneTrainer's cache keeps the crop it drew when it was filled
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    assert all(sub.random_crop_once and not sub.random_crop for sub in s.data.index.subsets)
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(cfg), "batch_size": 1, "cache_latents": False})
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    entries = s.data.entries
    assert {entries[i].path.parent for i in s.data.held_out} == {val}
    plan = s.data.epoch_plan(0)
    used = [ref.entry for batch in plan for ref in batch]
    assert len(used) == 3 * 2 + 2 * 2 and not set(used) & s.data.held_out  # repeats; nothing held out trains
    weight = {heavy: 2.5, light: 0.5}
    for batch in plan:
        b = s.make_batch(batch)
        want = [weight[entries[ref.entry].path.parent] for ref in batch]
        assert torch.equal(b.loss_weights.cpu(), torch.tensor(want))
    refs = [ref for group in s.validation_groups for ref in group]
    assert sorted({r.entry for r in refs}) == sorted(s.data.held_out) and len(refs) == 2
    assert s.validate() is not None
