"""Prompt -> conditioning: chunking rules, exact equality with plain encodings, emphasis math."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sdcore.errors import ConfigError
from sdcore.generate.conditioning import (
    apply_emphasis,
    encode_cond_uncond,
    encode_hidden,
    encode_weighted_prompts,
    tokenize_weighted,
)
from sdcore.generate.prompt_syntax import parse_emphasis
from sdcore.models.text import encode_prompts


def _tokens(bundle, text, index=0, **kwargs):
    return tokenize_weighted(bundle.tokenizers[index], parse_emphasis(text), **kwargs)


def test_short_prompt_is_one_padded_chunk(sd1, sd2):
    tok = sd1.tokenizers[0]
    chunks = _tokens(sd1, "a photo of a cat")
    assert len(chunks) == 1 and len(chunks.ids[0]) == 77
    plain = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert chunks.ids[0] == plain
    assert chunks.multipliers[0] == [1.0] * 77
    # OpenCLIP pads with id 0 after the first EOS
    ids = _tokens(sd2, "a cat").ids[0]
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0}


def test_long_prompt_and_break_make_chunks(sd1):
    words = " ".join(["cat"] * 100)  # 100 tokens, no commas
    chunks = _tokens(sd1, words)
    assert len(chunks) == 2
    assert chunks.ids[0][1:76] == [2368] * 75 and chunks.ids[1][1:26] == [2368] * 25
    assert all(len(row) == 77 and row[0] == 49406 for row in chunks.ids)
    assert len(_tokens(sd1, "a BREAK b")) == 2
    assert len(_tokens(sd1, "a BREAK")) == 1  # a trailing BREAK adds no empty chunk
    assert len(_tokens(sd1, "")) == 1
    assert len(_tokens(sd1, " ".join(["cat"] * 75))) == 1


def test_comma_backtracking_moves_the_tail(sd1):
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)  # 70 + comma + 10 = 81 tokens
    chunks = _tokens(sd1, text)
    first, second = chunks.ids
    comma = sd1.tokenizers[0].convert_tokens_to_ids(",</w>")
    assert first[71] == comma and first[72] == 49407  # chunk ends right after the comma
    dog = sd1.tokenizers[0].convert_tokens_to_ids("dog</w>")
    assert second[1:11] == [dog] * 10 and second[11] == 49407
    plain = _tokens(sd1, text, comma_backtrack=0)
    assert plain.ids[0][76] == 49407 and plain.ids[0][75] != 49407  # without backtracking it fills to 75


def test_emphasis_multipliers_follow_tokens(sd1):
    chunks = _tokens(sd1, "a (cat:1.5) [dog]")
    ids, mults = chunks.ids[0], chunks.multipliers[0]
    assert ids[:5] == [49406, 320, 2368, 1929, 49407]
    assert mults[:5] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert mults[5:] == [1.0] * 72


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompt_equals_training_encoder_exactly(tiny_bundles, family, clip_skip):
    bundle = tiny_bundles(family)
    prompts = ["a photo of a cat", ""]
    ours = encode_weighted_prompts(bundle, prompts, clip_skip=clip_skip)
    with torch.no_grad():
        theirs = encode_prompts(bundle, prompts, clip_skip=clip_skip)
    assert torch.equal(ours.embeds, theirs.hidden_states)
    if family == "sdxl":
        assert ours.embeds.shape == (2, 77, 32 + 64) and ours.pooled.shape == (2, 64)
        assert torch.equal(ours.pooled, theirs.pooled)
    else:
        assert ours.pooled is None


def test_weight_one_markup_is_exactly_plain(sd1):
    plain = encode_weighted_prompts(sd1, ["a cat"]).embeds
    assert torch.equal(encode_weighted_prompts(sd1, ["a (cat:1.0)"]).embeds, plain)
    assert torch.equal(encode_weighted_prompts(sd1, ["a (cat)"], emphasis=False).embeds, plain)
    with torch.no_grad():
        direct = sd1.text_encoders[0](
            sd1.tokenizers[0](["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ).last_hidden_state
    assert torch.equal(plain, direct)


def test_emphasis_scales_only_the_weighted_token_then_restores_the_mean(sd1):
    chunks = _tokens(sd1, "a (cat:1.5)")
    assert chunks.ids == _tokens(sd1, "a cat").ids  # same tokens, only multipliers differ
    ids = torch.tensor(chunks.ids)
    mults = torch.tensor(chunks.multipliers)
    with torch.no_grad():
        z, _ = encode_hidden(sd1.text_encoders[0], ids, layer=1, final_norm=True)
    raw = apply_emphasis(z, mults, restore_mean=False)
    changed = (raw != z).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [2]  # position 2 = "cat" (BOS, a, cat)
    assert torch.allclose(raw[0, 2], z[0, 2] * 1.5)
    restored = apply_emphasis(z, mults)
    assert torch.allclose(restored.mean(), z.mean(), atol=1e-6)
    assert not torch.allclose(restored, z)
    # and the full encoder does exactly this
    assert torch.allclose(encode_weighted_prompts(sd1, ["a (cat:1.5)"]).embeds, restored, atol=1e-6)


def test_emphasis_is_per_prompt(sd1):
    """A weighted prompt in the batch does not change another prompt's encoding."""
    alone = encode_weighted_prompts(sd1, ["a dog"]).embeds
    batch = encode_weighted_prompts(sd1, ["a dog", "a ((cat))"]).embeds
    assert torch.equal(batch[0], alone[0])


