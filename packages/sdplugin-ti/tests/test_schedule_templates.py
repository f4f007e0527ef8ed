from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sdcore.errors import ConfigError
from sdcore.train.lr_schedule import parse_schedule
from sdplugin_ti.templates import BUILTIN, load_template, pick_line, render


def test_a1111_example():
    s = parse_schedule("0.005:100, 1e-3:1000, 1e-5")
    assert [s.rate_at(i) for i in (0, 99, 100, 999, 1000, 50_000)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]


def test_last_rate_continues_instead_of_stopping():
    s = parse_schedule("0.005:100, 1e-3:1000")
    assert s.rate_at(5000) == 1e-3
    assert parse_schedule("0.01:-1").rate_at(10**6) == 0.01
    assert parse_schedule("2e-3").is_constant


rates = st.floats(min_value=1e-9, max_value=10.0, allow_nan=False, allow_infinity=False)


@given(
    st.lists(st.tuples(rates, st.integers(min_value=1, max_value=10_000)), min_size=1, max_size=6), st.booleans(), rates
)
def test_valid_strings_parse(pairs, open_end, last):
    ends, step = [], 0
    for _, gap in pairs:
        step += gap
        ends.append(step)
    items = [f"{r!r}:{e}" for (r, _), e in zip(pairs, ends, strict=False)]
    if open_end:
        items.append(repr(last))
    s = parse_schedule(" , ".join(items))
    for (rate, _), end in zip(pairs, ends, strict=False):
        assert s.rate_at(end - 1) == rate
    final = last if open_end else pairs[-1][0]
    assert s.rate_at(ends[-1] + 10) == final


@given(
    st.sampled_from(
        [
            "",
            " ",
            "abc",
            "0.1:",
            ":100",
            "0.1:100:5",
            "0.1:10, 0.2:5",
            "0.1, 0.2:100",
            "-0.1",
            "0:10",
            "nan",
            "0.1:1.5",
            "1e-3;5",
        ]
    )
)
def test_invalid_strings_raise_config_error(text):
    with pytest.raises(ConfigError):
        parse_schedule(text)


@given(st.text(alphabet="0123456789.:,- eE+abc", max_size=20))
def test_any_string_parses_or_raises_config_error(text):
    try:
        s = parse_schedule(text)
    except ConfigError:
        return
    assert s.rate_at(0) > 0


def test_builtin_templates_have_placeholders():
    for name in BUILTIN:
        lines = load_template(name)
        assert lines
        if name not in ("none", "filewords"):
            assert all("[name]" in line for line in lines)
        if name.endswith("_filewords"):
            assert all("[filewords]" in line for line in lines)
    assert load_template("none") == ("picture",)
    assert load_template("filewords") == ("[filewords]",)  # the captions as written (the name inside them)


def test_user_template_and_substitution(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a [name] doing [filewords]\n\n  [filewords] by [name]  \n", encoding="utf-8")
    lines = load_template(str(path))
    assert lines == ("a [name] doing [filewords]", "[filewords] by [name]")
    assert render(lines[1], "tok tok__ti1", "a red [name] hat") == "a red tok tok__ti1 hat by tok tok__ti1"
    seen = {pick_line(lines, random.Random(i)) for i in range(20)}
    assert seen == set(lines)
    with pytest.raises(ConfigError, match="no such file"):
        load_template(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no template lines"):
        load_template(str(tmp_path / "blank.txt"))
