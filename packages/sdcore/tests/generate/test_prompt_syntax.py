"""The A1111 prompt syntax: documented examples, error cases and hypothesis invariants."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sdcore.errors import ConfigError
from sdcore.generate.networks import NetworkRef
from sdcore.generate.prompt_syntax import (
    BREAK_CHUNK,
    Chunk,
    escape_emphasis,
    format_emphasis,
    format_network,
    is_break,
    parse_emphasis,
    parse_networks,
    parse_prompt,
    plain_text,
    split_breaks,
)

# The examples A1111 documents for its attention parser (behaviour, not code).
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * 1.1 * 1.1),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.1**4),
            (".", 1.1),
        ],
    ),
]


def _close(actual, expected):
    assert [c[0] for c in actual] == [c[0] for c in expected]
    assert [c[1] for c in actual] == pytest.approx([c[1] for c in expected], rel=1e-9)


@pytest.mark.parametrize(("text", "expected"), DOCUMENTED)
def test_documented_examples(text, expected):
    _close(parse_emphasis(text), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word:0.25)", [("word", 0.25)]),
        ("(word: 1.5 )", [("word", 1.5)]),
        ("(word:-1)", [("word", -1.0)]),
        ("(word:.5)", [("word", 0.5)]),
        ("((word:2))", [("word", 2.2)]),
        ("[(word:2)]", [("word", 2 / 1.1)]),
        ("(a:b:1.2)", [("a:b", 1.2)]),  # only the last ':number)' is a weight
        ("(a:b)", [("a:b", 1.1)]),  # not a number: literal text, default 1.1
        ("x:1.2) y", [("x:1.2) y", 1.0)]),  # stray weighted close is literal
        ("a) b]", [("a) b]", 1.0)]),
        ("[unclosed", [("unclosed", 1 / 1.1)]),
        ("\\\\", [("\\", 1.0)]),
        ("(\\(x\\):1.5)", [("(x)", 1.5)]),
        ("()", [("", 1.0)]),
    ],
)
def test_emphasis_cases(text, expected):
    _close(parse_emphasis(text), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a\\b", [("ab", 1.0)]), ("C:\\x\\", [("C:x", 1.0)]), ("(a\\ b)", [("a b", 1.1)]), ("\\", [("", 1.0)])],
)
def test_a_lone_backslash_is_dropped(text, expected):
    # A1111's parse_prompt_attention (modules/prompt_parser.py:421 at 28bd8e1) keeps what follows the backslash
    # of any token starting with one: nothing for the lone-backslash token; kohya's weighted captions alike
    # (library/strategy_base.py parse_prompt_attention)
    _close(parse_emphasis(text), expected)


def test_break_splits_and_eats_whitespace():
    chunks = parse_emphasis("a cat BREAK (a dog) BREAK")
    assert chunks[0] == ("a cat", 1.0)
    assert is_break(chunks[1]) and chunks[1] == BREAK_CHUNK
    assert chunks[2] == ("a dog", 1.1)
    assert is_break(chunks[3])
    assert len(chunks) == 4
    assert split_breaks(chunks) == [[("a cat", 1.0)], [("a dog", 1.1)], []]
    # BREAK must be a whole word in capitals
    assert parse_emphasis("BREAKING break xBREAK") == [("BREAKING break xBREAK", 1.0)]


def test_strict_mode_rejects_unbalanced():
    for text in ["(a", "a)", "[a", "a]", "a:1.2)"]:
        with pytest.raises(ConfigError):
            parse_emphasis(text, strict=True)
    assert parse_emphasis("(a) [b] (c:2)", strict=True) == [
        ("a", 1.1),
        (" ", 1.0),
        ("b", 1 / 1.1),
        (" ", 1.0),
        ("c", 2.0),
    ]


# A1111's re_attention (modules/prompt_parser.py:361 at 28bd8e1) reads a weight as ``:\s*([+-]?[.\d]+)\s*\)``:
# digits, dots and a sign only. An exponent ends that match, the ':' is then a lone literal token and the
# ')' closes the bracket at 1.1; spaces around the number are allowed.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(x:1e-1)", [("x:1e-1", 1.1)]),
        ("a (x:1E2) b", [("a ", 1.0), ("x:1E2", 1.1), (" b", 1.0)]),
        ("(x:-1)", [("x", -1.0)]),
        ("(x:+.5)", [("x", 0.5)]),
        ("(x:.5)", [("x", 0.5)]),
        ("(x:2.)", [("x", 2.0)]),
        ("(x: 1.2)", [("x", 1.2)]),
        ("(x:\t1.2 \n)", [("x", 1.2)]),
        ("(x:1 .2)", [("x:1 .2", 1.1)]),  # a space inside the number: no weight
        ("x:1.2.3) y", [("x:1.2.3) y", 1.0)]),  # no bracket open: the text stays, as in A1111
    ],
)
def test_emphasis_weight_is_a1111s_pattern(text, expected):
    _close(parse_emphasis(text), expected)


@pytest.mark.parametrize("text", ["(x:1.2.3)", "(x:.)", "(x:-.)", "(x:1..)"])
def test_a_weight_of_digits_and_dots_that_is_no_number_is_config_error(text):
    # A1111 matches these as a weight and float() raises (modules/prompt_parser.py:428 at 28bd8e1)
    with pytest.raises(ConfigError, match="invalid emphasis weight"):
        parse_emphasis(text)


def test_non_finite_weight_is_config_error():
    with pytest.raises(ConfigError, match="finite"):
        parse_emphasis("(a:" + "9" * 400 + ")")


@pytest.mark.parametrize("weight", [1e-5, 5e-324, 1.5e20, -2.5e-7, 0.1])
def test_format_writes_weights_the_parser_reads(weight):
    text = format_emphasis([Chunk("a", weight)])
    assert "e" not in text.lower().replace("a", "", 1)
    assert parse_emphasis(text) == [("a", weight)]


# --- networks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "clean", "refs"),
    [
        ("a cat", "a cat", []),
        ("a <lora:x> cat", "a  cat", [NetworkRef("lora", "x", (), "<lora:x>")]),
        ("<lora:x:0.8>a", "a", [NetworkRef("lora", "x", (0.8,), "<lora:x:0.8>")]),
        (
            "<lora:my style v1.5-final:-1>",
            "",
            [NetworkRef("lora", "my style v1.5-final", (-1.0,), "<lora:my style v1.5-final:-1>")],
        ),
        ("<lora:x:1e-1:2>", "", [NetworkRef("lora", "x", (0.1, 2.0), "<lora:x:1e-1:2>")]),
        ("<hypernet:anime:1> b", " b", [NetworkRef("hypernet", "anime", (1.0,), "<hypernet:anime:1>")]),
        (
            "<lora:x:te=0.5:unet=1>",
            "",
            [NetworkRef("lora", "x", (), "<lora:x:te=0.5:unet=1>", (("te", 0.5), ("unet", 1.0)))],
        ),
        (
            "<lora:x:0.5:unet=1>",
            "",
            [NetworkRef("lora", "x", (0.5,), "<lora:x:0.5:unet=1>", (("unet", 1.0),))],
        ),
        ("<lora: spaced :  0.5 >", "", [NetworkRef("lora", "spaced", (0.5,), "<lora: spaced :  0.5 >")]),
        # not tags: no word:, nothing between, a bare word
        ("a <3 b > c", "a <3 b > c", []),
        ("<lora>", "<lora>", []),
        ("<:x>", "<:x>", []),
    ],
)
def test_parse_networks(prompt, clean, refs):
    assert parse_networks(prompt) == (clean, refs)


def test_several_tags_keep_order_and_emphasis_after():
    chunks, refs = parse_prompt("(cat:1.2) <lora:a:0.5>, <hypernet:b> [dog]")
    assert [(r.tag, r.name, r.weight) for r in refs] == [("lora", "a", 0.5), ("hypernet", "b", 1.0)]
    _close(chunks, [("cat", 1.2), (" ,  ", 1.0), ("dog", 1 / 1.1)])


@pytest.mark.parametrize(
    "prompt",
    [
        "<lora::1>",
        "<lora: :1>",
        "<lora:x:abc>",
        "<lora:x:>",
        "<lora:x:inf>",
        "<lora:x:nan>",
        "<lora:x:1.2.3>",
        "<lora:x:te=1:te=2>",
        "<lora:x:te=1:0.5>",
        "<lora:x:te=>",
    ],
)
def test_malformed_network_tags(prompt):
    with pytest.raises(ConfigError) as info:
        parse_networks(prompt)
    assert "<lora:" in str(info.value)


def test_ref_arg_positional_and_named():
    _, (ref,) = parse_networks("<lora:x:0.5>")
    assert ref.arg(0, "te", 1.0) == 0.5 and ref.arg(1, "unet", ref.arg(0, "te", 1.0)) == 0.5
    _, (ref,) = parse_networks("<lora:x:te=0.25:unet=2>")
    assert ref.weight == 1.0 and ref.arg(0, "te", 1.0) == 0.25 and ref.arg(1, "unet", 9.0) == 2.0
    _, (ref,) = parse_networks("<lora:x>")
    assert ref.arg(2, "dyn", 7.0) == 7.0


# --- hypothesis ---------------------------------------------------------------------------

_ALPHABET = st.sampled_from(list("ab :,.()[]\\<>=-_1eE+ \nBREAK"))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=60) | st.text(max_size=40))
def test_never_crashes(text):
    try:
        chunks, refs = parse_prompt(text)
    except ConfigError:
        return
    assert chunks and all(isinstance(c, Chunk) for c in chunks)
    assert all("<" + r.tag + ":" in r.text for r in refs)
    with contextlib.suppress(ConfigError):
        parse_emphasis(text, strict=True)


_PLAIN = st.text(alphabet=st.characters(blacklist_characters="()[]\\<>:", blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(_PLAIN.filter(lambda t: "BREAK" not in t))
def test_plain_text_is_one_chunk(text):
    assert parse_emphasis(text) == [(text, 1.0)] if text else [("", 1.0)]


_WEIGHTS = st.one_of(st.just(1.0), st.floats(min_value=-4, max_value=4, allow_nan=False).filter(lambda w: w != 1.0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=12).filter(lambda t: "BREAK" not in t), _WEIGHTS), max_size=6))
def test_emphasis_round_trip(pieces):
    assume("BREAK" not in "".join(text for text, _ in pieces))  # neighbours could spell it
    chunks = [Chunk(text, weight) for text, weight in pieces]
    parsed = parse_emphasis(format_emphasis(chunks))
    # the parser merges equal neighbours, so compare after merging the input the same way
    merged: list[Chunk] = []
    for chunk in chunks:
        if merged and merged[-1].weight == chunk.weight:
            merged[-1] = Chunk(merged[-1].text + chunk.text, chunk.weight)
        else:
            merged.append(chunk)
    assert parsed == (merged or [("", 1.0)])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30).filter(lambda t: "BREAK" not in t))
def test_escape_reads_back_literally(text):
    assert plain_text(parse_emphasis(escape_emphasis(text))) == text


_NAMES = st.text(
    alphabet=st.characters(blacklist_characters="<>:", blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=10
)
_REF = st.builds(
    lambda tag, name, weights: NetworkRef(tag, name, tuple(weights)),
    st.sampled_from(["lora", "hypernet", "lyco", "x_1"]),
    _NAMES,
    st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), max_size=3),
)
_TEXT = st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_TEXT, _REF), max_size=4), _TEXT)
def test_network_round_trip(parts, tail):
    prompt = "".join(text + format_network(ref) for text, ref in parts) + tail
    clean, refs = parse_networks(prompt)
    assert clean == "".join(text for text, _ in parts) + tail
    assert [(r.tag, r.name, r.weights) for r in refs] == [(r.tag, r.name.strip(), r.weights) for _, r in parts]
    assert [r.text for r in refs] == [format_network(r) for _, r in parts]
