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


def test_dataset_network_multiplier_is_read_at_dataset_level(tmp_path):
    """Per-dataset strengths are carried now (tests/train/test_network_strength.py); a subset may not set one."""
    from sdcore.errors import DataError

    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    body = "[general]\nnetwork_multiplier = {g}\n[[datasets]]\nnetwork_multiplier = {d}\n[[datasets.subsets]]\nimage_dir = 'img'\n"
    config.write_text(body.format(g=1, d=1.0), encoding="utf-8")
    assert [s.network_strength for s in load_toml_dataset_config(config)] == [1.0]
    config.write_text(body.format(g=1, d=-1.0), encoding="utf-8")
    assert [s.network_strength for s in load_toml_dataset_config(config)] == [-1.0]
    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\nnetwork_multiplier = 1.0\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match="'network_multiplier' belongs in a"):  # kohya: dataset level only
        load_toml_dataset_config(config)


# --- wildcards, keep_tokens_separator, token warm-up through the runtime ----------------------

WILD = "sks ||| {red|blue|green}, {circle|square}, small ||| tail\nother, {x|y}"


def _wild_session(tmp_path, caption, **kw):
    data = make_tiny_dataset(tmp_path / "tags", n=2)
    for image in (data / "1_tiny").glob("*.png"):
        image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(data), "max_steps": 1, **kw})
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return o, s


def test_wildcards_and_separator_in_batches_are_each_samples_draws(tmp_path):
    from sdcore.train.data import SampleRef

    kw = dict(enable_wildcard=True, keep_tokens_separator="|||", shuffle_caption=True, cache_text_encoder_outputs=False)
    o, s = _wild_session(tmp_path, WILD, **kw)
    assert s.data.entries[0].caption == WILD  # every line read when the option is on
    captions = _captions(s, 10)
    assert len(set(captions.values())) > 4
    for (epoch, entry, occurrence), caption in captions.items():
        rng = random.Random(SampleRef(entry, occurrence, epoch).seed(o.seed, "caption"))
        want = process_caption(WILD, shuffle=True, enable_wildcard=True, keep_tokens_separator="|||", rng=rng)
        assert caption == want and "{" not in caption and "|||" not in caption
        line_one = caption.startswith("sks, ") and caption.endswith(", tail")  # fixed head and tail
        assert line_one or set(caption.split(", ")) in ({"other", "x"}, {"other", "y"})


def test_wildcards_with_the_text_cache_use_variants(tmp_path):
    _, s = _wild_session(tmp_path, "{a|b|c|d|e|f} photo", enable_wildcard=True, caption_variants=6)
    assert s.text_cache is not None and len(s.text_cache.variants[0]) == 6
    assert set(_captions(s, 4).values()) <= {f"{c} photo" for c in "abcdef"}
    assert len(set(s.text_cache.variants[0])) > 1


def test_token_warmup_follows_the_step_and_skips_the_text_cache(tmp_path):
    caption = ", ".join(f"t{i}" for i in range(10))
    _, s = _wild_session(tmp_path, caption, token_warmup_step=0.5, token_warmup_min=2, max_steps=8, keep_tokens=1)
    assert s.text_cache is None and s.batches.total_steps == 8  # captions change with the step: encoded live
    refs = s.data.epoch_plan(0)[0]
    counts = [len(s.make_batch(refs, step=step).captions[0].split(", ")) for step in range(6)]
    # kohya: warm-up ends at floor(0.5 * 8) = 4; 1 fixed tag + floor(step * (9 - 2) / 4) + 2
    assert counts == [3, 4, 6, 8, 10, 10]


