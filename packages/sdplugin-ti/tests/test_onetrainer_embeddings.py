"""OneTrainer's embedding files, and its output embeddings, in sdcore.

OneTrainer (``modules/modelSaver/*EmbeddingSaver.py``) saves SD1/SD2's vectors as ``emp_params`` and the other
families' as ``clip_l``/``clip_g``/``t5``; an *output embedding* adds ``<key>_out`` beside zero input vectors. Its
rule (``BaseModel._apply_output_embeddings``, called in each model's ``encode_text`` after the encoder, on the
hidden states the family reads), rewritten here as a formula and not imported::

    out[b, t] = output_vector[i]   where tokens[b, t] is the i-th placeholder token
    out[b, t] = hidden[b, t]       elsewhere

where ``hidden`` is the encoding with the placeholder's input rows at zero. The tests build the files as
OneTrainer's savers write them, encode with and without the ``_out`` keys, and check that formula exactly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sdcore.models.bundled_embeddings import bundled_embeddings
from sdcore.models.embedding_files import read_embedding_file
from sdplugin_ti.apply import EmbeddingHandler, apply_embeddings, encoder_keys
from sdplugin_ti.embedding import SINGLE
from sdplugin_ti.formats import load_embedding

#: the word twice, the second time in the prompt's second 75-token chunk
PROMPT = "mychar, " + "a photo " * 40 + "of mychar standing"
NEGATIVE = "ugly, blurry"
#: OneTrainer's file key of each sdcore part (StableDiffusionEmbeddingSaver: emp_params, sic)
FILE_KEY = {SINGLE: "emp_params", "clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _widths(bundle) -> dict[str, int]:
    return {
        key: int(e.get_input_embeddings().embedding_dim)
        for key, e in zip(encoder_keys(bundle), bundle.text_encoders, strict=True)
    }


def _outputs(bundle, n: int = 2, parts: list[str] | None = None) -> dict[str, torch.Tensor]:
    widths = _widths(bundle)
    gen = torch.Generator().manual_seed(7)
    return {key: torch.randn(n, widths[key], generator=gen) for key in parts or widths}


def _write(folder: Path, outputs: dict[str, torch.Tensor], *, with_out: bool, name: str = "mychar") -> Path:
    """The file OneTrainer's saver writes for an output embedding: zero input vectors, ``<key>_out`` vectors;
    without ``with_out`` the same file less its ``_out`` keys (the run "without it")."""
    tensors = {FILE_KEY[key]: torch.zeros_like(value) for key, value in outputs.items()}
    if with_out:
        tensors.update({FILE_KEY[key] + "_out": value for key, value in outputs.items()})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def _placeholder_ids(tokenizer, n: int = 2) -> list[int]:
    return tokenizer.convert_tokens_to_ids(["mychar"] + [f"mychar__ti{i}" for i in range(1, n)])


def _replaced(reference: torch.Tensor, ids: torch.Tensor, placeholder: list[int], vectors: torch.Tensor) -> int:
    """OneTrainer's rule on ``reference`` [B, T, D] in place; returns how many positions it replaced."""
    count = 0
    for i, token in enumerate(placeholder):
        where = ids == token
        reference[where] = vectors[i].to(reference.dtype)
        count += int(where.sum())
    return count


