"""kohya's caption options (prefix/suffix, secondary separator, caption dropout every N epochs)
against kohya's ``BaseDataset.process_caption`` (library/train_util.py), re-written here from its
source with the module-level ``random`` replaced by an explicit ``rng``: same order, same draws."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from sdcore.data.captions import dropped_at_epoch, process_caption


@dataclass
class KohyaSubset:
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    shuffle_caption: bool = False
    caption_tag_dropout_rate: float = 0.0
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_separator: str = ","


def kohya_process_caption(subset: KohyaSubset, caption: str, current_epoch: int, rng: random.Random) -> str:
    """kohya's algorithm (token warmup, wildcards and TI replacements off); ``current_epoch`` 1-based."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    is_drop_out = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    is_drop_out = is_drop_out or (
        subset.caption_dropout_every_n_epochs > 0 and current_epoch % subset.caption_dropout_every_n_epochs == 0
    )
    if is_drop_out:
        return ""
    caption = caption.split("\n")[0]
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
        sep = subset.caption_separator
        fixed: list[str] = []
        if subset.keep_tokens_separator and subset.keep_tokens_separator in caption:
            fixed_part, flex_part = caption.split(subset.keep_tokens_separator, 1)
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if subset.keep_tokens > 0:
                fixed = flex[: subset.keep_tokens]
                flex = tokens[subset.keep_tokens :]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def ours(subset: KohyaSubset, caption: str, epoch0: int, rng: random.Random) -> str:
    return process_caption(
        caption,
        shuffle=subset.shuffle_caption,
        keep_tokens=subset.keep_tokens,
        tag_dropout=subset.caption_tag_dropout_rate,
        caption_dropout=subset.caption_dropout_rate,
        rng=rng,
        keep_tokens_separator=subset.keep_tokens_separator or None,
        prefix=subset.caption_prefix or "",
        suffix=subset.caption_suffix or "",
        secondary_separator=subset.secondary_separator,
        drop=dropped_at_epoch(subset.caption_dropout_every_n_epochs, epoch0),
    )


CAPTION = "1girl, long;;;blue hair, smile, red eyes, outdoors, sky"

CASES = {
    "prefix and suffix only": KohyaSubset(caption_prefix="sks woman,", caption_suffix=", masterpiece"),
    "prefix glued to the first tag": KohyaSubset(caption_prefix="sks", shuffle_caption=True, keep_tokens=1),
    "prefix counts for keep_tokens": KohyaSubset(caption_prefix="sks, style", shuffle_caption=True, keep_tokens=2),
    "suffix takes part in the shuffle": KohyaSubset(caption_suffix=", trigger", shuffle_caption=True),
    "secondary separator, no shuffle": KohyaSubset(secondary_separator=";;;"),
    "secondary separator keeps a tag whole": KohyaSubset(secondary_separator=";;;", shuffle_caption=True),
    "secondary separator under tag dropout": KohyaSubset(secondary_separator=";;;", caption_tag_dropout_rate=0.4),
    "keep_tokens_separator with prefix": KohyaSubset(
        caption_prefix="sks |||", keep_tokens_separator="|||", shuffle_caption=True, secondary_separator=";;;"
    ),
    "caption dropout rate": KohyaSubset(caption_dropout_rate=0.3, shuffle_caption=True, caption_prefix="p,"),
    "dropout every 3 epochs": KohyaSubset(caption_dropout_every_n_epochs=3, caption_prefix="sks,"),
    "both dropouts": KohyaSubset(caption_dropout_every_n_epochs=2, caption_dropout_rate=0.5, shuffle_caption=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_captions_equal_kohya_process_caption(name):
    subset = CASES[name]
    produced = set()
    for epoch0 in range(6):
        for seed in range(40):
            want = kohya_process_caption(subset, CAPTION, epoch0 + 1, random.Random(seed))
            got = ours(subset, CAPTION, epoch0, random.Random(seed))
            assert got == want, (name, epoch0, seed)
            produced.add(got)
    # the case exercises what it names (randomness where there is some, no dead branch)
    random_case = subset.shuffle_caption or subset.caption_tag_dropout_rate or subset.caption_dropout_rate
    assert (len(produced) > 2) == bool(random_case), produced


def test_secondary_separator_and_prefix_facts():
    rng = random.Random(0)
    assert process_caption("a;;;b, c", secondary_separator=";;;", rng=rng) == "a,b, c"
    assert process_caption("a, b", prefix="p", suffix="s", rng=rng) == "p a, b s"
    # the joined tag never splits while shuffling: "x;;;y" always arrives as "x,y" in one place
    for seed in range(30):
        out = process_caption("a, x;;;y, b, c", shuffle=True, secondary_separator=";;;", rng=random.Random(seed))
        assert "x,y" in out and out.count("x") == 1


def test_dropped_at_epoch_counts_epochs_as_kohya():
    # kohya: current_epoch starts at 1 and drops when current_epoch % N == 0 -> epochs N, 2N, ...
    assert [e for e in range(9) if dropped_at_epoch(3, e)] == [2, 5, 8]
    assert not any(dropped_at_epoch(0, e) for e in range(5))
    assert not dropped_at_epoch(1, -1)  # evaluation refs