def test_keep_tokens_separator_cli_and_dataset_toml_work_the_same(tmp_path):
    present = [f.name for f in fields(TrainOptions)]
    items = {
        "keep_tokens_separator": "|||",
        "enable_wildcard": True,
        "token_warmup_min": 3,
        "token_warmup_step": 0.25,
        "weighted_captions": True,
    }
    out = kohya.translate(items, present, where="cfg")
    assert not out.problems and out.values == items
    for name in items:
        assert name not in kohya.UNSUPPORTED
    off = {"keep_tokens_separator": "", "enable_wildcard": False, "token_warmup_step": 0, "token_warmup_min": 1}
    assert not kohya.translate(off, present, where="cfg").problems
    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\nkeep_tokens_separator = '|||'\nenable_wildcard = true\n"
        "token_warmup_min = 3\ntoken_warmup_step = 0.25\n",
        encoding="utf-8",
    )
    (from_toml,) = load_toml_dataset_config(config)
    (from_cli,) = load_toml_dataset_config(
        _plain_config(tmp_path), TrainOptions(**{k: v for k, v in out.values.items() if k != "weighted_captions"})
    )
    names = ("keep_tokens_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step")
    assert [getattr(from_toml, n) for n in names] == [getattr(from_cli, n) for n in names] == ["|||", True, 3, 0.25]
    from sdcore.errors import DataError

    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\ntoken_warmup_step = -1\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match="'token_warmup_step' must be a non-negative number"):
        load_toml_dataset_config(config)


def _plain_config(tmp_path):
    config = tmp_path / "plain.toml"
    config.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\n", encoding="utf-8")
    return config


def test_bad_caption_option_values_are_preflight_problems():
    base = dict(model="m", data="d", output="o")
    problems = option_problems(TrainOptions(**base, token_warmup_step=-0.5, token_warmup_min=-1))
    assert any("--token-warmup-step must be 0 (off)" in p for p in problems)
    assert any("--token-warmup-min must be 0 or more" in p for p in problems)
    assert not option_problems(TrainOptions(**base, token_warmup_step=0.3, keep_tokens_separator="|||"))


def test_the_training_loop_tells_captions_its_step(tmp_path):
    caption = ", ".join(f"t{i}" for i in range(10))
    kw = dict(token_warmup_step=4, token_warmup_min=1, max_steps=6, batch_size=1, weighted_captions=True)
    _, s = _wild_session(tmp_path, caption, **kw)
    seen: list[str] = []
    encode = s.method.encode

    def recording(bundle, captions):
        seen.extend(captions)
        return encode(bundle, captions)

    s.method.encode = recording  # type: ignore[method-assign]
    s.run()
    # one caption per optimizer step: 1 + floor(step * 9 / 4) tags, all 10 from step 4 on
    assert [len(c.split(", ")) for c in seen] == [1, 3, 5, 7, 10, 10]


@pytest.mark.parametrize(
    ("regex", "why"),
    [
        ("[a-z", "not a valid regular expression (unterminated character set at position 0)"),
        (
            "(a)(b)",
            "has 2 groups: the words are the whole matches or one group's text; make the other groups "
            "non-capturing, (?:...)",
        ),
    ],
)
def test_a_bad_word_regex_is_a_preflight_problem_with_the_others(tmp_path, regex, why):
    """--filename-word-regex (A1111's Filename word regex) that cannot run is found in the pre-flight, before any
    model is read (the model here does not even exist), once although every subset inherits it, beside the rest."""
    from sdcore.train.preflight import run_preflight

    data = make_tiny_dataset(tmp_path / "named", n=2)
    (data / "2_more").mkdir()
    for image in (data / "1_tiny").glob("*.png"):
        (data / "2_more" / image.name).write_bytes(image.read_bytes())
    missing = tmp_path / "missing.safetensors"
    values = {"data": str(data), "model": str(missing), "filename_captions": "a1111", "filename_word_regex": regex,
              "lr": -1.0}  # fmt: skip
    o = contract_options(ConvOutMethod, tmp_path, values)
    problems = run_preflight(ConvOutMethod(o), o, plan=False).problems
    assert problems.count(f"--filename-word-regex {regex!r}: {why}") == 1, problems
    assert "--lr must be positive, got -1.0" in problems  # all at once
    assert any(str(missing) in p for p in problems), problems