# --- reading ---------------------------------------------------------------------------------------------------------
def test_onetrainer_files_read_with_their_output_vectors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"emp_params": torch.ones(3, 8)}, str(plain))
    emb = load_embedding(plain)
    assert set(emb.vectors) == {SINGLE} and not emb.output_vectors and not emb.is_output
    assert torch.equal(emb.vectors[SINGLE], torch.ones(3, 8))

    sd1 = tmp_path / "sd1.safetensors"
    save_file({"emp_params": torch.zeros(2, 8), "emp_params_out": torch.full((2, 8), 2.0)}, str(sd1))
    emb = load_embedding(sd1)
    assert torch.equal(emb.vectors[SINGLE], torch.zeros(2, 8))
    assert torch.equal(emb.output_vectors[SINGLE], torch.full((2, 8), 2.0))
    assert emb.describe() == "2 vectors of width 8; an output embedding (OneTrainer: output vectors)"
    # the LoRA plugin's reader of embedding files (pivotal tuning's start) takes the input vectors
    assert set(read_embedding_file(sd1)) == {SINGLE}

    sdxl = tmp_path / "sdxl.safetensors"
    sdxl_tensors = {"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16)}
    sdxl_tensors |= {"clip_l_out": torch.ones(1, 8), "clip_g_out": torch.ones(1, 16)}
    save_file(sdxl_tensors, str(sdxl))
    emb = load_embedding(sdxl)
    assert list(emb.vectors) == ["clip_l", "clip_g"] and list(emb.output_vectors) == ["clip_l", "clip_g"]

    # output vectors alone: OneTrainer loads them as an output embedding (zero input vectors), and so does sdcore
    only = tmp_path / "only.safetensors"
    save_file({"emp_params_out": torch.ones(2, 4)}, str(only))
    emb = load_embedding(only)
    assert torch.equal(emb.vectors[SINGLE], torch.zeros(2, 4)) and torch.equal(
        emb.output_vectors[SINGLE], torch.ones(2, 4)
    )

    handler = EmbeddingHandler(tmp_path)
    assert handler.names() == {"plain": plain, "sd1": sd1, "sdxl": sdxl, "only": only}


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_saved_safetensors_keep_the_output_vectors_in_onetrainers_layout(tmp_path, name):
    """``save_embedding`` of an output embedding (``sdcore ti convert``...) writes OneTrainer's keys, the ``_out``
    vectors included, and reads back the same input and output vectors."""
    from sdplugin_ti.formats import save_embedding

    source = tmp_path / f"{name}.safetensors"
    tensors = {"emp_params": torch.zeros(2, 8), "emp_params_out": torch.full((2, 8), 2.0)} if name == "sd1" else {
        "clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16), "clip_l_out": torch.full((1, 8), 3.0),
        "clip_g_out": torch.full((1, 16), 4.0)}  # fmt: skip
    save_file(tensors, str(source))
    emb = load_embedding(source)
    copy = save_embedding(emb, tmp_path / "out" / f"{name}.safetensors")
    from safetensors.torch import load_file

    assert sorted(load_file(str(copy))) == sorted(tensors)
    again = load_embedding(copy)
    assert again.output_vectors.keys() == emb.output_vectors.keys() and again.is_output
    for key in emb.output_vectors:
        assert torch.equal(again.output_vectors[key], emb.output_vectors[key])
        assert torch.equal(again.vectors[key], emb.vectors[key])


@pytest.mark.parametrize("fmt", ["pt", "bin", "png"])
def test_formats_without_output_vectors_say_they_leave_them_out(tmp_path, fmt, caplog):
    """A1111's ``.pt``/``.png`` and diffusers' ``.bin`` hold input vectors only: saving an output embedding in them
    warns once, naming the file and the left-out keys; the file reads back without output vectors. The
    ``.safetensors`` save keeps them and says nothing."""
    from sdplugin_ti.formats import save_embedding

    source = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16), "clip_l_out": torch.full((1, 8), 3.0),
               "clip_g_out": torch.full((1, 16), 4.0)}, str(source))  # fmt: skip
    emb = load_embedding(source)
    out = tmp_path / f"copy.{fmt}"
    with caplog.at_level(logging.WARNING, logger="sdplugin_ti"):
        save_embedding(emb, out)
    said = [r.getMessage() for r in caplog.records if "output vectors" in r.getMessage()]
    assert said == [
        f"{out}: the output vectors of OneTrainer's output embedding 'sdxl' (clip_l_out, clip_g_out) are left out: "
        f"the {fmt} format (A1111's .pt/.png, diffusers' .bin) cannot hold them; write a .safetensors to keep them"
    ]
    again = load_embedding(out)
    assert not again.output_vectors and torch.equal(again.vectors["clip_g"], torch.zeros(1, 16))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdplugin_ti"):
        kept = load_embedding(save_embedding(emb, tmp_path / "copy.safetensors"))
    assert caplog.records == []
    assert kept.output_keys == ["clip_l_out", "clip_g_out"]


def test_bundled_output_vectors_are_read_and_sd1s_clip_l_is_the_single_tensor(make_bundle, tmp_path, caplog):
    """OneTrainer's SD1 LoRA saver writes ``bundle_emb.<name>.clip_l`` and ``.clip_l_out``."""
    bundle = make_bundle("sd1")
    out = _outputs(bundle)[SINGLE]
    state = {"bundle_emb.mychar.clip_l": torch.zeros_like(out), "bundle_emb.mychar.clip_l_out": out}
    handler = EmbeddingHandler(tmp_path)
    handler.extra_embeddings = tuple(bundled_embeddings(state, network="my_lora"))
    with caplog.at_level(logging.WARNING, logger="sdplugin_ti"):
        picked = handler.bundled(bundle, {})
    assert caplog.records == []  # applied: no "not applied" warning
    emb = picked["mychar"][0]
    assert set(emb.vectors) == {SINGLE} and torch.equal(emb.output_vectors[SINGLE], out)


