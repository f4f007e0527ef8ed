"""The A1111 prompt syntax: extra-network tags and attention emphasis.

Two independent layers, parsed in this order:

1. **Extra networks** ``<tag:name[:arg...]>`` (``<lora:style:0.8>``, ``<hypernet:anime:1>``,
   ``<lora:style:te=0.5:unet=1>``) are cut out of the prompt and returned as
   :class:`~sdcore.generate.networks.NetworkRef` items for the plugin that claims ``tag``.
2. **Emphasis** on the remaining text: ``(word)`` multiplies the attention weight by 1.1,
   ``[word]`` divides it by 1.1, ``(word:1.3)`` multiplies it by 1.3; brackets nest and multiply;
   ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters (any other backslash is dropped, as
   in A1111); the word ``BREAK`` ends the current 75-token chunk. Like A1111 the parser is forgiving:
   an unclosed bracket applies to the end of the prompt and a stray closing bracket is literal text
   (``strict=True`` turns both into a :class:`~sdcore.errors.ConfigError`, useful for training captions).

Training captions with ``--weighted-captions`` are read by :func:`parse_kohya_emphasis`, the rules of the
kohya option: the same layer 2 except that a weight has no spaces around it (``(red: 1.3)`` is the text
``red: 1.3`` at 1.1 there) and ``BREAK`` is a plain word.

This is an independent implementation written from the documented behaviour (no A1111 code).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import NamedTuple

from ..errors import ConfigError
from .networks import NetworkRef

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = "BREAK"

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(rf"^{_NUMBER}$")
# A tag is a word followed by ':' and anything up to the next '>' (no nested '<').
_NETWORK_RE = re.compile(r"<(\w+):([^<>]*)>")
_NAMED_ARG_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(.*?)\s*$", re.DOTALL)

# Emphasis tokens: escapes, brackets, a weighted close ``:1.3)``, plain text runs, lone ':' or '\'. The weight
# is A1111's ``[+-]?[.\d]+`` (modules/prompt_parser.py ``re_attention``), not a general number: ``(x:1e-1)`` is
# the literal text ``x:1e-1`` at 1.1, and a run of digits and dots that is no number (``(x:1.2.3)``) fails
# there (a ValueError) and is a ConfigError here.
_EMPHASIS_TOKEN_RE = re.compile(
    r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:|\\",
)
# kohya's training captions (sd-scripts library/strategy_base.py ``_re_attention``): the same tokens, but the
# weighted close is ':' then the weight then ')' with nothing between, so ``(red: 1.3)`` stays text.
_KOHYA_EMPHASIS_TOKEN_RE = re.compile(
    r"\\[()\[\]\\]|\(|\[|:([+-]?[.\d]+)\)|\)|\]|[^\\()\[\]:]+|:|\\",
)
_BREAK_RE = re.compile(rf"\s*\b{BREAK}\b\s*")


class Chunk(NamedTuple):
    """A run of prompt text with one attention weight (compares equal to a ``(text, weight)`` tuple)."""

    text: str
    weight: float


BREAK_CHUNK = Chunk(BREAK, -1.0)
"""The marker :func:`parse_emphasis` emits for ``BREAK`` (A1111 uses the same text and weight)."""


def is_break(chunk: tuple[str, float]) -> bool:
    return chunk[0] == BREAK and chunk[1] == -1.0


# --------------------------------------------------------------------------------------------
# extra networks


def _parse_number(value: str, tag_text: str) -> float:
    value = value.strip()
    if not _NUMBER_RE.match(value):
        raise ConfigError(f"invalid weight {value!r} in {tag_text}: expected a number such as 0.8, -1 or 1e-1")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"invalid weight {value!r} in {tag_text}: the weight must be finite")
    return number


def _parse_network(match: re.Match[str]) -> NetworkRef:
    tag_text = match.group(0)
    tag = match.group(1)
    args = match.group(2).split(":")
    name = args[0].strip()
    if not name:
        raise ConfigError(f"{tag_text}: the network name is empty (write <{tag}:name> or <{tag}:name:weight>)")
    weights: list[float] = []
    named: list[tuple[str, float]] = []
    for arg in args[1:]:
        named_match = _NAMED_ARG_RE.match(arg)
        if named_match:
            key = named_match.group(1).lower()
            if any(key == existing for existing, _ in named):
                raise ConfigError(f"{tag_text}: {key!r} is given twice")
            named.append((key, _parse_number(named_match.group(2), tag_text)))
        else:
            if named:
                raise ConfigError(f"{tag_text}: a plain weight cannot follow a named one ({arg.strip()!r})")
            weights.append(_parse_number(arg, tag_text))
    return NetworkRef(tag=tag, name=name, weights=tuple(weights), text=tag_text, named=tuple(named))


def parse_networks(prompt: str) -> tuple[str, list[NetworkRef]]:
    """Cut every ``<tag:name[:w1[:w2...]]>`` out of ``prompt``.

    Returns the prompt without the tags (nothing else changes, not even whitespace) and the refs
    in prompt order. A malformed tag (empty name, a weight that is not a finite number) raises
    :class:`~sdcore.errors.ConfigError` naming the tag. ``<`` without the ``<word:...>`` shape is
    ordinary text.
    """
    refs: list[NetworkRef] = []

    def _cut(match: re.Match[str]) -> str:
        refs.append(_parse_network(match))
        return ""

    clean = _NETWORK_RE.sub(_cut, prompt)
    return clean, refs


def format_network(ref: NetworkRef) -> str:
    """The ``<tag:name:w...>`` text for ``ref`` (parses back to an equal ref, ``text`` aside)."""
    parts = [ref.tag, ref.name, *(repr(float(w)) for w in ref.weights)]
    parts += [f"{key}={float(value)!r}" for key, value in ref.named]
    return "<" + ":".join(parts) + ">"


# --------------------------------------------------------------------------------------------
# emphasis


def parse_emphasis(text: str, *, strict: bool = False, breaks: bool = True) -> list[Chunk]:
    """Split ``text`` into :class:`Chunk` runs with their attention weights.

    Adjacent runs with equal weights are merged and empty runs dropped; ``BREAK`` becomes
    :data:`BREAK_CHUNK`. Text with no markup gives ``[Chunk(text, 1.0)]``; an empty prompt gives
    ``[Chunk("", 1.0)]``. With ``strict=True`` unbalanced brackets raise ConfigError instead of
    being handled the forgiving A1111 way. ``breaks=False`` reads ``BREAK`` as plain text.
    """
    return _parse_emphasis(text, _EMPHASIS_TOKEN_RE, strict=strict, breaks=breaks)


def parse_kohya_emphasis(text: str) -> list[Chunk]:
    """:func:`parse_emphasis` by the rules of kohya's ``--weighted_captions`` (sdcore's
    ``--weighted-captions`` for training captions): no spaces around a weight (``(red: 1.3)`` and
    ``(red:1.3 )`` are text at 1.1) and no ``BREAK``; nesting, escapes, ``[x]``, unbalanced brackets
    and a lone backslash are read as :func:`parse_emphasis` reads them, which kohya's parser shares
    with A1111's. Generation keeps A1111's rules: the option and its syntax are kohya's."""
    return _parse_emphasis(text, _KOHYA_EMPHASIS_TOKEN_RE, strict=False, breaks=False)