def test_cond_and_uncond_are_padded_to_the_same_length(sd1, sdxl):
    long = " ".join(["cat"] * 80)
    cond, uncond = encode_cond_uncond(sd1, [long, "a"], ["", ""])
    assert cond.embeds.shape == uncond.embeds.shape == (2, 154, 32)
    short = encode_weighted_prompts(sd1, ["a"]).embeds
    assert torch.equal(cond.embeds[1, :77], short[0])
    empty = encode_weighted_prompts(sd1, [""]).embeds
    assert torch.equal(cond.embeds[1, 77:], empty[0])  # padding chunks are empty-prompt chunks
    cond, uncond = encode_cond_uncond(sdxl, ["a"], [long])
    assert cond.embeds.shape == uncond.embeds.shape == (1, 154, 96)
    assert cond.pooled.shape == uncond.pooled.shape == (1, 64)


def test_clip_skip_out_of_range(sd1):
    with pytest.raises(ConfigError):
        encode_weighted_prompts(sd1, ["a"], clip_skip=0)
    with pytest.raises(ConfigError):
        encode_weighted_prompts(sd1, ["a"], clip_skip=4)  # the tiny encoder has 3 layers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([*"ab ,()[]:1.5\\", "cat ", " BREAK ", " dog, "]), max_size=200).map("".join))
def test_chunking_invariants(sd1, text):
    """Any prompt tokenizes into well-formed chunks that keep every token in order."""
    chunks = parse_emphasis(text)
    tokenized = tokenize_weighted(sd1.tokenizers[0], chunks)
    assert len(tokenized) >= 1
    kept: list[int] = []
    for ids, mults in zip(tokenized.ids, tokenized.multipliers, strict=True):
        assert len(ids) == len(mults) == 77 and ids[0] == 49406
        body = ids[1 : ids.index(49407, 1)]
        assert len(body) <= 75 and all(m == 1.0 for m in mults[len(body) + 1 :])
        kept += body
    expected = [
        t for c in chunks if c[0] != "BREAK" for t in sd1.tokenizers[0](c[0], add_special_tokens=False).input_ids
    ]
    assert kept == expected


def test_all_zero_weights_do_not_divide_by_zero():
    z = torch.zeros(1, 3, 2)
    out = apply_emphasis(z, torch.tensor([[0.0, 0.0, 0.0]]))
    assert torch.isfinite(out).all()


def test_token_groups_stay_in_one_chunk_unless_longer_than_one(sd1):
    """A declared group (how a plugin marks a multi-vector embedding) moves whole to the next chunk
    (A1111 sd_hijack_clip.py tokenize_line); one longer than 75 tokens fits no chunk and is split like
    words (A1111 fails there); removing the group restores plain chunking."""
    from sdcore.generate.conditioning import add_token_group, remove_token_group, token_groups

    tok = copy.deepcopy(sd1.tokenizers[0])
    cat, dog = tok.convert_tokens_to_ids("cat</w>"), tok.convert_tokens_to_ids("dog</w>")
    text = " ".join(["cat"] * 74) + " dog cat"
    plain = tokenize_weighted(tok, parse_emphasis(text))
    assert plain.ids[0][75] == dog and plain.ids[1][1] == cat  # "dog cat" split by the boundary
    add_token_group(tok, [dog, cat])
    grouped = tokenize_weighted(tok, parse_emphasis(text))
    assert grouped.ids[0][75] == 49407 and grouped.ids[1][1:3] == [dog, cat]
    add_token_group(tok, [cat] * 76)
    long = " ".join(["cat"] * 80)
    assert (
        tokenize_weighted(tok, parse_emphasis(long)).ids
        == tokenize_weighted(sd1.tokenizers[0], parse_emphasis(long)).ids
    )
    remove_token_group(tok, [cat] * 76)
    remove_token_group(tok, [dog, cat])
    assert token_groups(tok) == {} and not hasattr(tok, "sdcore_token_groups")
    assert tokenize_weighted(tok, parse_emphasis(text)).ids == plain.ids
