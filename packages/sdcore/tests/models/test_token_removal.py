"""Adding and removing new tokens (sdcore.models.token_embeddings.add_tokens/remove_tokens) without rebuilding the
tokenizer through JSON: the tokenizer after removal is the one before (its tokenizers serialization byte for byte,
every prompt's ids), the same as the old JSON round trip gives, and a removed token reads as text again."""

from __future__ import annotations

import json

import pytest

PROMPTS = [
    "a photo of a cat",
    "a <emb> photo, <emb>b and <other> in the style of <emb>",
    "<|startoftext|>tricky<|endoftext|> text  with   spaces",
    "UPPER case <EMB> and emb",
]
NEW = ["<emb>", "<emb>b"]


def _tokenizer(kind: str):
    from sdcore.models.t5 import tiny_t5_tokenizer, tiny_t5_vocab
    from sdcore.models.tokenizer import EOS_TOKEN, OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer

    if kind == "clip":  # SD1 and SDXL's first tokenizer
        return bundled_clip_tokenizer(pad_token=EOS_TOKEN)
    if kind == "openclip":  # SD2 and SDXL's second
        return bundled_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN)
    if kind == "t5":
        return tiny_t5_tokenizer()
    from transformers import T5Tokenizer  # a T5 with sentinel tokens (<extra_id_N>) past its words, as T5-XXL's

    return T5Tokenizer(vocab=tiny_t5_vocab(), extra_ids=4)


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


def _json_route(backend, drop: set[str]):
    """The removal sdcore did before (a JSON round trip of the whole tokenizer), kept here as the reference."""
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in drop]
    return Tokenizer.from_str(json.dumps(state))


@pytest.mark.parametrize("kind", ["clip", "openclip", "t5", "t5-sentinels"])
def test_add_then_remove_gives_back_the_tokenizer_exactly(kind, monkeypatch):
    import tokenizers
    from sdcore.models.token_embeddings import add_tokens, remove_tokens

    tokenizer, reference = _tokenizer(kind), _tokenizer(kind)
    before_json, before_ids, size = tokenizer._tokenizer.to_str(), _ids(tokenizer), len(tokenizer)

    # neither call may take the JSON route nor build the whole vocabulary
    def refuse(*_args, **_kwargs):
        raise AssertionError("rebuilt through JSON")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", refuse)
    monkeypatch.setattr(type(tokenizer), "get_vocab", refuse)
    ids = add_tokens(tokenizer, NEW)
    assert ids == [size, size + 1] and len(tokenizer) == size + 2
    reference.add_tokens(NEW)  # transformers' own call: what the tokens should do while active
    assert _ids(tokenizer) == _ids(reference)
    assert tokenizer("a <emb> photo").input_ids.count(size) == 1
    added_json = tokenizer._tokenizer.to_str()

    remove_tokens(tokenizer, NEW)
    monkeypatch.undo()
    assert tokenizer._tokenizer.to_str() == before_json  # ids, flags, pipeline: byte for byte
    assert tokenizer._tokenizer.to_str() == _json_route(tokenizers.Tokenizer.from_str(added_json), set(NEW)).to_str()
    assert _ids(tokenizer) == before_ids and len(tokenizer) == size
    assert tokenizer.get_added_vocab() == _tokenizer(kind).get_added_vocab()
    assert all(i < size for row in _ids(tokenizer) for i in row)  # "<emb>" is text again, no leak


def test_flags_of_other_added_tokens_survive():
    """A tokenizer that came with added tokens of every kind (special, lstrip/rstrip, single word, not normalized)
    keeps them, ids and flags, when sdcore's tokens go."""
    from sdcore.models.token_embeddings import add_tokens, remove_tokens
    from tokenizers import AddedToken

    tokenizer = _tokenizer("clip")
    tokenizer.add_tokens([AddedToken("<sp>", special=True, lstrip=True, rstrip=True)], special_tokens=True)
    tokenizer.add_tokens([AddedToken("Raw", normalized=False, single_word=True), AddedToken("<n>", normalized=True)])
    before_json, before_ids = tokenizer._tokenizer.to_str(), _ids(tokenizer)
    assert tokenizer(" <sp> x").input_ids[1] == 49408  # the flags matter: lstrip takes the space
    add_tokens(tokenizer, NEW)
    remove_tokens(tokenizer, NEW)
    assert tokenizer._tokenizer.to_str() == before_json and _ids(tokenizer) == before_ids


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_removing_below_an_active_token_keeps_its_id(kind):
    """A removed while a later B is active: B keeps its id (the old JSON route renumbered it onto A's, cutting
    it off from its row), A's words are plain text at once (on T5 a left-over token would read a spare row of
    the matrix silently), and the ids kept for A go with B."""
    import tokenizers
    from sdcore.models.token_embeddings import add_tokens, remove_tokens

    tokenizer, plain = _tokenizer(kind), _tokenizer(kind)
    before_json, size = tokenizer._tokenizer.to_str(), len(tokenizer)
    assert add_tokens(tokenizer, ["<a1>", "<a2>"]) == [size, size + 1]
    assert add_tokens(tokenizer, ["<b>"]) == [size + 2]
    renumbered = _json_route(tokenizer._tokenizer, {"<a1>", "<a2>"})
    assert renumbered.token_to_id("<b>") == size  # what the old route did to B

    remove_tokens(tokenizer, ["<a1>", "<a2>"])
    assert tokenizer.convert_tokens_to_ids(["<b>"]) == [size + 2]
    assert tokenizer("x <a1> <a2> y").input_ids == plain("x <a1> <a2> y").input_ids  # text again, no leak
    assert tokenizer("x <a1> <b>").input_ids == [*plain("x <a1>").input_ids[:-1], size + 2, plain.eos_token_id]
    assert "<a1>" not in tokenizer.get_added_vocab() and "<a2>" not in tokenizer.get_added_vocab()
    assert len(tokenizer) == size + 3  # the ids below B stay taken
    assert add_tokens(tokenizer, ["<a2>", "<c>"]) == [size + 3, size + 4]  # new words go past B
    remove_tokens(tokenizer, ["<b>"])
    assert len(tokenizer) == size + 5 and tokenizer.convert_tokens_to_ids(["<a2>", "<c>"]) == [size + 3, size + 4]
    remove_tokens(tokenizer, ["<c>", "<a2>"])  # the top is free: the stand-ins go with it
    assert len(tokenizer) == size and tokenizer.get_added_vocab() == plain.get_added_vocab()
    assert tokenizer._tokenizer.to_str() == before_json
    assert tokenizers.Tokenizer.from_str(before_json).to_str() == before_json


