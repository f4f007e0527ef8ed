"""Textual Inversion on SD3/SD3.5, Flux.1 (issue 19) and Chroma (T5-XXL alone).

Interop: an embedding applied in sdcore gives the prompt embeds of diffusers' own pipeline
``encode_prompt`` into which the same vectors were put by hand (``tokenizer.add_tokens``, the
embedding matrix grown where the new ids lie past it, the rows set). Training: a few steps on the
tiny models change only the new token's vectors, the loss is finite and the file has one key per
trained encoder (OneTrainer's ``clip_l``/``clip_g``/``t5``, the T5 part also under ComfyUI's ``t5xxl``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from sdcore.errors import NetworkMismatchError
from sdplugin_ti.apply import apply_embeddings, encoder_keys
from sdplugin_ti.embedding import CLIP_G, CLIP_L, SINGLE, T5, Embedding
from sdplugin_ti.formats import load_embedding, save_embedding

PROMPT = "a photo of mychar, standing"
#: family -> the diffusers component names of its text encoders and tokenizers, in bundle order
COMPONENTS = {
    "sd3": (["text_encoder", "text_encoder_2", "text_encoder_3"], ["tokenizer", "tokenizer_2", "tokenizer_3"]),
    "flux": (["text_encoder", "text_encoder_2"], ["tokenizer", "tokenizer_2"]),
    "chroma": (["text_encoder"], ["tokenizer"]),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _tiny(family: str):
    from sdcore.models.load import load_model

    return load_model(f"tiny:{family}")


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def _embedding(bundle, *, t5: bool, n: int = 2) -> Embedding:
    widths = {
        key: int(e.get_input_embeddings().embedding_dim)
        for key, e in zip(encoder_keys(bundle), bundle.text_encoders, strict=True)
    }
    keys = [key for key in widths if key != T5 or t5]
    return Embedding("mychar", {key: _vectors(n, widths[key], seed) for seed, key in enumerate(keys)})


def _pipeline(family: str, bundle):
    """diffusers' pipeline over copies of the bundle's text encoders and tokenizers (we edit them by hand)."""
    import diffusers

    encoders, tokenizers = COMPONENTS[family]
    parts = {name: copy.deepcopy(module) for name, module in zip(encoders, bundle.text_encoders, strict=True)}
    parts.update({name: copy.deepcopy(tok) for name, tok in zip(tokenizers, bundle.tokenizers, strict=True)})
    classes = {
        "sd3": diffusers.StableDiffusion3Pipeline,
        "flux": diffusers.FluxPipeline,
        "chroma": diffusers.ChromaPipeline,
    }
    cls = classes[family]
    return cls(transformer=bundle.transformer, vae=bundle.vae, scheduler=bundle.noise_scheduler, **parts)


def _add_by_hand(tokenizer, encoder, tokens: list[str], vectors: torch.Tensor) -> None:
    """What a diffusers user does: add the tokens, grow the matrix if the new ids lie past it, set the rows."""
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if max(ids) >= encoder.get_input_embeddings().num_embeddings:
        encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[ids] = vectors.to(encoder.get_input_embeddings().weight.dtype)


def _diffusers_embeds(family: str, bundle, emb: Embedding, tokens: list[str], prompt: str, max_length: int):
    pipe = _pipeline(family, bundle)
    encoders, tokenizers = COMPONENTS[family]
    for key, enc_name, tok_name in zip(encoder_keys(bundle), encoders, tokenizers, strict=True):
        if key in emb.vectors:
            _add_by_hand(getattr(pipe, tok_name), getattr(pipe, enc_name), tokens, emb.vectors[key])
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_length
            )
        elif family == "chroma":  # T5 alone: no pooled vector
            embeds, _ids, _mask, *_ = pipe.encode_prompt(
                prompt, device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_length
            )
            pooled = None
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompt, None, device="cpu", max_sequence_length=max_length)
    return embeds, pooled


def _sdcore_embeds(bundle, prompt: str, max_length: int):
    from sdcore.models.family import family_adapter

    with torch.no_grad():
        cond = family_adapter(bundle.family).encode_prompts(bundle, [prompt], t5_max_length=max_length)
    return cond.hidden_states, cond.pooled


@pytest.mark.parametrize("t5", [False, True], ids=["clip", "clip+t5"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_embeds_equal_diffusers_with_tokens_added_by_hand(family, t5, tmp_path):
    bundle = _tiny(family)
    max_length = 32  # short T5 sequences keep the tiny test fast; the same for both sides
    before = _sdcore_embeds(bundle, PROMPT, max_length)
    emb = _embedding(bundle, t5=t5)
    path = save_embedding(emb, tmp_path / "mychar.safetensors")
    loaded = load_embedding(path)
    assert set(loaded.vectors) == set(emb.vectors)

    handle = apply_embeddings(bundle, [loaded])
    prompt = handle.expand(PROMPT)
    assert prompt == "a photo of mychar mychar__ti1, standing"
    ours, ours_pooled = _sdcore_embeds(bundle, prompt, max_length)
    theirs, theirs_pooled = _diffusers_embeds(family, bundle, emb, handle.tokens["mychar"], prompt, max_length)

    assert ours.shape == theirs.shape and ours_pooled.shape == theirs_pooled.shape
    assert float((ours - theirs).abs().max()) <= 1e-6
    assert float((ours_pooled - theirs_pooled).abs().max()) <= 1e-6
    assert float((ours_pooled - before[1]).abs().max()) > 1e-3  # the CLIP vectors reached the pooled vector
    if t5:  # the T5 part changed T5's sequence (its tokens come after CLIP's 77 in SD3)
        t5_part = slice(77, None) if family == "sd3" else slice(None)
        assert float((ours[:, t5_part] - before[0][:, t5_part]).abs().max()) > 1e-3

    handle.remove()  # the model is as before, bit for bit
    after = _sdcore_embeds(bundle, PROMPT, max_length)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(type(e.get_input_embeddings()) is torch.nn.Embedding for e in bundle.text_encoders)
    assert "mychar__ti1" not in bundle.tokenizers[0].get_vocab()


def test_wrong_family_files_are_refused_with_both_named(tmp_path):
    from sdcore.models.tiny import create_tiny_bundle

    sd3, flux, chroma = _tiny("sd3"), _tiny("flux"), _tiny("chroma")
    sd3_emb = _embedding(sd3, t5=True)
    flux_emb = _embedding(flux, t5=False)
    chroma_emb = _embedding(chroma, t5=True)
    cases = [
        (flux, sd3_emb, r"has clip_l: 2 vectors of width 32, clip_g: 2 vectors of width 64, t5: .*\(SD3\); "
                        r"this flux model needs clip_l vectors of width 32 \(optionally t5 vectors of width"),
        (sd3, flux_emb, r"has clip_l: 2 vectors of width 32 \(FLUX\.1\); this sd3 model needs clip_l vectors of "
                        r"width 32 and clip_g vectors of width 64 \(optionally t5"),
        (sd3, Embedding("mychar", {SINGLE: torch.zeros(1, 768)}), r"has 1 vector of width 768 \(SD1\); this sd3 model"),
        # tiny SD1's CLIP is 32 wide as tiny Flux's CLIP-L: refused for its family, not its width
        (create_tiny_bundle("sd1"), flux_emb, r"\(FLUX\.1\); this sd1 model needs vectors of width 32$"),
        # Chroma's T5 is its only encoder: required there (no "optionally"), a CLIP part refused
        (chroma, sd3_emb, r"\(SD3\); this chroma model needs t5 vectors of width 32$"),
        (chroma, Embedding("mychar", {T5: torch.zeros(2, 48)}), r"has t5: 2 vectors of width 48 \(Chroma\); this "
                                                                 r"chroma model needs t5 vectors of width 32$"),
        (flux, chroma_emb, r"has t5: 2 vectors of width 32 \(Chroma\); this flux model needs clip_l vectors of width "
                           r"32 \(optionally t5"),
    ]  # fmt: skip
    for bundle, emb, message in cases:
        path = save_embedding(emb, tmp_path / "mychar.safetensors")
        with pytest.raises(NetworkMismatchError, match=message) as info:
            apply_embeddings(bundle, [load_embedding(path)])
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        assert all("mychar" not in tok.get_vocab() for tok in bundle.tokenizers if tok is not None)


def test_sdxl_clip_pair_fits_sd3_and_comfy_t5xxl_key_reads(tmp_path):
    """An SDXL-layout file (clip_l + clip_g) is an SD3 embedding without T5 part; ComfyUI's ``t5xxl``
    key is read as ``t5``."""
    from safetensors.torch import save_file

    sd3 = _tiny("sd3")
    emb = _embedding(sd3, t5=True)
    save_file({CLIP_L: emb.vectors[CLIP_L], CLIP_G: emb.vectors[CLIP_G], "t5xxl": emb.vectors[T5]},
              str(tmp_path / "comfy.safetensors"))  # fmt: skip
    loaded = load_embedding(tmp_path / "comfy.safetensors")
    assert set(loaded.vectors) == {CLIP_L, CLIP_G, T5} and torch.equal(loaded.vectors[T5], emb.vectors[T5])
    pair = Embedding("pair", {CLIP_L: emb.vectors[CLIP_L], CLIP_G: emb.vectors[CLIP_G]})
    handle = apply_embeddings(sd3, [pair])
    assert set(handle.tables["pair"]) == {CLIP_L, CLIP_G}  # T5 reads the word as text
    handle.remove()


@pytest.mark.parametrize(
    ("family", "train_t5"), [("sd3", False), ("flux", False), ("flux", True), ("chroma", False), ("chroma", True)]
)
def test_training_changes_only_the_new_vectors(family, train_t5, tmp_path):
    """Chroma's T5 is its only encoder: its vectors train with or without ``--train-t5``."""
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train
    from sdplugin_ti.method import TIMethod

    bundle = _tiny(family)
    frozen = {f"{i}.{k}": v.clone() for i, e in enumerate(bundle.text_encoders) for k, v in e.state_dict().items()} | {
        f"transformer.{k}": v.clone() for k, v in bundle.transformer.state_dict().items()
    }
    values = {"name": "tiny", "vectors": 2, "template": "subject_filewords", "lr": 5e-2, "max_steps": 3,
              "format": "safetensors", "train_t5": train_t5, "init_text": "red cat", "sample_every": 3,
              "sample_prompts": "a photo of tiny --w 64 --h 64 --s 2", "sample_sampler": "euler"}  # fmt: skip
    options = contract_options(TIMethod, tmp_path, values, family=family)
    method = TIMethod(options)
    result = train(method, bundle=bundle)

    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    samples = [p for p in tmp_path.rglob("*.png") if "data" not in p.relative_to(tmp_path).parts]
    assert samples  # sampling during training expands the word through the live embedding
    keys = encoder_keys(bundle)
    widths = {
        key: int(e.get_input_embeddings().embedding_dim) for key, e in zip(keys, bundle.text_encoders, strict=True)
    }
    expected = {  # OneTrainer's keys; T5 trains beside CLIP only on request, on Chroma (T5 alone) always
        ("sd3", False): [CLIP_L, CLIP_G],
        ("flux", False): [CLIP_L],
        ("flux", True): [CLIP_L, T5],
        ("chroma", False): [T5],
        ("chroma", True): [T5],
    }[(family, train_t5)]
    saved = load_embedding(result.output.with_suffix(".safetensors"))
    assert list(saved.vectors) == expected
    assert {k: tuple(v.shape) for k, v in saved.vectors.items()} == {k: (2, widths[k]) for k in expected}
    assert saved.metadata["sdcore.family"] == bundle.family and saved.step == 3
    # the vectors moved from their init (the init text's token rows)
    from sdplugin_ti.apply import init_vectors

    start = init_vectors(bundle, "red cat", 2, keys=expected)
    assert all(float((saved.vectors[k] - start[k]).abs().max()) > 1e-4 for k in expected)
    # nothing else did: every weight of the text encoders and the transformer is as before
    method.handle.remove()
    now = {f"{i}.{k}": v for i, e in enumerate(bundle.text_encoders) for k, v in e.state_dict().items()} | {
        f"transformer.{k}": v for k, v in bundle.transformer.state_dict().items()
    }
    assert now.keys() == frozen.keys()
    assert [k for k in frozen if not torch.equal(frozen[k], now[k])] == []


