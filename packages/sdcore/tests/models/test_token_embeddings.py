"""New tokens with their own rows (sdcore.models.token_embeddings), used by a method the way Custom Diffusion or a
pivotal-tuning LoRA would: added, looked up, trained, removed without a trace."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _encode(bundle, index: int, text: str):
    import torch

    tokenizer, encoder = bundle.tokenizers[index], bundle.text_encoders[index]
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids[0], encoder(ids).last_hidden_state[0]


def test_importing_it_does_not_import_torch():
    code = "import sys, sdcore.models.token_embeddings as t; assert callable(t.add_token_rows); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_a_token_reads_its_row_trains_alone_and_goes_without_a_trace():
    import torch
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.models.token_embeddings import ExtendedTokenEmbedding, add_token_rows

    bundle = create_tiny_bundle("sd1")
    tokenizer, encoder = bundle.tokenizers[0], bundle.text_encoders[0]
    original, size, keys = encoder.get_input_embeddings(), len(tokenizer), set(encoder.state_dict())
    plain_ids, plain = _encode(bundle, 0, "a red circle")
    start = original.weight[tokenizer.encode("circle", add_special_tokens=False)[0]].detach()[None]

    rows = add_token_rows(bundle, "<new1>", ["<new1>"], [start], trainable=True)
    (new_id,) = rows.ids[0]
    assert new_id == size == original.num_embeddings  # past the matrix: a row no word uses
    lookup = encoder.get_input_embeddings()
    assert isinstance(lookup, ExtendedTokenEmbedding) and lookup.weight is original.weight
    assert set(encoder.state_dict()) == keys  # a model saved meanwhile is the plain model
    ids, _ = _encode(bundle, 0, "a red <new1>")
    assert int(ids[3]) == new_id
    looked_up = lookup(ids[None])[0]
    assert torch.equal(looked_up[3], rows.tables[0][0].to(looked_up.dtype))  # the token's own row
    assert torch.equal(looked_up[:3], original(ids[None, :3])[0])  # every other id: the untouched rows
    assert torch.equal(_encode(bundle, 0, "a red circle")[1], plain)  # prompts without it encode as before

    encoder.requires_grad_(False)
    params = rows.parameters()
    assert len(params) == 1 and params[0].requires_grad and params[0].dtype == torch.float32
    encoder(ids[None]).last_hidden_state.sum().backward()
    assert params[0].grad is not None and bool(params[0].grad.abs().sum() > 0)
    assert original.weight.grad is None

    rows.remove()
    assert encoder.get_input_embeddings() is original and len(tokenizer) == size
    assert "<new1>" not in tokenizer.get_vocab()
    after_ids, after = _encode(bundle, 0, "a red circle")
    assert torch.equal(after_ids, plain_ids) and torch.equal(after, plain)
    rows.remove()  # twice is harmless


def test_only_the_encoders_given_rows_get_the_token_and_failures_leave_nothing():
    import torch
    from sdcore.errors import NetworkMismatchError
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.models.token_embeddings import add_token_rows

    bundle = create_tiny_bundle("sdxl")
    sizes = [len(t) for t in bundle.tokenizers]
    originals = [e.get_input_embeddings() for e in bundle.text_encoders]
    width = originals[0].embedding_dim
    rows = add_token_rows(bundle, "<new1>", ["<new1>", "<new1>b"], [torch.zeros(2, width), None])
    assert sorted(rows.tables) == [0] and [len(t) for t in bundle.tokenizers] == [sizes[0] + 2, sizes[1]]
    assert bundle.text_encoders[1].get_input_embeddings() is originals[1]  # reads the words as text
    with pytest.raises(NetworkMismatchError, match="already exists"):
        add_token_rows(bundle, "again", ["<new1>"], [torch.zeros(1, width), None])
    rows.remove()

    wrong = [torch.zeros(1, width), torch.zeros(1, width + 1)]  # the second encoder's width is wrong
    with pytest.raises(NetworkMismatchError, match="do not fit"):
        add_token_rows(bundle, "<new1>", ["<new1>"], wrong)
    assert [len(t) for t in bundle.tokenizers] == sizes  # all or nothing
    assert [e.get_input_embeddings() for e in bundle.text_encoders] == originals
    with pytest.raises(NetworkMismatchError, match="1 row tables for a model with 2 text encoders"):
        add_token_rows(bundle, "<new1>", ["<new1>"], [torch.zeros(1, width)])


def test_output_rows_replace_their_tokens_positions_and_go_away():
    """OneTrainer's output-embedding rule: ``out[n, t] = row[ids[n, t]]`` where the id has a row, else as encoded;
    an encoder without rows returns the very tensor it got."""
    import torch
    from sdcore.models.token_embeddings import (
        add_output_rows,
        output_rows,
        remove_output_rows,
        replace_output_rows,
    )

    encoder = torch.nn.Linear(1, 1)
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    ids = torch.tensor([[1, 50, 51, 2], [1, 51, 2, 2]])
    assert replace_output_rows(encoder, ids, hidden) is hidden
    add_output_rows(encoder, [50, 51], torch.tensor([[9.0, 9.0, 9.0], [-1.0, -2.0, -3.0]]))
    out = replace_output_rows(encoder, ids, hidden)
    expected = hidden.clone()
    expected[0, 1] = torch.tensor([9.0, 9.0, 9.0])
    expected[0, 2] = expected[1, 1] = torch.tensor([-1.0, -2.0, -3.0])
    assert torch.equal(out, expected) and not torch.equal(hidden, expected)  # the input is not changed
    remove_output_rows(encoder, [50, 51])
    assert output_rows(encoder) == {} and not hasattr(encoder, "sdcore_output_rows")
