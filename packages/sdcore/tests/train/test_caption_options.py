"""kohya's caption options through the runtime: CLI/kohya names, dataset TOML keys, the epoch
dropout with and without the text-encoder cache, and batch-size invariance."""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
from runtime_methods import ConvOutMethod
from sdcore.data.captions import process_caption
from sdcore.data.dataset import load_toml_dataset_config
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options, make_tiny_dataset
from sdcore.train import kohya
from sdcore.train.loop import TrainSession
from sdcore.train.options import TrainOptions
from sdcore.train.preflight import option_problems

CAPTION = "a, b;;;c, d, e, f"


def _session(tmp_path, **kw):
    data = make_tiny_dataset(tmp_path / "tags", n=2)
    for image in (data / "1_tiny").glob("*.png"):
        image.with_suffix(".txt").write_text(CAPTION, encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(data), "max_steps": 1, **kw})
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return o, s


def _captions(s, epochs):
    """{(epoch, entry, occurrence): caption} over ``epochs`` as the batch maker builds them."""
    out = {}
    for epoch in range(epochs):
        for refs in s.data.epoch_plan(epoch):
            batch = s.make_batch(refs)
            for ref, caption in zip(refs, batch.captions, strict=True):
                out[(ref.epoch, ref.entry, ref.occurrence)] = caption
    return out


@pytest.mark.parametrize("cache", [True, False])
def test_epoch_dropout_prefix_and_secondary_separator_in_batches(tmp_path, cache):
    _o, s = _session(
        tmp_path,
        caption_prefix="sks,",
        secondary_separator=";;;",
        caption_dropout_every_n_epochs=2,
        cache_text_encoder_outputs=cache,
    )
    assert (s.text_cache is not None) == cache
    captions = _captions(s, 4)
    assert {key[0] for key in captions} == {0, 1, 2, 3} and len(captions) == 8
    for (epoch, _, _), caption in captions.items():
        if epoch in (1, 3):  # kohya's epochs 2 and 4
            assert caption == ""
        else:
            assert caption == "sks, a, b,c, d, e, f"


def test_shuffled_captions_do_not_depend_on_batch_size(tmp_path):
    kw = dict(caption_prefix="sks,", shuffle_caption=True, keep_tokens=1, secondary_separator=";;;")
    kw["cache_text_encoder_outputs"] = False
    _, one = _session(tmp_path / "one", batch_size=1, **kw)
    o, two = _session(tmp_path / "two", batch_size=2, **kw)
    first, second = _captions(one, 3), _captions(two, 3)
    assert first == second
    assert len(set(first.values())) > 2  # shuffling happened
    for key, caption in first.items():  # and each is the sample's own rng's variant
        epoch, entry, occurrence = key
        from sdcore.train.data import SampleRef

        rng = random.Random(SampleRef(entry, occurrence, epoch).seed(o.seed, "caption"))
        want = process_caption(CAPTION, shuffle=True, keep_tokens=1, rng=rng, prefix="sks,", secondary_separator=";;;")
        assert caption == want and caption.startswith("sks, ") and "b,c" in caption


def test_kohya_names_and_dataset_toml_keys(tmp_path):
    present = [f.name for f in fields(TrainOptions)]
    items = {
        "caption_prefix": "sks,",
        "caption_suffix": "best",
        "secondary_separator": ";;;",
        "caption_dropout_every_n_epochs": 3,
    }
    out = kohya.translate(items, present, where="cfg")
    assert not out.problems and out.values == items
    for name in items:
        assert name not in kohya.UNSUPPORTED
    # the kohya_ss GUI writes "" / 0 for untouched fields: no value, no problem
    out = kohya.translate({"caption_prefix": "", "secondary_separator": ""}, present, where="cfg")
    assert not out.problems and not out.values
    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    config.write_text(
        "[general]\ncaption_prefix = 'g'\n[[datasets]]\ncaption_dropout_every_n_epochs = 4\n"
        "[[datasets.subsets]]\nimage_dir = 'img'\nsecondary_separator = ';;;'\ncaption_suffix = 's'\n"
        "[[datasets.subsets]]\nimage_dir = 'img'\ncaption_prefix = 'own'\n",
        encoding="utf-8",
    )
    first, second = load_toml_dataset_config(config, TrainOptions(caption_suffix="cli"))
    assert (first.caption_prefix, first.caption_suffix, first.secondary_separator) == ("g", "s", ";;;")
    assert first.caption_dropout_every_n_epochs == 4 and second.caption_dropout_every_n_epochs == 4
    assert (second.caption_prefix, second.caption_suffix, second.secondary_separator) == ("own", "cli", None)


def test_bad_epoch_dropout_is_a_preflight_problem():
    problems = option_problems(TrainOptions(model="m", data="d", output="o", caption_dropout_every_n_epochs=-1))
    assert any("--caption-dropout-every-n-epochs must be 0 (off) or more" in p for p in problems)


def test_dataset_network_multiplier_is_accepted_at_one_only(tmp_path):
    from sdcore.errors import DataError

    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    body = "[general]\nnetwork_multiplier = {g}\n[[datasets]]\nnetwork_multiplier = {d}\n[[datasets.subsets]]\nimage_dir = 'img'\n"
    config.write_text(body.format(g=1, d=1.0), encoding="utf-8")
    assert len(load_toml_dataset_config(config)) == 1
    config.write_text(body.format(g=1, d=-1.0), encoding="utf-8")
    with pytest.raises(DataError, match=r"datasets\[0\]: network_multiplier = -1.0: per-dataset multipliers"):
        load_toml_dataset_config(config)
    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\nnetwork_multiplier = 1.0\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match="kohya key 'network_multiplier' is not supported"):  # kohya: dataset level only
        load_toml_dataset_config(config)
