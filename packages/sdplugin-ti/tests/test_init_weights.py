"""``--init-weights`` (kohya's ``--weights``): training starts from the vectors of an embedding file."""

from __future__ import annotations

import pytest
import torch
from sdcore.errors import ConfigError, NetworkMismatchError
from sdcore.testing.contract import contract_options
from sdcore.train.config import load_options
from sdcore.train.preflight import run_preflight
from sdplugin_ti.embedding import Embedding
from sdplugin_ti.formats import load_embedding, save_embedding
from sdplugin_ti.method import TIMethod, TIOptions

TI = {"name": "tiny", "vectors": 2, "template": "subject_filewords", "init_text": "red cat"}


def _file(tmp_path, fmt: str, vectors: dict[str, torch.Tensor]) -> str:
    path = tmp_path / f"start.{fmt}"
    save_embedding(Embedding(name="start", vectors=vectors, step=7), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "bin"])
def test_sd1_starts_from_the_file(tmp_path, make_bundle, fmt):
    start = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    options = contract_options(TIMethod, tmp_path, {**TI, "init_weights": _file(tmp_path, fmt, {"*": start})})
    method = TIMethod(options)
    params = method.prepare(make_bundle("sd1"))[0]["params"]
    assert len(params) == 1
    assert torch.equal(params[0].detach().cpu(), start)  # exactly the file's vectors, not "red cat"


def test_sdxl_starts_from_clip_l_and_clip_g(tmp_path, make_bundle):
    bundle = make_bundle("sdxl")
    widths = [int(e.get_input_embeddings().weight.shape[1]) for e in bundle.text_encoders]
    gen = torch.Generator().manual_seed(5)
    start = {"clip_l": torch.randn(2, widths[0], generator=gen), "clip_g": torch.randn(2, widths[1], generator=gen)}
    options = contract_options(
        TIMethod, tmp_path, {**TI, "init_weights": _file(tmp_path, "safetensors", start)}, family="sdxl"
    )
    method = TIMethod(options)
    method.prepare(bundle)
    assert method.handle is not None
    tables = method.handle.tables["tiny"]
    assert set(tables) == {"clip_l", "clip_g"}
    assert all(torch.equal(tables[k].detach().cpu(), start[k]) for k in start)


def test_training_run_starts_there(tmp_path, make_bundle):
    """One AdamW step moves each element by at most lr: the saved result lies within lr of the file's
    vectors, and far from the init text's rows it would otherwise start from."""
    from sdcore.train.loop import train

    start = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    values = {**TI, "max_steps": 1, "lr": 1e-3, "init_weights": _file(tmp_path, "pt", {"*": start})}
    bundle = make_bundle("sd1")
    ids = bundle.tokenizers[0]("red cat", add_special_tokens=False).input_ids
    init_rows = bundle.text_encoders[0].get_input_embeddings().weight[ids].detach().float()
    result = train(TIMethod(contract_options(TIMethod, tmp_path, values)), bundle=bundle)
    trained = load_embedding(result.output).vectors["*"]
    assert (trained - start).abs().max() <= 1e-3 * 1.001
    assert (trained - start).abs().max() > 0  # it did train
    assert (trained - init_rows).abs().max() > 0.1


def test_vector_count_mismatch_is_a_preflight_problem(tmp_path):
    weights = _file(tmp_path, "pt", {"*": torch.zeros(3, 32)})
    options = contract_options(TIMethod, tmp_path, {**TI, "init_weights": weights})
    report = run_preflight(TIMethod(options), options, plan=False)
    assert any("the file has 3 vectors, --vectors is 2" in p for p in report.problems), report.problems
    with pytest.raises(ConfigError, match="num_vectors_per_token"):
        TIMethod(options).validate()


def test_wrong_family_file_is_a_preflight_problem(tmp_path):
    """An SD1 file (one tensor) for an SDXL model, which needs clip_l and clip_g: refused before loading."""
    weights = _file(tmp_path, "pt", {"*": torch.zeros(2, 32)})
    options = contract_options(TIMethod, tmp_path, {**TI, "init_weights": weights}, family="sdxl")
    report = run_preflight(TIMethod(options), options, plan=False)
    assert any("this sdxl model needs clip_l, clip_g" in p for p in report.problems), report.problems


