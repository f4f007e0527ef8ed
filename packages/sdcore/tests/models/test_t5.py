"""T5 encoder helpers: the offline tiny tokenizer, and loading T5 from every layout users have."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_t5():
    from sdcore.models.t5 import create_tiny_t5

    return create_tiny_t5(seed=3)


def _same_weights(left, right) -> None:
    a, b = left.state_dict(), right.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _save(tensors, path, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_tiny_tokenizer_has_t5_special_layout(tmp_path):
    from sdcore.models.t5 import tiny_t5_tokenizer
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    batch = tok(["a photo of a cat, 42!", "dog"], padding="max_length", max_length=16, truncation=True)
    first, second = batch["input_ids"]
    assert tok.unk_token_id not in first  # every ASCII character has a piece
    assert first[first.index(1) + 1 :] == [0] * (16 - first.index(1) - 1)  # </s> then padding
    assert second[:3] == [tok.convert_tokens_to_ids("\u2581dog"), 1, 0]
    assert tok.convert_ids_to_tokens(first[:4]) == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a"]
    tok.save_pretrained(tmp_path)
    for cls in (T5TokenizerFast, AutoTokenizer):
        again = cls.from_pretrained(str(tmp_path), local_files_only=True)
        assert again(["a photo of a cat, 42!"])["input_ids"][0] == tok(["a photo of a cat, 42!"])["input_ids"][0]


def test_folder_and_pipeline_folder_load(tiny_t5, tmp_path):
    from sdcore.models.t5 import load_t5_encoder

    model, _ = tiny_t5
    model.save_pretrained(tmp_path / "text_encoder_2")
    for path in (tmp_path / "text_encoder_2", tmp_path):
        loaded = load_t5_encoder(path)
        _same_weights(model, loaded)


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_single_file_layouts_load_exactly(tiny_t5, tmp_path, prefix):
    from sdcore.models.t5 import load_t5_encoder, t5_file_tensors

    model, tok = tiny_t5
    tensors = t5_file_tensors(model, prefix)
    assert prefix + "shared.weight" in tensors and prefix + "encoder.final_layer_norm.weight" in tensors
    assert prefix + "encoder.block.0.layer.0.SelfAttention.q.weight" in tensors
    if prefix:  # an all-in-one file: other parts around the encoder
        tensors["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)
        tensors["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    loaded = load_t5_encoder(_save(tensors, tmp_path / "t5.safetensors"))
    _same_weights(model, loaded)
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert loaded.config.is_gated_act and loaded.config.dense_act_fn == model.config.dense_act_fn
    ids = tok(["a red ring"], return_tensors="pt").input_ids
    assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_transformers_saved_file_and_embed_tokens_only(tiny_t5, tmp_path):
    """transformers' own ``model.safetensors`` read as a lone file; a file keeping only the tied copy."""
    from safetensors.torch import load_file
    from sdcore.models.t5 import load_t5_encoder

    model, _ = tiny_t5
    model.save_pretrained(tmp_path / "hf")
    _same_weights(model, load_t5_encoder(tmp_path / "hf" / "model.safetensors"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    _same_weights(model, load_t5_encoder(_save(tensors, tmp_path / "embed.safetensors")))


def test_dtypes_default_fp32_and_auto_keeps_stored(tiny_t5, tmp_path):
    from sdcore.models.t5 import load_t5_encoder, t5_file_tensors

    model, _ = tiny_t5
    half = {k: v.to(torch.bfloat16) for k, v in t5_file_tensors(model).items()}
    path = _save(half, tmp_path / "bf16.safetensors")
    assert {p.dtype for p in load_t5_encoder(path).parameters()} == {torch.float32}
    assert {p.dtype for p in load_t5_encoder(path, dtype="auto").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_t5_encoder(path, dtype="fp16").parameters()} == {torch.float16}


def test_relu_t5_config_from_shapes(tmp_path):
    from sdcore.models.t5 import create_tiny_t5, load_t5_encoder, t5_file_tensors

    model, _ = create_tiny_t5(seed=1, feed_forward_proj="relu", num_layers=3, num_heads=2, d_kv=16)
    loaded = load_t5_encoder(_save(t5_file_tensors(model), tmp_path / "relu.safetensors"))
    assert (loaded.config.num_layers, loaded.config.num_heads, loaded.config.d_kv) == (3, 2, 16)
    assert not loaded.config.is_gated_act
    _same_weights(model, loaded)


def test_scaled_fp8_file(tiny_t5, tmp_path):
    """ComfyUI's scaled fp8: stored W/s in float8 plus ``scale_weight`` s; the loader gives float8(W/s) * s."""
    from sdcore.models.t5 import load_t5_encoder, t5_file_tensors

    model, _ = tiny_t5
    tensors = t5_file_tensors(model)
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    weight = tensors[key]
    scale = weight.abs().max() / 448.0
    stored = (weight / scale).to(torch.float8_e4m3fn)
    tensors[key] = stored
    tensors[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
    tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    loaded = load_t5_encoder(_save(tensors, tmp_path / "fp8.safetensors"))
    got = loaded.state_dict()[key]
    assert got.dtype == torch.float32
    assert torch.equal(got, stored.to(torch.float32) * scale)
    assert (got - weight).abs().max() <= 0.07 * weight.abs().max()  # fp8 keeps ~2 significant bits


def test_bad_files_give_clear_errors(tiny_t5, tmp_path):
    from sdcore.errors import ModelFormatError
    from sdcore.models.t5 import load_t5_encoder, t5_file_tensors

    model, _ = tiny_t5
    with pytest.raises(ModelFormatError, match="no T5 encoder"):
        load_t5_encoder(_save({"model.diffusion_model.x": torch.zeros(2)}, tmp_path / "none.safetensors"))
    tensors = t5_file_tensors(model)
    del tensors["encoder.final_layer_norm.weight"]
    with pytest.raises(ModelFormatError, match="final_layer_norm"):
        load_t5_encoder(_save(tensors, tmp_path / "cut.safetensors"))
    with pytest.raises(ModelFormatError, match="no such"):
        load_t5_encoder(tmp_path / "missing.safetensors")
    with pytest.raises(ModelFormatError, match="no T5 encoder folder"):
        load_t5_encoder(tmp_path)


def test_tokenizer_lookup(tiny_t5, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from sdcore.errors import ModelFormatError
    from sdcore.models.t5 import load_t5_tokenizer, tiny_t5_vocab

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # whatever this machine has

    _, tok = tiny_t5
    tok.save_pretrained(tmp_path / "tokenizer_2")
    assert load_t5_tokenizer(tmp_path)("a cat")["input_ids"] == tok("a cat")["input_ids"]
    assert len(load_t5_tokenizer(vocab_size=len(tiny_t5_vocab()))) == len(tok)
    with pytest.raises(ModelFormatError, match="t5_tokenizer"):
        load_t5_tokenizer(vocab_size=32128)  # a real T5-XXL and no tokenizer anywhere (offline test)
    with pytest.raises(ModelFormatError, match="no T5 tokenizer"):
        load_t5_tokenizer(tmp_path / "nothing")


def test_encode_t5_matches_plain_forward_and_mask_option(tiny_t5):
    from sdcore.models.t5 import encode_t5

    model, tok = tiny_t5
    prompts = ["a purple ring", "a big red square on the sky"]
    with torch.no_grad():
        embeds, mask = encode_t5(model, tok, prompts, max_length=12)
        ids = tok(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
        plain = model(ids)[0]
        masked, _ = encode_t5(model, tok, prompts, max_length=12, attention_mask=True)
    assert embeds.shape == (2, 12, model.config.d_model)
    assert torch.equal(embeds, plain)
    assert mask[0].tolist() == [1] * 4 + [0] * 8  # ▁a ▁purple ▁ring </s>
    count = int(mask[0].sum())
    assert not torch.allclose(masked[0, :count], embeds[0, :count])  # padding no longer attended