def _parse_emphasis(text: str, token_re: re.Pattern[str], *, strict: bool, breaks: bool) -> list[Chunk]:
    pieces: list[list[object]] = []  # [text, weight] or the break marker (weight None)
    round_open: list[int] = []
    square_open: list[int] = []

    def _scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] = float(piece[1]) * factor  # type: ignore[arg-type]

    for match in token_re.finditer(text):
        token = match.group(0)
        weight = match.group(1)
        if token[0] == "\\":
            pieces.append([token[1:], 1.0])  # a lone backslash escapes nothing and is dropped, as in A1111
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            _scale(round_open.pop(), _emphasis_weight(weight, token))
        elif token == ")" and round_open:
            _scale(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            _scale(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            if (strict and token[0] in ")]") or (strict and weight is not None):
                raise ConfigError(f"unbalanced {token[-1]!r} at character {match.start()} in prompt {text!r}")
            for index, part in enumerate(_BREAK_RE.split(token) if breaks else [token]):
                if index:
                    pieces.append([BREAK, None])
                pieces.append([part, 1.0])
    if strict and (round_open or square_open):
        raise ConfigError(f"unclosed {'(' if round_open else '['} in prompt {text!r}")
    for start in round_open:
        _scale(start, ROUND_MULTIPLIER)
    for start in square_open:
        _scale(start, SQUARE_MULTIPLIER)

    result: list[Chunk] = []
    for piece_text, piece_weight in pieces:
        if piece_weight is None:
            result.append(BREAK_CHUNK)
            continue
        piece_text = str(piece_text)
        if not piece_text:
            continue
        weight_value = float(piece_weight)  # type: ignore[arg-type]
        if result and not is_break(result[-1]) and result[-1].weight == weight_value:
            result[-1] = Chunk(result[-1].text + piece_text, weight_value)
        else:
            result.append(Chunk(piece_text, weight_value))
    return result or [Chunk("", 1.0)]


def _emphasis_weight(weight: str, token: str) -> float:
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"invalid emphasis weight {weight!r} in {token!r}: expected a number such as 1.2") from None
    if not math.isfinite(value):
        raise ConfigError(f"invalid emphasis weight in {token!r}: the weight must be finite")
    return value


def escape_emphasis(text: str) -> str:
    """Escape the characters emphasis would interpret, so ``text`` reads back literally."""
    return re.sub(r"([\\()\[\]])", r"\\\1", text)


def format_emphasis(chunks: list[Chunk] | list[tuple[str, float]]) -> str:
    """Write chunks back as prompt text; :func:`parse_emphasis` reads it back to the same chunks.

    Text must not contain the word ``BREAK`` (it cannot be escaped); a ``:`` that would read as a
    weight is kept literal because the text is escaped and weights are written as ``(text:w)``.
    """
    out: list[str] = []
    for chunk in chunks:
        text, weight = chunk[0], float(chunk[1])
        if is_break(chunk):
            out.append(f" {BREAK} ")
        elif weight == 1.0:
            out.append(escape_emphasis(text))
        else:
            out.append(f"({escape_emphasis(text)}:{_positional(weight)})")
    return "".join(out)


def _positional(value: float) -> str:
    """``value`` without an exponent (the emphasis weight pattern takes digits and dots only), in as many
    digits as ``repr`` uses, so it reads back to the same float."""
    return f"{Decimal(repr(value)):f}"


def split_breaks(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Group chunks into the segments between ``BREAK`` markers."""
    groups: list[list[Chunk]] = [[]]
    for chunk in chunks:
        if is_break(chunk):
            groups.append([])
        else:
            groups[-1].append(chunk)
    return groups


def plain_text(chunks: list[Chunk]) -> str:
    """The text of ``chunks`` with the weights dropped (breaks become spaces)."""
    return "".join(" " if is_break(chunk) else chunk.text for chunk in chunks)


def parse_prompt(prompt: str, *, strict: bool = False) -> tuple[list[Chunk], list[NetworkRef]]:
    """Both layers at once: network refs cut out, then the rest split into weighted chunks."""
    clean, refs = parse_networks(prompt)
    return parse_emphasis(clean, strict=strict), refs


__all__ = [
    "BREAK",
    "BREAK_CHUNK",
    "Chunk",
    "escape_emphasis",
    "format_emphasis",
    "format_network",
    "is_break",
    "parse_emphasis",
    "parse_kohya_emphasis",
    "parse_networks",
    "parse_prompt",
    "plain_text",
    "split_breaks",
]