def test_t5_token_in_spare_matrix_rows_matches_diffusers(tmp_path):
    """Real T5-XXL has 32128 matrix rows for 32100 tokens: an added token's id lies inside the matrix.
    The tiny T5 gets such spare rows here; the table answers for the id, the matrix stays as it was."""
    bundle = _tiny("flux")
    t5, tok = bundle.text_encoders[1], bundle.tokenizers[1]
    t5.resize_token_embeddings(len(tok) + 28)  # spare rows past the tokenizer, as in T5-XXL
    matrix = t5.get_input_embeddings().weight.detach().clone()
    emb = _embedding(bundle, t5=True)
    handle = apply_embeddings(bundle, [emb])
    ids = tok.convert_tokens_to_ids(handle.tokens["mychar"])
    assert max(ids) < t5.get_input_embeddings().num_embeddings  # inside the matrix
    prompt = handle.expand(PROMPT)
    ours, ours_pooled = _sdcore_embeds(bundle, prompt, 32)
    theirs, theirs_pooled = _diffusers_embeds("flux", bundle, emb, handle.tokens["mychar"], prompt, 32)
    assert float((ours - theirs).abs().max()) <= 1e-6 and float((ours_pooled - theirs_pooled).abs().max()) <= 1e-6
    handle.remove()
    assert torch.equal(t5.get_input_embeddings().weight, matrix)
    assert (
        float((_sdcore_embeds(bundle, prompt, 32)[0] - ours).abs().max()) > 1e-3
    )  # removed: T5 reads the words as text again


