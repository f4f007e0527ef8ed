"""Applying embeddings: same text-encoder outputs as diffusers' loader, exact undo, SDXL, mismatches."""

from __future__ import annotations

import copy

import pytest
import torch
from sdcore.errors import NetworkMismatchError
from sdcore.models.text import encode_prompts
from sdcore.models.tokenizer import OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer
from sdplugin_ti.apply import EmbeddingHandler, apply_embeddings, expand_prompt, find_names, placeholder_tokens
from sdplugin_ti.embedding import CLIP_G, CLIP_L, SINGLE, Embedding
from sdplugin_ti.formats import load_embedding, save_embedding

PROMPT = "a photo of mychar, standing"


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def _sd_pipeline(bundle):
    """A diffusers pipeline over copies of the bundle's modules (diffusers mutates what it loads into)."""
    from diffusers import StableDiffusionPipeline

    pad = OPENCLIP_PAD_TOKEN if bundle.family == "sd2" else "<|endoftext|>"
    return StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=copy.deepcopy(bundle.text_encoders[0]),
        tokenizer=bundled_clip_tokenizer(pad_token=pad),
        unet=bundle.unet,
        scheduler=bundle.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("suffix", ["pt", "safetensors", "bin"])
def test_same_hidden_states_as_diffusers_loader(make_bundle, tmp_path, family, suffix):
    bundle = make_bundle(family)
    reference = encode_prompts(bundle, [PROMPT]).hidden_states
    emb = Embedding("mychar", {SINGLE: _vectors(3, 32, 0)})
    path = save_embedding(emb, tmp_path / f"mychar.{suffix}")

    pipe = _sd_pipeline(bundle)
    pipe.load_textual_inversion(str(path), token="mychar")
    theirs, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)

    handle = apply_embeddings(bundle, [load_embedding(path)])
    ours = encode_prompts(bundle, [handle.expand(PROMPT)]).hidden_states
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, reference, atol=1e-3)  # the embedding changed something

    handle.remove()
    assert len(bundle.tokenizers[0]) == 49408
    assert type(bundle.text_encoders[0].get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(encode_prompts(bundle, [PROMPT]).hidden_states, reference)


def test_width_mismatch_names_expected_and_found(make_bundle):
    sd1 = make_bundle("sd1")
    with pytest.raises(
        NetworkMismatchError, match=r"has 1 vector of width 768 \(SD1\); this sd1 model needs vectors of width 32"
    ):
        apply_embeddings(sd1, [Embedding("big", {SINGLE: torch.zeros(1, 768)})])
    sdxl = make_bundle("sdxl")
    # issue 17: an SD1 embedding on SDXL said "has 32 vectors" when it had 4 vectors of width 32
    with pytest.raises(
        NetworkMismatchError,
        match=r"has 4 vectors of width 32; this sdxl model needs clip_l vectors of width 32 and clip_g vectors of width 64",
    ):
        apply_embeddings(sdxl, [Embedding("one", {SINGLE: torch.zeros(4, 32)})])
    with pytest.raises(NetworkMismatchError, match=r"has 4 vectors of width 768 \(SD1\); this sdxl model needs clip_l"):
        apply_embeddings(sdxl, [Embedding("real", {SINGLE: torch.zeros(4, 768)})])
    with pytest.raises(
        NetworkMismatchError, match=r"clip_g: 1 vector of width 1280 \(SDXL or SD3\);.*clip_g vectors of width 64"
    ):
        apply_embeddings(sdxl, [Embedding("xl", {CLIP_L: torch.zeros(1, 32), CLIP_G: torch.zeros(1, 1280)})])
    assert len(sdxl.tokenizers[0]) == 49408  # nothing left behind


def test_failed_apply_leaves_nothing(make_bundle):
    bundle = make_bundle("sd1")
    good = Embedding("good", {SINGLE: torch.zeros(2, 32)})
    clash = Embedding("GOOD", {SINGLE: torch.zeros(1, 32)})
    with pytest.raises(NetworkMismatchError, match="clash"):
        apply_embeddings(bundle, [good, clash])
    handle = apply_embeddings(bundle, [good])
    with pytest.raises(NetworkMismatchError, match="already exists"):
        apply_embeddings(bundle, [good])
    handle.remove()
    assert len(bundle.tokenizers[0]) == 49408


def test_prompt_expansion_rules():
    tokens = {"bad-hands": ["bad-hands"], "bad-hands-5": ["bad-hands-5", "bad-hands-5__ti1"], "Star": ["star__ti0"]}
    assert expand_prompt("(Bad-Hands-5:1.2), bad-hands, xbad-hands", tokens) == (
        "(bad-hands-5 bad-hands-5__ti1:1.2), bad-hands, xbad-hands"
    )
    assert expand_prompt("a STAR, starry", tokens) == "a star__ti0, starry"
    assert find_names("ugly, BAD-HANDS-5", ["bad-hands", "bad-hands-5"]) == ["bad-hands-5"]


def test_placeholder_for_vocabulary_word_is_distinct(make_bundle, monkeypatch):
    bundle = make_bundle("sd1")
    tok = bundle.tokenizers

    def refuse(*_args, **_kwargs):
        raise AssertionError("get_vocab() builds every word: 25-70 ms per call")

    monkeypatch.setattr(type(tok[0]), "get_vocab", refuse)  # one word is asked, not the whole vocabulary
    assert placeholder_tokens("style", 2, tok) == ["style__ti0", "style__ti1"]
    assert placeholder_tokens("My Char", 1, tok) == ["my char"]
    # an embedding removed is free again, also when removed below a later one (its id is kept, not its word)
    first = apply_embeddings(bundle, [Embedding("mychar", {SINGLE: _vectors(1, 32, 1)})])
    assert placeholder_tokens("mychar", 1, tok) == ["mychar__ti0"]  # active: its word is taken
    second = apply_embeddings(bundle, [Embedding("later", {SINGLE: _vectors(1, 32, 2)})])
    first.remove()
    assert placeholder_tokens("mychar", 1, tok) == ["mychar"]
    second.remove()
    assert placeholder_tokens("mychar", 1, tok) == ["mychar"]


def test_handler_activates_from_prompt_and_negative_and_undoes(make_bundle, tmp_path):
    bundle = make_bundle("sd1")
    save_embedding(Embedding("mychar", {SINGLE: _vectors(2, 32, 3)}), tmp_path / "mychar.pt")
    save_embedding(Embedding("ugly", {SINGLE: _vectors(1, 32, 4)}), tmp_path / "sub" / "Ugly.safetensors")
    save_embedding(Embedding("unused", {SINGLE: _vectors(1, 32, 5)}), tmp_path / "unused.bin")
    save_embedding(Embedding("wide", {SINGLE: _vectors(1, 768, 5)}), tmp_path / "wide.pt")
    save_embedding(Embedding("other", {SINGLE: _vectors(1, 768, 6)}), tmp_path / "mychar.png")  # a preview
    handler = EmbeddingHandler(tmp_path)
    reference = encode_prompts(bundle, [PROMPT]).hidden_states

    act = handler.activate(bundle, [], PROMPT, "ugly, blurry")
    assert act.prompt == "a photo of mychar mychar__ti1, standing"
    assert act.negative_prompt == "ugly__ti0, blurry"  # "ugly" is a vocabulary word: distinct placeholder
    assert "mychar: " in act.info["TI hashes"] and "Ugly: " in act.info["TI hashes"]
    assert {t.content for t in bundle.tokenizers[0].added_tokens_decoder.values()} >= {
        "mychar",
        "mychar__ti1",
        "ugly__ti0",
    }
    # a second activation for another prompt of the same batch reuses the live embeddings
    again = handler.activate(bundle, [], "mychar", "")
    assert again.prompt == "mychar mychar__ti1"
    again.undo()
    assert encode_prompts(bundle, [act.prompt]).hidden_states.shape == reference.shape
    act.undo()
    assert len(bundle.tokenizers[0]) == 49408
    assert torch.equal(encode_prompts(bundle, [PROMPT]).hidden_states, reference)
    # nothing named: nothing happens
    quiet = handler.activate(bundle, [], "a cat", "")
    assert quiet.prompt == "a cat" and len(bundle.tokenizers[0]) == 49408
    with pytest.raises(NetworkMismatchError, match="needs vectors of width 32"):
        handler.activate(bundle, [], "a wide shot", "")
    assert len(bundle.tokenizers[0]) == 49408


def test_ti_hashes_are_a1111s(make_bundle, tmp_path):
    """A1111 modules/sd_hijack_clip.py (forward): "TI hashes" lists each used embedding once as
    ``name: shorthash`` with ':' and ',' taken out of the name; the shorthash is the first 12 hex
    digits of the file's sha256 (modules/textual_inversion/textual_inversion.py)."""
    import hashlib

    bundle = make_bundle("sd1")
    path = tmp_path / "bad,hands.pt"
    save_embedding(Embedding("x", {SINGLE: _vectors(1, 32, 3)}), path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    act = EmbeddingHandler(tmp_path).activate(bundle, [], "a cat, bad,hands", "bad,hands")
    try:
        assert act.info["TI hashes"] == f"badhands: {expected}"
    finally:
        act.undo()


def test_the_token_table_is_sdcores_and_the_old_names_still_import():
    """The lookup with extra rows moved to sdcore.models.token_embeddings (every new-token method uses it);
    code that imported it from here keeps working, and an embedding's handle is built on sdcore's rows."""
    import sdcore.models.token_embeddings as core
    from sdcore.models.tiny import create_tiny_bundle
    from sdplugin_ti import apply

    assert apply.ExtendedTokenEmbedding is core.ExtendedTokenEmbedding
    assert (apply._extended, apply._release) == (core.extend_input_embeddings, core.release_input_embeddings)
    assert (apply._add_tokens, apply._remove_tokens) == (core.add_tokens, core.remove_tokens)
    assert apply._pool_at_eos is core.pool_at_eos and apply._LEGACY_EOS == core.LEGACY_EOS == 2

    bundle = create_tiny_bundle("sd1")
    handle = apply_embeddings(bundle, [Embedding(name="zork", vectors={"*": torch.ones(2, 32)})])
    rows = handle.rows["zork"]
    assert rows.tokens == handle.tokens["zork"] and rows.tables[0] is handle.tables["zork"]["*"]
    handle.remove()
    assert rows.removed and not isinstance(bundle.text_encoders[0].get_input_embeddings(), core.ExtendedTokenEmbedding)


def test_the_trainers_pt_and_format_copy_are_one_embedding_other_twins_are_ambiguous(tmp_path):
    """``sdcore train ti --format safetensors --output emb`` writes ``emb/mychar.pt`` and its copy
    ``emb/mychar.safetensors`` (docs/ti-sd3-flux.md); ``--embeddings-dir emb`` must take that pair as the
    one embedding it is, while two files of one name holding different vectors stay an error."""
    vectors = {CLIP_L: torch.randn(2, 768), CLIP_G: torch.randn(2, 1280)}
    save_embedding(Embedding("mychar", {k: v.clone() for k, v in vectors.items()}), tmp_path / "mychar.pt")
    save_embedding(Embedding("mychar", {k: v.clone() for k, v in vectors.items()}), tmp_path / "mychar.safetensors")
    assert EmbeddingHandler(tmp_path).names() == {"mychar": tmp_path / "mychar.pt"}
    other = {k: v + 1 for k, v in vectors.items()}
    save_embedding(Embedding("twin", vectors), tmp_path / "twin.pt")
    save_embedding(Embedding("twin", other), tmp_path / "twin.safetensors")
    with pytest.raises(NetworkMismatchError, match=r"embedding 'twin' is ambiguous: 2 embedding files"):
        EmbeddingHandler(tmp_path).names()


def test_which_files_in_an_embeddings_folder_are_embeddings(tmp_path):
    """``EmbeddingHandler.accepts`` takes a file by its top-level keys: one tensor per encoder (``clip_l``,
    ``clip_g``, ``t5`` or ComfyUI's ``t5xxl``, by sdcore's one reading of the layout), so Chroma's T5-only file
    (``t5`` + ``t5xxl``, two keys) is an embedding, and so are OneTrainer's output vectors alone (``t5_out``...,
    which OneTrainer loads); a LoRA or a T5 encoder's weights are not, however many keys merely start with an
    encoder's name."""
    from safetensors.torch import save_file

    save_embedding(Embedding("chroma", {"t5": torch.randn(2, 32)}), tmp_path / "chroma.safetensors")
    save_file({"t5xxl": torch.randn(2, 32), "t5xxl_out": torch.randn(2, 32)}, str(tmp_path / "comfy.safetensors"))
    save_embedding(Embedding("sdxl", {CLIP_L: torch.randn(1, 8), CLIP_G: torch.randn(1, 8)}), tmp_path / "x.pt")
    save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(4, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 4)},
        str(tmp_path / "l.safetensors"),
    )
    save_file(
        {"t5.encoder.block.0.weight": torch.zeros(4, 4), "t5.shared.weight": torch.zeros(4, 4)},
        str(tmp_path / "te.safetensors"),
    )
    save_file({"t5_out": torch.zeros(2, 4), "clip_l_out": torch.zeros(2, 4)}, str(tmp_path / "outs.safetensors"))
    handler = EmbeddingHandler(tmp_path)
    found = {path.name: handler.accepts(path) for path in sorted(tmp_path.iterdir())}
    assert found == {
        "chroma.safetensors": True,
        "comfy.safetensors": True,
        "l.safetensors": False,
        "outs.safetensors": True,  # OneTrainer's output vectors alone: it loads them (zero input vectors)
        "te.safetensors": False,
        "x.pt": True,
    }
    assert sorted(handler.names()) == ["chroma", "comfy", "outs", "x"]