# --- generation: UNet families (sdcore.generate.conditioning) --------------------------------------------------------
def _unet_encode(bundle, folder: Path, prompt: str, negative: str, extra=()):
    from sdcore.generate.conditioning import encode_cond_uncond

    handler = EmbeddingHandler(folder)
    handler.extra_embeddings = tuple(extra)
    act = handler.activate(bundle, [], prompt, negative)
    cond, uncond = encode_cond_uncond(bundle, [act.prompt], [act.negative_prompt])
    ids = _chunk_ids(bundle, act.prompt)
    placeholders = [_placeholder_ids(tok) for tok in bundle.tokenizers]  # while the tokens are there
    act.undo()
    return cond.embeds, uncond.embeds, (ids, placeholders), act.prompt


def _chunk_ids(bundle, prompt: str) -> list[torch.Tensor]:
    """Each tokenizer's ids of ``prompt`` as the conditioning lays them out ([1, 77 * chunks])."""
    from sdcore.generate.conditioning import tokenize_weighted
    from sdcore.generate.prompt_syntax import parse_emphasis

    return [
        torch.tensor(tokenize_weighted(tok, parse_emphasis(prompt)).ids).reshape(1, -1) for tok in bundle.tokenizers
    ]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_output_embedding_replaces_the_conditioning_at_its_positions(make_bundle, tmp_path, family):
    bundle = make_bundle(family)
    outputs = _outputs(bundle)
    _write(tmp_path / "with", outputs, with_out=True)
    _write(tmp_path / "without", outputs, with_out=False)
    untouched = [e.get_input_embeddings() for e in bundle.text_encoders]

    cond, uncond, ids, expanded = _unet_encode(bundle, tmp_path / "with", PROMPT, NEGATIVE)
    reference, ref_uncond, ref_ids, ref_expanded = _unet_encode(bundle, tmp_path / "without", PROMPT, NEGATIVE)
    assert expanded == ref_expanded and cond.shape[1] == 2 * 77  # two chunks, the word in each

    expected = reference.clone()
    offset, replaced = 0, 0
    assert all(torch.equal(a, b) for a, b in zip(ids[0], ref_ids[0], strict=True)) and ids[1] == ref_ids[1]
    for key, encoder_ids, placeholder in zip(encoder_keys(bundle), *ref_ids, strict=True):
        width = outputs[key].shape[1]
        part = expected[..., offset : offset + width]  # SDXL: CLIP-L's columns, then CLIP-G's
        replaced += _replaced(part, encoder_ids, placeholder, outputs[key])
        expected[..., offset : offset + width] = part
        offset += width
    assert replaced == 4 * len(outputs)  # 2 vectors x 2 occurrences, per encoder
    assert torch.equal(cond, expected)
    assert not torch.equal(cond, reference)
    assert torch.equal(uncond, ref_uncond)  # the negative prompt does not name it: as without it
    # undone: no output rows left on the encoders, the input embeddings restored
    assert all(not hasattr(e, "sdcore_output_rows") for e in bundle.text_encoders)
    assert [e.get_input_embeddings() for e in bundle.text_encoders] == untouched


def test_bundled_output_embedding_applies_in_generation(make_bundle, tmp_path):
    bundle = make_bundle("sd1")
    out = _outputs(bundle)[SINGLE]
    with_out = {"bundle_emb.mychar.clip_l": torch.zeros_like(out), "bundle_emb.mychar.clip_l_out": out}
    without = {"bundle_emb.mychar.clip_l": torch.zeros_like(out)}
    empty = tmp_path / "empty"
    empty.mkdir()
    cond, _, (ids, placeholders), _ = _unet_encode(bundle, empty, PROMPT, "", bundled_embeddings(with_out, network="x"))
    reference, _, _, _ = _unet_encode(bundle, empty, PROMPT, "", bundled_embeddings(without, network="x"))
    expected = reference.clone()
    assert _replaced(expected, ids[0], placeholders[0], out) == 4
    assert torch.equal(cond, expected)


