"""Pure post-processing: CSV parsing, thresholds, MCut, formatting."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdcore.errors import ConfigError, ModelFormatError
from sdplugin_taggers.tags import (
    KAOMOJI,
    Selector,
    TagFormat,
    TagResult,
    format_tags,
    load_selected_tags,
    mcut_threshold,
    normalize_tag,
    select,
)
from wdmodels import TAGS, write_tags_csv

PROBS = [p for _, _, p in TAGS]


@pytest.fixture
def tag_list(tmp_path: Path):
    return load_selected_tags(write_tags_csv(tmp_path / "selected_tags.csv"))


def test_csv_keeps_quoted_names_and_categories(tag_list) -> None:
    assert tag_list.names[7] == 'don\'t_say_"lazy"'
    assert tag_list.indices(9) == [0, 1, 2, 3]
    assert tag_list.indices(4) == [10, 11, 12]
    assert len(tag_list) == len(TAGS)


def test_csv_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not found"):
        load_selected_tags(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,tag,cat\n1,a,0\n", encoding="utf-8")
    with pytest.raises(ModelFormatError, match="header"):
        load_selected_tags(bad)
    bad.write_text("tag_id,name,category,count\n1,a,zero,5\n", encoding="utf-8")
    with pytest.raises(ModelFormatError, match=r"bad.csv:2: category"):
        load_selected_tags(bad)


def test_mcut_on_hand_made_vectors() -> None:
    assert mcut_threshold([0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.5)
    assert mcut_threshold([0.95, 0.6, 0.5, 0.4, 0.3, 0.1]) == pytest.approx(0.775)
    assert mcut_threshold([0.7]) == 0.0
    assert mcut_threshold([]) == 0.0


def test_fixed_thresholds_are_strict(tag_list) -> None:
    rating, general, character = select(PROBS, tag_list)
    assert rating == pytest.approx({"general": 0.7, "sensitive": 0.2, "questionable": 0.05, "explicit": 0.05})
    assert set(general) == {"1girl", "long_hair", "^_^", 'don\'t_say_"lazy"'}
    assert set(character) == {"hatsune_miku_(vocaloid)"}
    _, general, character = select(PROBS, tag_list, general_threshold=0.4, character_threshold=0.5)
    assert 'don\'t_say_"lazy"' not in general  # 0.4 is not > 0.4
    assert set(character) == {"hatsune_miku_(vocaloid)"}


def test_mcut_selection_with_character_floor(tag_list) -> None:
    _, general, character = select(PROBS, tag_list, mcut=True)
    assert set(general) == {"1girl"}  # gap 0.95 -> 0.6 is the largest
    assert set(character) == {"hatsune_miku_(vocaloid)", "other_char"}  # threshold 0.26
    low = list(PROBS)
    low[10:13] = [0.12, 0.11, 0.0]  # MCut would say 0.055; the floor keeps it at 0.15
    _, _, character = select(low, tag_list, mcut=True)
    assert character == {}


def test_numpy_selector_matches_python(tag_list) -> None:
    import numpy as np

    for mcut in (False, True):
        expected = select(PROBS, tag_list, mcut=mcut)
        got = Selector(tag_list, mcut=mcut)(np.asarray(PROBS, dtype=np.float32))
        for e, g in zip(expected, got, strict=True):
            assert set(e) == set(g)
            assert g == pytest.approx(e, abs=1e-6)


def test_selector_rejects_width_mismatch(tag_list) -> None:
    with pytest.raises(ModelFormatError, match="13 tags"):
        Selector(tag_list)([0.5] * 5)


RATING = {"general": 0.7, "sensitive": 0.2}
GENERAL = {"1girl": 0.95, "long_hair": 0.6, "^_^": 0.5, "(o)_(o)": 0.45, "smile_(happy)": 0.4}
CHARACTER = {"hatsune_miku_(vocaloid)": 0.9}


def test_default_format_spaces_characters_first_kaomoji_kept() -> None:
    tags = format_tags(RATING, GENERAL, CHARACTER, TagFormat())
    assert tags == ["hatsune miku (vocaloid)", "1girl", "long hair", "^_^", "(o)_(o)", "smile (happy)"]
    assert {"^_^", "(o)_(o)"} <= KAOMOJI


def test_underscores_escape_and_ratings() -> None:
    fmt = TagFormat(underscores=True, escape=True, ratings="first")
    tags = format_tags(RATING, GENERAL, CHARACTER, fmt)
    assert tags[0] == "general"
    assert tags[1] == "hatsune_miku_\\(vocaloid\\)"
    assert "\\(o\\)_\\(o\\)" in tags
    assert format_tags(RATING, GENERAL, {}, TagFormat(ratings="last"))[-1] == "general"
    assert "general" not in format_tags(RATING, GENERAL, {}, TagFormat(ratings="off"))


def test_exclude_include_first_and_max_tags() -> None:
    fmt = TagFormat(exclude=("long hair", "Hatsune_Miku_(vocaloid)"), include_first=("mytrigger", "1girl"))
    assert format_tags(RATING, GENERAL, CHARACTER, fmt) == ["mytrigger", "1girl", "^_^", "(o)_(o)", "smile (happy)"]
    capped = format_tags(RATING, GENERAL, CHARACTER, TagFormat(max_tags=2, include_first=("trig",)))
    assert capped == ["trig", "hatsune miku (vocaloid)", "1girl"]
    assert format_tags(RATING, GENERAL, CHARACTER, TagFormat(max_tags=0)) == []


def test_format_rejects_bad_options() -> None:
    with pytest.raises(ConfigError):
        TagFormat(ratings="middle")
    with pytest.raises(ConfigError):
        TagFormat(max_tags=-1)


def test_normalize_tag() -> None:
    assert normalize_tag("Cropped_Shirt ") == normalize_tag("cropped shirt")
    assert normalize_tag("smile \\(happy\\)") == normalize_tag("smile_(happy)")


def test_result_json_and_caption_text() -> None:
    result = TagResult(path="x.png", rating=dict(RATING), general={"1girl": 0.9}, size=(4, 3))
    record = result.to_json()
    assert record["caption"] == "1girl" and record["image_size"] == [4, 3] and record["general"] == {"1girl": 0.9}
    assert TagResult(path=None, text="a cat, sitting").tags() == ["a cat", "sitting"]