def test_one_file_reached_through_two_folders_is_one_embedding(tmp_path):
    """A1111's root ``embeddings/`` and ``models/embeddings`` are both searched when both exist; one of them a
    symlink to the other (or a file linked into a second folder) is the same file, one candidate: neither an
    "ambiguous" name nor two entries (the base handler's ``available`` dedupes by device and inode)."""
    import os

    root = tmp_path / "embeddings"
    root.mkdir()
    save_embedding(Embedding("mychar", {SINGLE: torch.randn(2, 768)}), root / "mychar.pt")
    save_embedding(Embedding("other", {SINGLE: torch.randn(1, 768)}), root / "other.safetensors")
    linked = tmp_path / "models" / "embeddings"
    linked.parent.mkdir()
    try:
        os.symlink(root, linked, target_is_directory=True)
        (tmp_path / "more").mkdir()
        os.symlink(root / "other.safetensors", tmp_path / "more" / "other.safetensors")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    handler = EmbeddingHandler(root)
    handler.more_directories = (linked, tmp_path / "more")
    assert {key: paths for key, (_, paths) in handler.candidates().items()} == {
        "mychar": [root / "mychar.pt"],
        "other": [root / "other.safetensors"],
    }
    assert handler.names() == {"mychar": root / "mychar.pt", "other": root / "other.safetensors"}