def test_ti_init_weights_reads_an_output_embedding_and_says_what_it_leaves(make_bundle, tmp_path):
    """Before, two tensors (``emp_params`` + ``emp_params_out``) were an unknown layout, refused."""
    from sdcore.testing.contract import contract_options
    from sdcore.train.preflight import run_preflight
    from sdplugin_ti.method import TIMethod

    bundle = make_bundle("sd1")
    path = _write(tmp_path / "start", _outputs(bundle), with_out=True)
    values = {"name": "tiny", "vectors": 2, "template": "subject_filewords", "init_weights": str(path)}
    options = contract_options(TIMethod, tmp_path, values)
    report = run_preflight(TIMethod(options), options, plan=False)
    assert report.problems == []
    expected = (
        f"--init-weights {path} is a OneTrainer output embedding: training starts from its input vectors (zeros in "
        "OneTrainer's files), as A1111 and ComfyUI read the file; its output vectors (emp_params_out) are not "
        "trained here (sdcore trains input vectors; continue an output embedding in OneTrainer)"
    )
    assert expected in report.notes
    params = TIMethod(options).prepare(bundle)[0]["params"]
    assert torch.equal(params[0].detach().cpu(), torch.zeros(2, _widths(bundle)[SINGLE]))


# --- generation: SD3, FLUX.1, Chroma (the family adapters' encodings) ------------------------------------------------
def _tiny(family: str):
    from sdcore.models.load import load_model

    return load_model(f"tiny:{family}")


def _adapter_encode(bundle, emb_path: Path, prompt: str, length: int):
    """The family's encoding of ``prompt`` with the embedding active; with each tokenizer's ids of the expanded
    prompt (CLIP's 77, T5's ``length``) and placeholder ids, read while the tokens are there."""
    from sdcore.models.family import family_adapter

    handle = apply_embeddings(bundle, [load_embedding(emb_path)])
    expanded = handle.expand(prompt)
    with torch.no_grad():
        cond = family_adapter(bundle.family).encode_prompts(bundle, [expanded], t5_max_length=length)
    lengths = [77] * (len(bundle.tokenizers) - 1) + [length]  # T5 last (Chroma: T5 alone)
    ids = [_ids(tok, expanded, n) for tok, n in zip(bundle.tokenizers, lengths, strict=True)]
    placeholders = [_placeholder_ids(tok) for tok in bundle.tokenizers]
    handle.remove()
    return cond.hidden_states, cond.pooled, ids, placeholders


def _ids(tokenizer, prompt: str, length: int) -> torch.Tensor:
    return tokenizer([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
def test_output_embedding_on_the_transformer_families(tmp_path, family, caplog):
    bundle = _tiny(family)
    outputs = _outputs(bundle)  # Flux: clip_l_out too, which it cannot apply
    prompt, length = "a photo of mychar, standing", 32
    with_path = _write(tmp_path / "with", outputs, with_out=True)
    hidden, pooled, ids, placeholders = _adapter_encode(bundle, with_path, prompt, length)
    if family == "flux":  # CLIP-L gives Flux its pooled vector only: its output vectors cannot apply, said
        with caplog.at_level(logging.WARNING, logger="sdplugin_ti"):
            EmbeddingHandler(tmp_path / "with").activate(bundle, [], prompt, "").undo()
        assert any(
            re.search(r"\(.*mychar\.safetensors\): output embedding: not applied, clip_l_out: ", r.getMessage())
            for r in caplog.records
        )
    ref, ref_pooled, *_ = _adapter_encode(bundle, _write(tmp_path / "without", outputs, with_out=False), prompt, length)

    expected = ref.clone()
    replaced = 0
    if family == "sd3":  # the 77 CLIP positions (CLIP-L's columns, then CLIP-G's), then T5's
        offset = 0
        for index, key in enumerate(("clip_l", "clip_g")):
            width = outputs[key].shape[1]
            part = expected[:, :77, offset : offset + width]
            replaced += _replaced(part, ids[index], placeholders[index], outputs[key])
            expected[:, :77, offset : offset + width] = part
            offset += width
        t5_part = expected[:, 77:]
    else:
        t5_part = expected
    replaced += _replaced(t5_part, ids[-1], placeholders[-1], outputs["t5"])
    assert replaced == 2 * (3 if family == "sd3" else 1)
    assert torch.equal(hidden, expected)
    assert not torch.equal(hidden, ref)
    assert (pooled is None and ref_pooled is None) or torch.equal(pooled, ref_pooled)  # pooled: as without it