def test_cli_trains_on_sd3_and_generate_uses_the_word_and_flux_refuses_it(tmp_path, sd_cli):
    """``sdcore train ti`` on tiny SD3, then ``sdcore generate`` with the embedding's word: the image
    changes; the same file on Flux stops with the one-line error (no traceback)."""
    import numpy as np
    from PIL import Image
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset

    pm = get_plugin_manager()
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    emb_dir = tmp_path / "emb"
    args = ["train", "ti", "--model", "tiny:sd3", "--data", str(data), "--output", str(emb_dir / "mychar.pt"),
            "--name", "mychar", "--vectors", "2", "--max-steps", "2", "--lr", "5e-2", "--resolution", "64",
            "--min-bucket-reso", "64", "--no-progress", "--seed", "0", "--format", "safetensors"]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = load_embedding(emb_dir / "mychar.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.vectors.items()} == {CLIP_L: (2, 32), CLIP_G: (2, 64)}
    (emb_dir / "mychar.pt").unlink()  # one file per word

    def generate(model: str, folder, out) -> tuple[int, str, np.ndarray | None]:
        run = sd_cli(["generate", "a photo of mychar", "--model", model, "--output", str(out), "--steps", "2",
                      "--size", "64x64", "--seed", "7", "--embeddings-dir", str(folder)], pm=pm)  # fmt: skip
        image = np.asarray(Image.open(out), dtype=np.int16) if run.exit_code == 0 else None
        return run.exit_code, run.output, image

    empty = tmp_path / "none"
    empty.mkdir()
    code, output, plain = generate("tiny:sd3", empty, tmp_path / "plain.png")
    assert code == 0, output
    code, output, with_emb = generate("tiny:sd3", emb_dir, tmp_path / "emb.png")
    assert code == 0, output
    assert plain is not None and with_emb is not None and np.abs(plain - with_emb).max() > 0
    code, output, _ = generate("tiny:flux", emb_dir, tmp_path / "flux.png")
    assert code != 0 and "Traceback" not in output
    assert "(sd3); this flux model needs clip_l vectors of width 32" in output, output


def test_chroma_cli_trains_t5_and_generate_applies_the_trained_vectors(tmp_path, sd_cli):
    """``sdcore train ti`` on tiny Chroma (T5-XXL its one encoder): the file holds T5's vectors under OneTrainer's
    ``t5`` and ComfyUI's ``t5xxl`` alone, moved from the init text's rows; ``sdcore generate --embeddings-dir`` changes
    the image, and the embedding handler's T5 hidden states are diffusers' ``ChromaPipeline.encode_prompt`` with the
    file's ``t5xxl`` vectors (as ComfyUI's Chroma tokenizer reads them) put in T5's token table by hand. FLUX.1
    refuses the file in one line."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_ti.apply import EmbeddingHandler, init_vectors

    pm = get_plugin_manager()
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    emb_dir = tmp_path / "emb"
    args = ["train", "ti", "--model", "tiny:chroma", "--data", str(data), "--output", str(emb_dir / "mychar.pt"),
            "--name", "mychar", "--vectors", "2", "--max-steps", "2", "--lr", "5e-2", "--resolution", "64",
            "--min-bucket-reso", "64", "--no-progress", "--seed", "0", "--format", "safetensors",
            "--init-text", "red cat"]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    with safe_open(str(emb_dir / "mychar.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        meta = handle.metadata()
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == {
        "t5": ((2, 32), torch.float32),
        "t5xxl": ((2, 32), torch.float32),
    }
    assert torch.equal(tensors["t5"], tensors["t5xxl"]) and meta["sdcore.family"] == "chroma" and meta["step"] == "2"
    bundle = _tiny("chroma")
    start = init_vectors(bundle, "red cat", 2, keys=[T5])
    assert float((tensors["t5"] - start[T5]).abs().max()) > 1e-4  # trained away from the init text's rows
    assert list(load_embedding(emb_dir / "mychar.pt").vectors) == [T5]  # the A1111 .pt beside it: the same part
    (emb_dir / "mychar.pt").unlink()  # the .safetensors alone (t5 + t5xxl) must be found as an embedding

    def generate(model: str, folder, out) -> tuple[int, str, np.ndarray | None]:
        run = sd_cli(["generate", "a photo of mychar", "--model", model, "--output", str(out), "--steps", "2",
                      "--size", "64x64", "--seed", "7", "--embeddings-dir", str(folder)], pm=pm)  # fmt: skip
        image = np.asarray(Image.open(out), dtype=np.int16) if run.exit_code == 0 else None
        return run.exit_code, run.output, image

    empty = tmp_path / "none"
    empty.mkdir()
    code, output, plain = generate("tiny:chroma", empty, tmp_path / "plain.png")
    assert code == 0, output
    code, output, with_emb = generate("tiny:chroma", emb_dir, tmp_path / "emb.png")
    assert code == 0, output
    assert plain is not None and with_emb is not None and np.abs(plain - with_emb).max() > 0

    before, _ = _sdcore_embeds(bundle, PROMPT, 32)
    activation = EmbeddingHandler(emb_dir).activate(bundle, [], PROMPT, "")
    assert activation.prompt == "a photo of mychar mychar__ti1, standing"
    ours, _ = _sdcore_embeds(bundle, activation.prompt, 32)
    trained = Embedding("mychar", {T5: tensors["t5xxl"]})
    theirs, _ = _diffusers_embeds("chroma", bundle, trained, ["mychar", "mychar__ti1"], activation.prompt, 32)
    assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) <= 1e-6
    assert float((ours - before).abs().max()) > 1e-3  # the trained vectors reached T5's sequence
    activation.undo()
    assert torch.equal(_sdcore_embeds(bundle, PROMPT, 32)[0], before)

    code, output, _ = generate("tiny:flux", emb_dir, tmp_path / "flux.png")
    assert code != 0 and "Traceback" not in output
    assert "t5: 2 vectors of width 32 (chroma); this flux model needs clip_l vectors of width 32" in output, output


@pytest.mark.parametrize(("family", "extra"), [("chroma", {}), ("flux", {"train_t5": True})])
def test_resume_continues_exactly(family, extra, tmp_path):
    """4 steps in one go == 2 steps, Ctrl-C, ``--resume latest`` (the runtime contract's check) with T5's vectors
    training: Chroma's one set, FLUX.1's CLIP and T5 sets."""
    from sdcore.testing.contract import check_resume
    from sdplugin_ti.method import TIMethod

    check_resume(TIMethod, tmp_path, {"name": "tiny", "vectors": 2, "template": "subject_filewords", "lr": 5e-2,
                                      **extra}, family=family)  # fmt: skip


def test_legacy_clip_config_pools_at_eos_not_at_the_placeholder(tmp_path):
    """OpenAI's CLIP-L config (shipped in Flux/SD3/SDXL folders) has ``eos_token_id = 2``: transformers
    then pools at the largest id, which a placeholder (>= 49408) would be. While an embedding is
    active the pooled vector stays at EOS: the same as a current config gives, not diffusers' by-hand
    result on the legacy config (pooled at the placeholder)."""
    current = _tiny("flux")
    legacy = _tiny("flux")
    pooling = [m for m in legacy.text_encoders[0].modules() if getattr(m, "eos_token_id", None) == 49407]
    assert pooling  # the CLIP text transformer keeps its own copy of the config value
    for module in pooling:
        module.eos_token_id = 2
    assert torch.equal(_sdcore_embeds(legacy, PROMPT, 32)[1], _sdcore_embeds(current, PROMPT, 32)[1])

    emb = _embedding(current, t5=False)
    right = apply_embeddings(current, [emb])
    prompt = right.expand(PROMPT)
    expected = _sdcore_embeds(current, prompt, 32)[1]
    _, at_placeholder = _diffusers_embeds("flux", legacy, emb, right.tokens["mychar"], prompt, 32)
    handle = apply_embeddings(legacy, [emb])
    pooled = _sdcore_embeds(legacy, prompt, 32)[1]
    assert float((pooled - expected).abs().max()) <= 1e-6
    assert float((pooled - at_placeholder).abs().max()) > 1e-3
    handle.remove()
    assert all(module.eos_token_id == 2 for module in pooling)


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("flux", {"gradient_checkpointing": True, "train_t5": True}),
        ("sd3", {"mixed_precision": "bf16"}),
        ("chroma", {"gradient_checkpointing": True}),
    ],
)
def test_trains_with_checkpointing_and_bf16(family, extra, tmp_path):
    """Gradients reach every trained table through checkpointed text encoders and under bf16 autocast."""
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train
    from sdplugin_ti.apply import init_vectors
    from sdplugin_ti.method import TIMethod

    values = {"name": "tiny", "vectors": 1, "lr": 5e-2, "max_steps": 2, "init_text": "red", **extra}
    bundle = _tiny(family)
    result = train(TIMethod(contract_options(TIMethod, tmp_path, values, family=family)), bundle=bundle)
    trained = load_embedding(result.output).vectors
    start = init_vectors(bundle, "red", 1, keys=list(trained))
    assert set(trained) == {"flux": {CLIP_L, T5}, "sd3": {CLIP_L, CLIP_G}, "chroma": {T5}}[family]
    for key, vectors in trained.items():
        assert torch.isfinite(vectors).all() and float((vectors - start[key]).abs().max()) > 1e-3, key


@pytest.mark.parametrize("suffix", ["pt", "safetensors", "bin", "png"])
def test_every_file_format_keeps_the_t5_part(suffix, tmp_path):
    emb = Embedding("mychar", {CLIP_L: _vectors(2, 768, 0), T5: _vectors(2, 4096, 1)})
    loaded = load_embedding(save_embedding(emb, tmp_path / f"mychar.{suffix}"))
    assert list(loaded.vectors) == [CLIP_L, T5]
    assert all(torch.equal(loaded.vectors[k], emb.vectors[k]) for k in emb.vectors)
    assert "(FLUX.1)" in loaded.describe()


def _comfy_lookup(data: dict, embedding_key: str):
    """ComfyUI's rule for a multi-key embedding file, rewritten from its tokenizers: each encoder's
    tokenizer takes the tensor under its own ``embedding_key`` (``clip_l``, ``clip_g``, ``t5xxl``)."""
    return data.get(embedding_key)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_the_t5_part_is_also_under_comfyuis_key(suffix, tmp_path):
    emb = Embedding("mychar", {CLIP_L: _vectors(2, 768, 0), T5: _vectors(2, 4096, 1)})
    path = save_embedding(emb, tmp_path / f"mychar.{suffix}")
    if suffix == "safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(path, weights_only=True)
    assert set(data) == {CLIP_L, T5, "t5xxl"}  # OneTrainer's t5 and ComfyUI's t5xxl
    assert torch.equal(_comfy_lookup(data, "t5xxl"), emb.vectors[T5])
    assert torch.equal(_comfy_lookup(data, "clip_l"), emb.vectors[CLIP_L])
    assert list(load_embedding(path).vectors) == [CLIP_L, T5]  # read back once
