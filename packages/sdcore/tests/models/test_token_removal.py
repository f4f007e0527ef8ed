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
    assert not hasattr(tokenizer, "sdcore_retired_tokens")


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


def test_removing_below_an_active_token_keeps_its_id():
    """A removed while a later B is active: B keeps its id (the old JSON route renumbered it onto A's, cutting
    it off from its row); A's tokens stay reserved until B goes too, and adding them again takes them back."""
    import tokenizers
    from sdcore.models.token_embeddings import add_tokens, remove_tokens

    tokenizer = _tokenizer("clip")
    before_json, size = tokenizer._tokenizer.to_str(), len(tokenizer)
    assert add_tokens(tokenizer, ["<a1>", "<a2>"]) == [size, size + 1]
    assert add_tokens(tokenizer, ["<b>"]) == [size + 2]
    renumbered = _json_route(tokenizer._tokenizer, {"<a1>", "<a2>"})
    assert renumbered.token_to_id("<b>") == size  # what the old route did to B

    remove_tokens(tokenizer, ["<a1>", "<a2>"])
    assert tokenizer.convert_tokens_to_ids(["<b>"]) == [size + 2]
    assert tokenizer.sdcore_retired_tokens == {"<a1>", "<a2>"}
    assert add_tokens(tokenizer, ["<a2>", "<c>"]) == [size + 1, size + 3]  # <a2> back, <c> past <b>
    assert tokenizer.sdcore_retired_tokens == {"<a1>"}
    remove_tokens(tokenizer, ["<c>"])
    assert len(tokenizer) == size + 3 and tokenizer.sdcore_retired_tokens == {"<a1>"}
    remove_tokens(tokenizer, ["<b>"])  # <a1> reserved below <a2>
    assert len(tokenizer) == size + 2 and tokenizer.sdcore_retired_tokens == {"<a1>"}
    remove_tokens(tokenizer, ["<a2>"])  # the top is free: everything goes
    assert len(tokenizer) == size and not hasattr(tokenizer, "sdcore_retired_tokens")
    assert tokenizer._tokenizer.to_str() == before_json
    assert isinstance(renumbered, tokenizers.Tokenizer)


def test_sdxl_embeddings_removed_out_of_order_still_encode():
    """On a tiny SDXL bundle: rows of A and B added, A removed first; B's prompt still reads B's rows in both
    encoders, and after B goes both tokenizers and encoders are the plain ones."""
    import torch
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.models.token_embeddings import add_token_rows

    bundle = create_tiny_bundle("sdxl")
    plain_json = [t._tokenizer.to_str() for t in bundle.tokenizers]
    originals = [e.get_input_embeddings() for e in bundle.text_encoders]
    widths = [o.embedding_dim for o in originals]
    a = add_token_rows(bundle, "a", ["<a>"], [torch.full((1, w), 1.0) for w in widths])
    b = add_token_rows(bundle, "b", ["<b>"], [torch.full((1, w), 2.0) for w in widths])
    a.remove()
    for tokenizer, encoder, ids in zip(bundle.tokenizers, bundle.text_encoders, b.ids.values(), strict=True):
        prompt = tokenizer("x <b>", return_tensors="pt").input_ids
        assert int(prompt[0, 2]) == ids[0] == 49409
        rows = encoder.get_input_embeddings()(prompt)[0]
        assert torch.equal(rows[2], torch.full_like(rows[2], 2.0))  # B's own row, not A's, not an error
    b.remove()
    assert [t._tokenizer.to_str() for t in bundle.tokenizers] == plain_json
    assert [e.get_input_embeddings() for e in bundle.text_encoders] == originals