def test_comfyui_embedding_spelling(make_bundle, tmp_path):
    """ComfyUI's prompts name an embedding as ``embedding:NAME`` (``comfy/sd1_clip.py``: the file under the embeddings
    folder or a subfolder, with its suffix or without; ``(embedding:NAME:1.2)`` weights it). The vectors stand where
    the word stood, without the tokens of ``embedding`` and ``:`` that reading it as A1111 words would leave; an
    ``embedding:NAME`` with no file is one line naming it (ComfyUI only logs a warning and drops it: here the
    image would silently differ)."""
    bundle = make_bundle("sd1")
    save_embedding(Embedding("mychar", {SINGLE: _vectors(2, 32, 3)}), tmp_path / "mychar.pt")
    save_embedding(Embedding("ugly", {SINGLE: _vectors(1, 32, 4)}), tmp_path / "sub" / "Ugly.safetensors")
    handler = EmbeddingHandler(tmp_path)
    act = handler.activate(
        bundle, [], "a photo of embedding:mychar, (embedding:mychar.pt:1.2)", "embedding:sub/Ugly.safetensors blurry"
    )
    try:
        assert act.prompt == "a photo of mychar mychar__ti1, (mychar mychar__ti1:1.2)"
        assert act.negative_prompt == "ugly__ti0 blurry"
    finally:
        act.undo()
    with pytest.raises(NetworkMismatchError, match="'embedding:nosuch' not found in"):
        handler.activate(bundle, [], "a embedding:nosuch cat", "")
    assert len(bundle.tokenizers[0]) == 49408


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("(embedding:foo:1.2), embedding:bar,", ["foo", "bar"]),  # weight off first; trailing comma is no name
        ("x)embedding:foo", ["foo"]),  # ComfyUI splits segments at parentheses
        ("(embedding:1.2) and (embedding:2)", []),  # the word 'embedding' at a weight (ComfyUI and A1111)
        ("Embedding:foo EMBEDDING:bar", []),  # ComfyUI's startswith is case-sensitive: plain text there
        ("a,embedding:foo myembedding:bar", []),  # not a space-separated word starting with embedding:
        ("[embedding:foo:5] [dog:embedding:foo:0.5] <lora:embedding:1>", []),  # A1111 prompt editing, tags
        ("the embedding: foo", []),
    ],
)
def test_what_comfyui_reads_as_an_embedding(text, words):
    """Only what ComfyUI's tokenizer (``comfy/sd1_clip.py``) reads as an embedding counts: otherwise an ordinary
    A1111 prompt would fail with "embedding ... not found" or lose the word ``embedding``."""
    from sdplugin_ti.apply import comfy_embedding_words, replace_comfy_embeddings

    assert [word for _written, word in comfy_embedding_words(text)] == words
    known = {"foo": "Foo", "bar": "bar"}
    expected = text
    for written, word in comfy_embedding_words(text):
        expected = expected.replace(written, known[word])
    assert replace_comfy_embeddings(text, known) == expected


