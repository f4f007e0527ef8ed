"""kohya's caption options (prefix/suffix, secondary separator, caption dropout every N epochs,
wildcards, the keep-tokens separator with its fixed tail, token warm-up) against kohya's
``BaseDataset.process_caption`` (library/train_util.py), re-written here from its source with the
module-level ``random`` replaced by an explicit ``rng``: same order, same draws."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import pytest
from sdcore.data.captions import dropped_at_epoch, process_caption, read_caption, warmup_tag_count


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
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0


def kohya_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    replacer1, replacer2 = "\u2985", "\u2986"
    while replacer1 in caption or replacer2 in caption:
        replacer1 += "\u2985"
        replacer2 += "\u2986"
    caption = caption.replace("{{", replacer1).replace("}}", replacer2)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(replacer1, "{").replace(replacer2, "}")


def kohya_process_caption(
    subset: KohyaSubset,
    caption: str,
    current_epoch: int,
    rng: random.Random,
    current_step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """kohya's algorithm (TI replacements off); ``current_epoch`` 1-based.

    kohya overwrites ``subset.token_warmup_step`` with ``floor(step * max_train_steps)`` on the first
    call when it is below 1; here the resolved value is a local, the rest is line for line."""
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
    if subset.enable_wildcard:
        caption = kohya_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]
    warmup_step = subset.token_warmup_step
    if warmup_step < 1:
        warmup_step = math.floor(warmup_step * max_train_steps)
    if subset.shuffle_caption or warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        sep = subset.caption_separator
        fixed: list[str] = []
        fixed_suffix: list[str] = []
        if subset.keep_tokens_separator and subset.keep_tokens_separator in caption:
            fixed_part, flex_part = caption.split(subset.keep_tokens_separator, 1)
            if subset.keep_tokens_separator in flex_part:
                flex_part, fixed_suffix_part = flex_part.split(subset.keep_tokens_separator, 1)
                fixed_suffix = [t.strip() for t in fixed_suffix_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if subset.keep_tokens > 0:
                fixed = flex[: subset.keep_tokens]
                flex = tokens[subset.keep_tokens :]
        if warmup_step and current_step < warmup_step:
            tokens_len = (
                math.floor(current_step * ((len(flex) - subset.token_warmup_min) / warmup_step))
                + subset.token_warmup_min
            )
            flex = flex[:tokens_len]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def ours(subset: KohyaSubset, caption: str, epoch0: int, rng: random.Random, step: int = 0, max_steps: int = 0) -> str:
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
        caption_separator=subset.caption_separator,
        drop=dropped_at_epoch(subset.caption_dropout_every_n_epochs, epoch0),
        enable_wildcard=subset.enable_wildcard,
        token_warmup_min=subset.token_warmup_min,
        token_warmup_step=subset.token_warmup_step,
        step=step,
        max_steps=max_steps,
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


# --- wildcards, the keep-tokens separator's fixed tail, token warm-up --------------------------
# (captions without empty tags: kohya keeps an empty tag when it splits without a separator,
# sdcore drops it; that is the one known difference and these captions do not exercise it)

WILD = (
    "1girl, {red|blue|green} hair, {{literal}}, {smile|frown}, outdoors\nportrait of {a|the} girl, {day|night}\nx, y, z"
)
SEPARATED = "sks, 1girl ||| blue hair, smile, red eyes, outdoors, sky ||| masterpiece, best quality"
LONG = ", ".join(f"t{i}" for i in range(12))

NEW_CASES = {
    "wildcards, no shuffle": (KohyaSubset(enable_wildcard=True), WILD),
    "wildcards with prefix, suffix and shuffle": (
        KohyaSubset(
            enable_wildcard=True, caption_prefix="p,", caption_suffix=", s", shuffle_caption=True, keep_tokens=1
        ),
        WILD,
    ),
    "wildcards, caption and tag dropout": (
        KohyaSubset(enable_wildcard=True, caption_dropout_rate=0.2, caption_tag_dropout_rate=0.3, shuffle_caption=True),
        WILD,
    ),
    "multi-line caption without wildcards reads line 1": (KohyaSubset(shuffle_caption=True), WILD),
    "separator head and tail, shuffle": (KohyaSubset(keep_tokens_separator="|||", shuffle_caption=True), SEPARATED),
    "separator head and tail, tag dropout": (
        KohyaSubset(keep_tokens_separator="|||", caption_tag_dropout_rate=0.4, keep_tokens=5),
        SEPARATED,
    ),
    "separator without shuffle keeps the text": (KohyaSubset(keep_tokens_separator="|||"), SEPARATED),
    "separator and wildcard in one caption": (
        KohyaSubset(keep_tokens_separator="|||", enable_wildcard=True, shuffle_caption=True),
        "sks ||| {a|b}, c, d ||| {e|f}",
    ),
    "shuffle and tag dropout together": (
        KohyaSubset(shuffle_caption=True, caption_tag_dropout_rate=0.3, keep_tokens=2),
        LONG,
    ),
    "warm-up in steps": (KohyaSubset(token_warmup_step=10, token_warmup_min=2), LONG),
    "warm-up as a fraction, shuffled, tag dropout": (
        KohyaSubset(token_warmup_step=0.5, token_warmup_min=1, shuffle_caption=True, caption_tag_dropout_rate=0.2),
        LONG,
    ),
    "warm-up with keep_tokens and separator tail": (
        KohyaSubset(token_warmup_step=8, token_warmup_min=0, keep_tokens_separator="|||"),
        SEPARATED,
    ),
    "warm-up with more min than tags": (KohyaSubset(token_warmup_step=6, token_warmup_min=20), "a, b, c"),
    # caption_separator: the split at the separator as given, the ", " join, the secondary separator back to it
    "caption_separator '|', keep_tokens, shuffle, tag dropout, secondary": (
        KohyaSubset(
            caption_separator="|",
            shuffle_caption=True,
            keep_tokens=1,
            caption_tag_dropout_rate=0.3,
            secondary_separator=";;;",
        ),
        "sks|a|b;;;c|d|e|f",
    ),
    "caption_separator ' / ' with the keep-tokens separator": (
        KohyaSubset(caption_separator=" / ", keep_tokens_separator="|||", shuffle_caption=True),
        "x / y ||| a / b / c ||| z",
    ),
    "caption_separator ';' under warm-up": (
        KohyaSubset(caption_separator=";", token_warmup_step=8),
        "t0;t1;t2;t3;t4;t5",
    ),
}


@pytest.mark.parametrize("name", list(NEW_CASES))
def test_new_caption_options_equal_kohya_process_caption(name):
    subset, caption = NEW_CASES[name]
    max_steps = 20
    produced = set()
    for epoch0 in range(2):
        for step in (0, 1, 3, 5, 9, 10, 19):
            for seed in range(30):
                want = kohya_process_caption(subset, caption, epoch0 + 1, random.Random(seed), step, max_steps)
                got = ours(subset, caption, epoch0, random.Random(seed), step, max_steps)
                assert got == want, (name, epoch0, step, seed)
                produced.add(got)
    varies = subset.enable_wildcard or subset.shuffle_caption or subset.caption_tag_dropout_rate
    varies = varies or (subset.token_warmup_step and subset.token_warmup_min < 3)  # more min than tags: all of them
    assert (len(produced) > 2) == bool(varies), produced


def test_wildcard_and_separator_facts():
    seen = set()
    for seed in range(200):
        out = process_caption(WILD, enable_wildcard=True, rng=random.Random(seed))
        assert "{" not in out.replace("{literal}", "") and "\n" not in out
        seen.add(out.split(",")[0])
        if out.startswith("1girl"):
            assert "{literal}" in out  # {{ }} are literal braces
    assert seen == {"1girl", "portrait of a girl", "portrait of the girl", "x"}
    # without the option a multi-line caption (only a TOML/read_caption with all lines gives one) is line 1
    assert process_caption("a, b\nc", rng=random.Random(0)) == "a, b"
    # the separator's fixed head and tail never move; only the middle shuffles
    for seed in range(50):
        tags = process_caption(SEPARATED, shuffle=True, keep_tokens_separator="|||", rng=random.Random(seed)).split(
            ", "
        )
        assert tags[:2] == ["sks", "1girl"] and tags[-2:] == ["masterpiece", "best quality"]
        assert sorted(tags[2:-2]) == sorted(["blue hair", "smile", "red eyes", "outdoors", "sky"])
    # off: kohya leaves the caption (separator included) as it is
    assert process_caption(SEPARATED, keep_tokens_separator="|||", rng=random.Random(0)) == SEPARATED


def test_token_warmup_formula_facts():
    # kohya: floor(step * (n - min) / warmup) + min tags of the shuffled part, all of them from step `warmup` on
    assert [warmup_tag_count(12, 1, 10, s) for s in (0, 1, 5, 9)] == [1, 2, 6, 10]
    counts = [
        len(
            process_caption(
                LONG, token_warmup_step=0.5, token_warmup_min=2, step=s, max_steps=20, rng=random.Random(0)
            ).split(", ")
        )
        for s in range(12)
    ]
    assert counts == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12]
    # the first tags are the ones kept (before shuffling), the fixed ones always stay
    out = process_caption(LONG, token_warmup_step=4, token_warmup_min=1, keep_tokens=3, step=0, rng=random.Random(0))
    assert out == "t0, t1, t2, t3"


def test_read_caption_keeps_all_lines_for_wildcards(tmp_path):
    image = tmp_path / "a.png"
    (tmp_path / "a.txt").write_text("\n  first, {x|y}  \n\nsecond line\n", encoding="utf-8")
    assert read_caption(image) == "first, {x|y}"
    assert read_caption(image, all_lines=True) == "first, {x|y}\nsecond line"