def test_missing_file_is_a_problem(tmp_path):
    options = contract_options(TIMethod, tmp_path, {**TI, "init_weights": str(tmp_path / "nope.pt")})
    with pytest.raises(ConfigError, match="no such embedding file"):
        TIMethod(options).validate()


def test_width_mismatch_is_refused_at_prepare(tmp_path, make_bundle):
    weights = _file(tmp_path, "pt", {"*": torch.zeros(2, 768)})
    method = TIMethod(contract_options(TIMethod, tmp_path, {**TI, "init_weights": weights}))
    with pytest.raises(NetworkMismatchError, match="width 768"):
        method.prepare(make_bundle("sd1"))


def test_kohya_weights_name(tmp_path):
    cfg = tmp_path / "ti.toml"
    cfg.write_text(
        'pretrained_model_name_or_path = "tiny:sd1"\ntoken_string = "mychar"\nnum_vectors_per_token = 2\n'
        'weights = "start.pt"\n',
        encoding="utf-8",
    )
    o = load_options(TIOptions, cfg, notes=[])
    assert o.init_weights.endswith("start.pt") and o.vectors == 2


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_long_init_text_gives_its_first_words_where_a1111_cuts_it(make_bundle, family):
    """A1111 tokenizes the init text with ``max_length=vectors`` for SD1 and every CLIP-L (the HF
    tokenizer then truncates: modules/sd_hijack_clip.py ``encode_embedding_init_text``), but not on its
    OpenCLIP path (SD2, SDXL's CLIP-G); then ``vec[i] = rows[i * L // n]`` (textual_inversion.py
    ``create_embedding``). "a photo of a red cat" with 2 vectors: "a", "photo" where cut, else tokens 0 and 3."""
    from sdplugin_ti.apply import encoder_keys, init_vectors

    bundle = make_bundle(family)
    vectors = init_vectors(bundle, "a photo of a red cat", 2)
    for encoder, tokenizer, key in zip(bundle.text_encoders, bundle.tokenizers, encoder_keys(bundle), strict=True):
        ids = tokenizer("a photo of a red cat", add_special_tokens=False).input_ids
        assert len(ids) == 6
        cut = key == "clip_l" or family == "sd1"
        picked = ids[:2] if cut else [ids[0], ids[3]]
        rows = encoder.get_input_embeddings().weight[picked].detach().float()
        assert torch.equal(vectors[key], rows), (family, key)


def test_chroma_needs_t5_and_starts_from_comfy_t5xxl(tmp_path, make_bundle):
    """Chroma's one encoder is T5-XXL, whose vectors always train: a file without them (a FLUX.1 ``clip_l`` one) is
    a pre-flight problem, ``--train-t5`` or not; a ComfyUI file holding ``t5xxl`` alone is read as ``t5`` and the
    training starts exactly from it."""
    from safetensors.torch import save_file

    flux_file = _file(tmp_path, "safetensors", {"clip_l": torch.zeros(2, 32)})
    for extra in ({}, {"train_t5": True}):
        options = contract_options(TIMethod, tmp_path, {**TI, "init_weights": flux_file, **extra}, family="chroma")
        report = run_preflight(TIMethod(options), options, plan=False)
        assert report.problems == [
            f"--init-weights {flux_file}: this chroma model needs t5; the file has clip_l: 2 vectors of width 32 "
            "(FLUX.1)"
        ]
    bundle = make_bundle("chroma")
    width = int(bundle.text_encoders[0].get_input_embeddings().weight.shape[1])
    start = torch.randn(2, width, generator=torch.Generator().manual_seed(11))
    comfy = tmp_path / "comfy.safetensors"
    save_file({"t5xxl": start}, str(comfy))
    options = contract_options(TIMethod, tmp_path, {**TI, "init_weights": str(comfy)}, family="chroma")
    assert run_preflight(TIMethod(options), options, plan=False).problems == []
    method = TIMethod(options)
    method.validate()
    method.prepare(bundle)
    assert method.handle is not None
    tables = method.handle.tables["tiny"]
    assert list(tables) == ["t5"] and torch.equal(tables["t5"].detach().cpu(), start)
