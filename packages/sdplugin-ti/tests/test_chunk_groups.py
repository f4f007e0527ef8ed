"""A multi-vector embedding never straddles a 75-token chunk boundary (A1111's rule), SD1 and SDXL."""

from __future__ import annotations

import pytest
import torch
from sdcore.generate.conditioning import encode_weighted_prompts, token_groups, tokenize_weighted
from sdcore.generate.prompt_syntax import parse_emphasis
from sdplugin_ti.apply import apply_embeddings
from sdplugin_ti.embedding import CLIP_G, CLIP_L, SINGLE, Embedding

Item = int | tuple[int, ...]


def a1111_layout(
    items: list[Item], *, bos: int, eos: int, pad: int, comma: int, backtrack: int = 20
) -> list[list[int]]:
    """A1111's chunking rewritten from modules/sd_hijack_clip.py ``tokenize_line`` (facts only): per
    token, a comma records its place; else at 75 tokens with a comma in the last ``backtrack`` the
    tokens after it move to a new chunk; a full chunk (75) is closed; an embedding (a tuple here) that
    would end past 75 closes the chunk first, then goes in whole. Chunks are BOS + 75 (padded) + EOS."""
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        chunks.append([bos, *current, eos] + [pad] * (75 - len(current)))
        current, last_comma = [], -1

    for item in items:
        first = item[0] if isinstance(item, tuple) else item
        if first == comma:
            last_comma = len(current)
        elif backtrack and len(current) == 75 and last_comma != -1 and len(current) - last_comma <= backtrack:
            moved = current[last_comma + 1 :]
            current = current[: last_comma + 1]
            close()
            current = moved
        if len(current) == 75:
            close()
        if isinstance(item, tuple):
            if len(current) + len(item) > 75:
                close()
            current.extend(item)
        else:
            current.append(item)
    if current or not chunks:
        close()
    return chunks


def _word(tokenizer, word: str) -> int:
    return int(tokenizer.convert_tokens_to_ids(word + "</w>"))


def _embedding(family: str, n: int) -> Embedding:
    gen = torch.Generator().manual_seed(n)
    if family == "sdxl":
        return Embedding(
            "mychar", {CLIP_L: torch.randn(n, 32, generator=gen), CLIP_G: torch.randn(n, 64, generator=gen)}
        )
    return Embedding("mychar", {SINGLE: torch.randn(n, 32, generator=gen)})


# (words before the embedding, vectors, words after); "," is a comma token
CASES = [
    (["cat"] * 73, 4, ["dog"] * 3),  # would cover positions 74-77: the chunk closes at 73, the embedding opens chunk 2
    (["cat"] * 71, 4, ["dog"] * 3),  # ends exactly at 75: stays
    (["cat"] * 60 + [","] + ["cat"] * 12, 4, ["dog"]),  # comma 13 back: no backtrack, the embedding still moves alone
    (
        ["cat"] * 60 + [","] + ["cat"] * 10,
        4,
        ["dog"],
    ),  # fits to 75, then "dog" backtracks: the words after the comma and the whole embedding move
    (["cat"] * 70, 75, ["dog"]),  # a 75-vector embedding fills chunk 2 by itself
]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize(("before", "vectors", "after"), CASES)
def test_embedding_is_never_split_across_chunks(make_bundle, family, before, vectors, after):
    bundle = make_bundle(family)
    handle = apply_embeddings(bundle, [_embedding(family, vectors)])
    try:
        prompt = handle.expand(" ".join([*before, "mychar", *after]))
        for tokenizer in bundle.tokenizers:
            ids = tuple(int(i) for i in tokenizer.convert_tokens_to_ids(handle.tokens["mychar"]))
            assert token_groups(tokenizer)[ids[0]] == ids
            comma = int(tokenizer.convert_tokens_to_ids(",</w>"))
            items: list[Item] = [comma if w == "," else _word(tokenizer, w) for w in before]
            items += [ids] + [_word(tokenizer, w) for w in after]
            pad = int(tokenizer.pad_token_id)
            expected = a1111_layout(
                items, bos=int(tokenizer.bos_token_id), eos=int(tokenizer.eos_token_id), pad=pad, comma=comma
            )
            got = tokenize_weighted(tokenizer, parse_emphasis(prompt))
            assert got.ids == expected
            # the embedding's ids lie together in one chunk
            holder = [row for row in got.ids if ids[0] in row]
            assert len(holder) == 1 and tuple(holder[0][holder[0].index(ids[0]) :][:vectors]) == ids
        # and the model encodes the layout (one 77-row per chunk)
        cond = encode_weighted_prompts(bundle, [prompt])
        assert cond.embeds.shape[1] == 77 * len(expected)
    finally:
        handle.remove()
    assert all(not token_groups(t) for t in bundle.tokenizers)


def test_straddling_layout_is_what_the_rule_says(make_bundle):
    """The first case spelled out: 73 words, then the 4 vectors open the second chunk."""
    bundle = make_bundle("sd1")
    handle = apply_embeddings(bundle, [_embedding("sd1", 4)])
    tokenizer = bundle.tokenizers[0]
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(handle.tokens["mychar"])]
    got = tokenize_weighted(tokenizer, parse_emphasis(handle.expand(" ".join(["cat"] * 73) + " mychar")))
    cat, eos = _word(tokenizer, "cat"), int(tokenizer.eos_token_id)
    assert got.ids[0] == [tokenizer.bos_token_id] + [cat] * 73 + [eos] * 3
    assert got.ids[1][1:6] == [*ids, eos]
    handle.remove()
