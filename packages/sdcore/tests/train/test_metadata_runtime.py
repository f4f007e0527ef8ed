"""The runtime's batches from kohya's fine-tuning metadata dataset: the caption options apply to the
caption kohya builds from the metadata (caption + "," + tags), per sample, as they do to caption files."""

from __future__ import annotations

import json

from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options, make_tiny_dataset
from sdcore.train.loop import TrainSession


def test_metadata_captions_in_batches_with_prefix_keep_tokens_shuffle_and_epoch_dropout(tmp_path):
    root = make_tiny_dataset(tmp_path / "ft", n=2, captions=False)
    images = root / "1_tiny"
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps({"img00": {"caption": "a cat", "tags": "t1, t2, t3"}, "img01": {"tags": "u1, u2"}}), encoding="utf-8"
    )
    overrides = {
        "data": str(images),
        "metadata_file": str(meta),
        "dataset_repeats": 2,
        "caption_prefix": "sks,",
        "keep_tokens": 2,
        "shuffle_caption": True,
        "caption_dropout_every_n_epochs": 2,
        "batch_size": 1,
        "max_steps": 1,
    }
    o = contract_options(ConvOutMethod, tmp_path, overrides)
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    assert sorted(e.caption for e in s.data.entries) == ["a cat,t1, t2, t3", "u1, u2"]
    seen: dict[int, list[str]] = {}
    for epoch in range(2):
        plan = s.data.epoch_plan(epoch)
        assert len(plan) == 4  # 2 images x --dataset-repeats 2, batch 1
        for refs in plan:
            seen.setdefault(epoch, []).extend(s.make_batch(refs).captions)
    assert seen[1] == ["", "", "", ""]  # kohya's epoch 2: every caption dropped
    for caption in seen[0]:
        tags = caption.split(", ")
        if "a cat" in tags:  # "sks, a cat" are the two kept tokens, the tags shuffle behind them
            assert tags[:2] == ["sks", "a cat"] and sorted(tags[2:]) == ["t1", "t2", "t3"]
        else:
            assert tags[:2] == ["sks", "u1"] and tags[2:] == ["u2"]
    assert len(seen[0]) == 4