def test_comfyui_embedding_replaced_where_it_stands():
    """The replacement takes the ``embedding:NAME`` that was matched, not the first same text in the prompt (A1111's
    ``[dog:embedding:foo:3]`` before it stays as written)."""
    from sdplugin_ti.apply import replace_comfy_embeddings

    text = "[dog:embedding:foo:3] embedding:foo (embedding:sub/Foo.pt:1.1) (embedding:1.2) embedding:nosuch"
    assert (
        replace_comfy_embeddings(text, {"foo": "Foo"})
        == "[dog:embedding:foo:3] Foo (Foo:1.1) (embedding:1.2) embedding:nosuch"
    )


def test_a_missing_comfyui_embedding_stops_generate_before_the_model_loads(tmp_path, monkeypatch):
    """``sdcore generate "embedding:nosuch"`` says so in one line, naming the folder searched, and exits 2 without
    loading the model (as a missing ``<lora:...>`` does); a present one passes that check."""
    from click.testing import CliRunner
    from sdcore.builtin import generate_command
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model must not load"))
    folder = tmp_path / "embeddings"
    save_embedding(Embedding("mychar", {SINGLE: _vectors(2, 32, 3)}), folder / "mychar.pt")
    cli = build_cli(get_plugin_manager())
    args = ["generate", "-m", "tiny:sd1", "--embeddings-dir", str(folder), "-o", str(tmp_path / "o.png")]
    result = CliRunner().invoke(cli, [*args, "a (embedding:mychar:1.2), embedding:nosuch", "-n", "embedding:bad,"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip() == (
        f"Error: embedding 'embedding:nosuch', 'embedding:bad' not found in {folder} and its subfolders; "
        "available: mychar; point --embeddings-dir at the folder with your embedding files"
    )


def test_training_samples_read_comfyui_embedding_spelling(make_bundle):
    """A TI run's sample prompts (the trainer's LiveEmbeddings) read ComfyUI's ``embedding:NAME`` as ``sdcore
    generate`` does: the active embedding's tokens where the word stood (a ``--placeholder`` embedding's too), not
    the tokens of ``embedding`` and ``:``; a name the run has no embedding for stays as written."""
    from sdplugin_ti.apply import LiveEmbeddings

    bundle = make_bundle("sd1")
    embeddings = [Embedding("mychar", {SINGLE: _vectors(2, 32, 3)}), Embedding("Ugly", {SINGLE: _vectors(1, 32, 4)})]
    handle = apply_embeddings(bundle, embeddings)
    handle.placeholders["Ugly"] = "<ugly>"
    try:
        live = LiveEmbeddings(handle)
        act = live.activate(
            bundle, [], "a photo of embedding:mychar, (embedding:mychar.pt:1.2)", "embedding:sub/ugly.safetensors, x"
        )
        assert act.prompt == "a photo of mychar mychar__ti1, (mychar mychar__ti1:1.2)"
        assert act.negative_prompt == "ugly__ti0, x"
        plain = live.activate(bundle, [], "a photo of mychar, (mychar:1.2)", "<ugly>, x")
        assert (plain.prompt, plain.negative_prompt) == (act.prompt, act.negative_prompt)
        assert live.activate(bundle, [], "embedding:nosuch cat", "").prompt == "embedding:nosuch cat"
    finally:
        handle.remove()