def test_wrapper_agrees_with_its_backend_after_removal():
    """transformers' view after add + remove is the one before: special tokens and their ids, the added tokens'
    flags, decode (CLIPTokenizer wraps its backend's decode to turn ``</w>`` into spaces: a new backend must be
    wrapped again, which the old JSON route forgot), model_max_length, truncation and padding."""
    from sdcore.models.token_embeddings import add_tokens, remove_tokens

    def view(tokenizer):
        backend = tokenizer._tokenizer
        return (
            tokenizer.special_tokens_map,
            tokenizer.all_special_ids,
            {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()},
            tokenizer.model_max_length,
            len(tokenizer),
            backend.truncation,
            backend.padding,
            tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!", "cat</w>", "<emb>"]),
            tokenizer.decode([49406, 320, 1929, 49407]),
            tokenizer.decode([49406, 320, 1929, 49407], skip_special_tokens=True),
        )

    tokenizer = _tokenizer("clip")
    tokenizer._tokenizer.enable_truncation(max_length=9, direction="left")
    tokenizer._tokenizer.enable_padding(length=11, pad_id=0, pad_token="!")
    before = view(tokenizer)
    assert before[-1] == "a dog"  # the wrapped decode
    add_tokens(tokenizer, NEW)
    add_tokens(tokenizer, ["<later>"])
    remove_tokens(tokenizer, NEW)  # below <later>: stand-ins
    assert tokenizer.decode([49406, 320, 1929, 49407], skip_special_tokens=True) == "a dog"
    later = tokenizer.convert_tokens_to_ids("<later>")
    assert tokenizer.decode([320, later]) == "a <later>"  # (no encoding here: the wrapper resets truncation)
    remove_tokens(tokenizer, ["<later>"])
    assert view(tokenizer) == before


def test_sdxl_embeddings_removed_out_of_order_still_encode():
    """On a tiny SDXL bundle: rows of A and B added, A removed first; B's prompt still reads B's rows in both
    encoders, A's word is text again (it encodes as in the plain model, no error), and after B goes both
    tokenizers and encoders are the plain ones."""
    import torch
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.models.token_embeddings import add_token_rows

    bundle = create_tiny_bundle("sdxl")
    plain_json = [t._tokenizer.to_str() for t in bundle.tokenizers]
    plain_ids = [t("x <a>", return_tensors="pt").input_ids for t in bundle.tokenizers]
    originals = [e.get_input_embeddings() for e in bundle.text_encoders]
    widths = [o.embedding_dim for o in originals]
    a = add_token_rows(bundle, "a", ["<a>"], [torch.full((1, w), 1.0) for w in widths])
    b = add_token_rows(bundle, "b", ["<b>"], [torch.full((1, w), 2.0) for w in widths])
    a.remove()
    for tokenizer, encoder, ids, plain, original in zip(
        bundle.tokenizers, bundle.text_encoders, b.ids.values(), plain_ids, originals, strict=True
    ):
        prompt = tokenizer("x <b>", return_tensors="pt").input_ids
        assert int(prompt[0, 2]) == ids[0] == 49409
        rows = encoder.get_input_embeddings()(prompt)[0]
        assert torch.equal(rows[2], torch.full_like(rows[2], 2.0))  # B's own row, not A's, not an error
        word = tokenizer("x <a>", return_tensors="pt").input_ids
        assert torch.equal(word, plain)
        assert torch.equal(encoder.get_input_embeddings()(word), original(word))
    b.remove()
    assert [t._tokenizer.to_str() for t in bundle.tokenizers] == plain_json
    assert [e.get_input_embeddings() for e in bundle.text_encoders] == originals
