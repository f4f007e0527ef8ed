from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdcore.data.captions import process_caption, read_caption, split_tags, tag_frequencies
from sdcore.errors import DataError


def test_read_caption_missing_empty_and_fallback(tmp_path):
    image = tmp_path / "a.png"
    assert read_caption(image) is None
    (tmp_path / "a.txt").write_text("\n  1girl, solo  \nsecond line\n", encoding="utf-8")
    assert read_caption(image) == "1girl, solo"  # first non-blank line, stripped
    (tmp_path / "b.caption").write_text("from caption file", encoding="utf-8")
    assert read_caption(tmp_path / "b.png", ".txt") == "from caption file"  # .txt missing -> .caption
    (tmp_path / "c.txt").write_text("   \n", encoding="utf-8")
    assert read_caption(tmp_path / "c.png") == ""
    (tmp_path / "d.txt").write_text("\ufeffbom caption", encoding="utf-8")
    assert read_caption(tmp_path / "d.png", "txt") == "bom caption"


def test_configured_extension_wins_over_fallback(tmp_path):
    (tmp_path / "a.txt").write_text("txt", encoding="utf-8")
    (tmp_path / "a.caption").write_text("caption", encoding="utf-8")
    assert read_caption(tmp_path / "a.png", ".caption") == "caption"
    assert read_caption(tmp_path / "a.png", ".txt") == "txt"


def test_non_utf8_caption_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match=r"a\.txt.*not UTF-8"):
        read_caption(tmp_path / "a.png")


def test_split_tags():
    assert split_tags(" a, b ,, c ,") == ["a", "b", "c"]
    assert split_tags("a|b", "|") == ["a", "b"]
    assert split_tags("") == []


def test_keep_tokens_and_determinism():
    caption = "sks, dog, grass, sky, tree, sun"
    out1 = process_caption(caption, shuffle=True, keep_tokens=2, rng=random.Random(5))
    out2 = process_caption(caption, shuffle=True, keep_tokens=2, rng=random.Random(5))
    assert out1 == out2
    assert split_tags(out1)[:2] == ["sks", "dog"]
    assert sorted(split_tags(out1)) == sorted(split_tags(caption))
    variants = {process_caption(caption, shuffle=True, keep_tokens=2, rng=random.Random(s)) for s in range(30)}
    assert len(variants) > 5, "shuffle must actually reorder"


def test_no_processing_returns_caption_unchanged():
    caption = "a,b ,  c"
    assert process_caption(caption, rng=random.Random(0)) == caption


def test_keep_tokens_separator():
    caption = "sks dog, red collar ||| grass, sky, tree"
    out = process_caption(caption, shuffle=True, keep_tokens_separator="|||", rng=random.Random(1))
    assert split_tags(out)[:2] == ["sks dog", "red collar"]
    assert sorted(split_tags(out)[2:]) == ["grass", "sky", "tree"]


def test_caption_dropout_in_expectation():
    rng = random.Random(0)
    outs = [process_caption("a, b, c", caption_dropout=0.25, rng=rng) for _ in range(4000)]
    rate = sum(o == "" for o in outs) / len(outs)
    assert 0.22 < rate < 0.28


def test_tag_dropout_in_expectation_and_keep_tokens_never_dropped():
    rng = random.Random(0)
    tags = [f"t{i}" for i in range(10)]
    kept = Counter()
    trials = 2000
    for _ in range(trials):
        out = split_tags(process_caption(", ".join(tags), keep_tokens=2, tag_dropout=0.3, rng=rng))
        assert out[:2] == ["t0", "t1"]
        kept.update(out[2:])
    rate = sum(kept.values()) / (8 * trials)
    assert 0.67 < rate < 0.73
    assert all(0.6 < kept[t] / trials < 0.8 for t in tags[2:])


def test_tag_frequencies_count_images_not_occurrences():
    freqs = tag_frequencies(["a, b, a", "b, c", "b"])
    assert freqs == {"b": 3, "a": 1, "c": 1}
    assert list(freqs) == ["b", "a", "c"]


tag_text = st.text(alphabet="abcdefgh xyz_", min_size=1, max_size=8).map(str.strip).filter(bool)


@settings(max_examples=150, deadline=None)
@given(
    tags=st.lists(tag_text, min_size=0, max_size=12),
    keep=st.integers(0, 14),
    shuffle=st.booleans(),
    tag_dropout=st.sampled_from([0.0, 0.2, 0.9]),
    seed=st.integers(0, 2**32),
)
def test_processing_invariants(tags, keep, shuffle, tag_dropout, seed):
    caption = ", ".join(tags)
    out = process_caption(caption, shuffle=shuffle, keep_tokens=keep, tag_dropout=tag_dropout, rng=random.Random(seed))
    again = process_caption(
        caption, shuffle=shuffle, keep_tokens=keep, tag_dropout=tag_dropout, rng=random.Random(seed)
    )
    assert out == again
    out_tags = split_tags(out)
    # kept tags stay first, in order
    assert out_tags[: min(keep, len(tags))] == tags[:keep]
    # output tags are a sub-multiset of the input tags
    assert not (Counter(out_tags) - Counter(tags))
    if tag_dropout == 0.0:
        assert sorted(out_tags) == sorted(tags)


def test_face_crop_image_falls_back_to_the_shared_caption(tmp_path):
    """kohya's read_caption (sd-scripts library/train_util.py:1946-1970) also tries ``<name><ext>`` for an
    image named ``<name>_<cx>_<cy>_<w>_<h>``: crops of one photo share its caption."""
    (tmp_path / "ph.txt").write_text("face caption\n", encoding="utf-8")
    assert read_caption(tmp_path / "ph_100_120_40_50.png") == "face caption"
    assert read_caption(tmp_path / "my_photo_100_120_40_50.png") is None  # name "my_photo": no my_photo.txt
    (tmp_path / "my_photo.txt").write_text("two-part name", encoding="utf-8")
    assert read_caption(tmp_path / "my_photo_100_120_40_50.png") == "two-part name"
    (tmp_path / "ph_100_120_40_50.txt").write_text("own caption", encoding="utf-8")
    assert read_caption(tmp_path / "ph_100_120_40_50.png") == "own caption"  # its own file first
    assert read_caption(tmp_path / "ph_1_2_3.png") is None  # four parts: not a face-crop name


def test_a_warmup_fraction_of_zero_steps_still_splits_the_caption():
    """kohya enters the tag block when ``token_warmup_step > 0`` as given (train_util.py:867), before the
    fraction is floored to steps (:890-891): with 0.05 of 10 steps (0 steps of warm-up) the caption is still
    split and re-joined with ", ", so the ``|||`` keep-tokens separator leaves the text."""
    rng = random.Random(0)
    out = process_caption(
        "a,b ||| c,d", rng=rng, keep_tokens_separator="|||", token_warmup_step=0.05, max_steps=10, step=3
    )
    assert out == "a, b, c, d"
