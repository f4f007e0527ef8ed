"""encode_prompts: chunking, padding, clip skip and SDXL conditioning on tiny models."""

import pytest
import torch
from sdcore.models.text import (
    chunk_count,
    chunked_input_ids,
    encode_prompts,
    final_layer_norm,
    pad_conditioning,
    sdxl_time_ids,
)
from sdcore.models.tiny import create_tiny_bundle


@pytest.fixture(scope="module")
def bundles():
    return {f: create_tiny_bundle(f) for f in ("sd1", "sd2", "sdxl")}


def _plain(encoder, tokenizer, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return encoder(ids, output_hidden_states=True)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_short_prompt_equals_standard_77_token_encoding(bundles, family):
    b = bundles[family]
    with torch.no_grad():
        cond = encode_prompts(b, ["a photo of a cat", ""])
        ref = _plain(b.text_encoders[0], b.tokenizers[0], ["a photo of a cat", ""]).last_hidden_state
    assert cond.pooled is None and cond.hidden_states.shape == (2, 77, 32)
    assert torch.equal(cond.hidden_states, ref)


def test_padding_follows_tokenizer(bundles):
    sd1 = chunked_input_ids(bundles["sd1"].tokenizers[0], ["a cat"], chunks=1)[0, 0].tolist()
    sd2 = chunked_input_ids(bundles["sd2"].tokenizers[0], ["a cat"], chunks=1)[0, 0].tolist()
    assert sd1[:4] == [49406, 320, 2368, 49407] and sd1[4:] == [49407] * 73
    assert sd2[:4] == [49406, 320, 2368, 49407] and sd2[4:] == [0] * 73


def test_clip_skip_two_is_penultimate_layer_with_final_norm(bundles):
    b = bundles["sd1"]
    with torch.no_grad():
        cond = encode_prompts(b, ["red, blue"], clip_skip=2)
        out = _plain(b.text_encoders[0], b.tokenizers[0], ["red, blue"])
        ref = final_layer_norm(b.text_encoders[0])(out.hidden_states[-2])
        assert torch.equal(cond.hidden_states, ref)
        assert not torch.allclose(cond.hidden_states, out.last_hidden_state)


def test_long_prompt_is_split_in_75_token_chunks(bundles):
    b = bundles["sd1"]
    tok = b.tokenizers[0]
    words = " ".join(f"w{i}" for i in range(40))  # well over 75 tokens
    n_tokens = len(tok(words, add_special_tokens=False).input_ids)
    assert 75 < n_tokens <= 150
    assert chunk_count(tok, [words]) == -(-n_tokens // 75)
    ids = chunked_input_ids(tok, [words, "short"], chunks=2)
    assert ids.shape == (2, 2, 77)
    assert ids[0, 0, 0] == 49406 and ids[0, 0, 76] == 49407 and ids[0, 1, 0] == 49406
    first = tok(words, add_special_tokens=False).input_ids
    assert ids[0, 0, 1:76].tolist() == first[:75] and ids[0, 1, 1 : 1 + n_tokens - 75].tolist() == first[75:]
    with torch.no_grad():
        cond = encode_prompts(b, [words, "short"])
        assert cond.hidden_states.shape == (2, 77 * 2, 32)
        # each chunk is encoded on its own: the short prompt's 2nd chunk is an empty chunk
        empty = encode_prompts(b, [""]).hidden_states[0]
        assert torch.equal(cond.hidden_states[1, 77:], empty)
        # the cap
        assert encode_prompts(b, [words], max_chunks=1).hidden_states.shape == (1, 77, 32)
        # padding a cached single-prompt encoding equals encoding with more chunks
        padded = pad_conditioning(encode_prompts(b, ["short"]), 2, empty)
        assert torch.equal(padded.hidden_states, encode_prompts(b, ["short"], chunks=2).hidden_states)


def test_sdxl_concatenates_penultimate_states_and_pools_second_encoder(bundles):
    b = bundles["sdxl"]
    with torch.no_grad():
        cond = encode_prompts(b, ["a cat", "a dog"])
        o1 = _plain(b.text_encoders[0], b.tokenizers[0], ["a cat", "a dog"])
        o2 = _plain(b.text_encoders[1], b.tokenizers[1], ["a cat", "a dog"])
    assert cond.hidden_states.shape == (2, 77, 96) and cond.pooled.shape == (2, 64)
    assert torch.equal(cond.hidden_states[..., :32], o1.hidden_states[-2])
    assert torch.equal(cond.hidden_states[..., 32:], o2.hidden_states[-2])
    assert torch.equal(cond.pooled, o2.text_embeds)


def test_gradients_flow_into_a_trained_text_encoder(bundles):
    b = create_tiny_bundle("sd1")
    norm = final_layer_norm(b.text_encoders[0])
    norm.weight.requires_grad_(True)
    encode_prompts(b, ["a cat"]).hidden_states.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_sdxl_time_ids_order():
    ids = sdxl_time_ids([(512, 768)], [(10, 20)], [(512, 512)])
    assert ids.tolist() == [[512.0, 768.0, 10.0, 20.0, 512.0, 512.0]]


def test_clip_skip_beyond_the_encoder_is_a_config_error(bundles):
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError, match="only 3 layers"):
        encode_prompts(bundles["sd1"], ["a"], clip_skip=4)
    with pytest.raises(ConfigError, match="only 3 layers"):
        encode_prompts(bundles["sdxl"], ["a"], clip_skip=3)
    assert encode_prompts(bundles["sd1"], ["a"], clip_skip=3).hidden_states.shape == (1, 77, 32)
