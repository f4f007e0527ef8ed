"""sdcore's one embedding-file layout (sdcore.models.embedding_files), checked against the documented readers:
kohya's ``emb_params`` for SD1/SD2 (A1111's ``create_embedding_from_data`` takes a one-key dict's tensor; ComfyUI's
``load_embed`` its encoder key, else the first value), ``clip_l``/``clip_g`` for SDXL (A1111's SDXL branch),
``t5`` plus ComfyUI's ``t5xxl`` for SD3/FLUX.1 and Chroma (``t5`` alone: OneTrainer's ``ChromaEmbeddingSaver``); and OneTrainer's names for separate files
(``<LoRA file>_embeddings/<safe_filename(placeholder, allow_spaces=False)>.safetensors``)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from sdcore.errors import ModelFormatError
from sdcore.models.bundled_embeddings import BundledEmbedding, bundled_embeddings
from sdcore.models.embedding_files import (
    bundled_file_outputs,
    bundled_file_vectors,
    embedding_file_name,
    embeddings_folder,
    encoder_part_keys,
    file_tensors,
    read_embedding_file,
    save_embedding_file,
)


def _t(n: int, width: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _header(path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        keys = {k: (tuple(handle.get_tensor(k).shape), handle.get_tensor(k).dtype) for k in handle.keys()}  # noqa: SIM118
        return keys, dict(handle.metadata() or {})


def _comfy_load_embed(data: dict[str, torch.Tensor], embed_key: str) -> torch.Tensor:
    """ComfyUI ``sd1_clip.load_embed`` for a safetensors dict (rewritten from its documented branches)."""
    if embed_key in data:
        return data[embed_key]
    return next(iter(data.values()))


def _a1111_vectors(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | torch.Tensor:
    """A1111 ``create_embedding_from_data`` for a safetensors dict: the SDXL branch needs clip_g and clip_l, else a
    dict with exactly one tensor is its vectors (the "diffuser concept" branch)."""
    if "clip_g" in data and "clip_l" in data:
        return data
    assert len(data) == 1, "embedding file has multiple terms in it"
    return next(iter(data.values()))


def test_sd1_file_is_one_emb_params_tensor_in_float32(tmp_path):
    vectors = _t(3, 768, 1, torch.float16)
    path = save_embedding_file(tmp_path / "mychar.safetensors", {"*": vectors}, {"name": "mychar"})
    keys, meta = _header(path)
    assert keys == {"emb_params": ((3, 768), torch.float32)}
    assert meta == {"name": "mychar"}
    from safetensors.torch import load_file

    data = load_file(str(path))
    assert torch.equal(_a1111_vectors(data), vectors.float())  # exact: fp16 -> fp32 loses nothing
    assert torch.equal(_comfy_load_embed(data, "clip_l"), vectors.float())
    assert torch.equal(read_embedding_file(path)["*"], vectors.float())


def test_sdxl_sd3_flux_files_have_one_key_per_encoder(tmp_path):
    from safetensors.torch import load_file

    xl = {"clip_l": _t(2, 768, 1), "clip_g": _t(2, 1280, 2)}
    path = save_embedding_file(tmp_path / "xl.safetensors", xl)
    assert _header(path)[0] == {"clip_l": ((2, 768), torch.float32), "clip_g": ((2, 1280), torch.float32)}
    data = load_file(str(path))
    a1111 = _a1111_vectors(data)
    assert isinstance(a1111, dict) and all(torch.equal(a1111[k], xl[k]) for k in xl)
    assert torch.equal(_comfy_load_embed(data, "clip_g"), xl["clip_g"])
    flux = {"clip_l": _t(2, 768, 3), "t5": _t(2, 4096, 4, torch.bfloat16)}
    path = save_embedding_file(tmp_path / "flux.safetensors", flux)
    keys, _ = _header(path)
    assert keys == {k: (s, torch.float32) for k, s in (("clip_l", (2, 768)), ("t5", (2, 4096)), ("t5xxl", (2, 4096)))}
    data = load_file(str(path))
    assert torch.equal(_comfy_load_embed(data, "t5xxl"), flux["t5"].float())  # ComfyUI's T5 key
    back = read_embedding_file(path)
    assert sorted(back) == ["clip_l", "t5"] and torch.equal(back["t5"], flux["t5"].float())


def test_chroma_file_is_t5_alone_under_both_names(tmp_path):
    """Chroma's one encoder is T5-XXL: OneTrainer writes ``t5``, ComfyUI's Chroma tokenizer (its T5-XXL one) looks up
    ``t5xxl``; a file holding either (or both) reads back as ``t5`` alone."""
    from safetensors.torch import load_file, save_file

    vectors = _t(3, 4096, 5)
    path = save_embedding_file(tmp_path / "c.safetensors", {"t5": vectors})
    assert _header(path)[0] == {"t5": ((3, 4096), torch.float32), "t5xxl": ((3, 4096), torch.float32)}
    assert torch.equal(_comfy_load_embed(load_file(str(path)), "t5xxl"), vectors)
    assert list(read_embedding_file(path)) == ["t5"] and torch.equal(read_embedding_file(path)["t5"], vectors)
    save_file({"t5xxl": _t(3, 4096, 6)}, str(tmp_path / "comfy.safetensors"))  # a file with ComfyUI's key only
    assert list(read_embedding_file(tmp_path / "comfy.safetensors")) == ["t5"]


def test_encoder_part_keys_is_the_one_reading_of_the_layout():
    assert encoder_part_keys(["t5", "clip_g", "t5xxl", "clip_l"]) == {
        "clip_l": "clip_l",
        "clip_g": "clip_g",
        "t5": "t5",
    }
    assert list(encoder_part_keys(["clip_g", "clip_l"])) == ["clip_l", "clip_g"]  # text-encoder order, not the file's
    assert encoder_part_keys(["t5xxl", "clip_l"]) == {"clip_l": "clip_l", "t5": "t5xxl"}
    assert encoder_part_keys(["t5xxl"]) == {"t5": "t5xxl"}
    assert encoder_part_keys(["emb_params"]) == {} and encoder_part_keys(["string_to_param", "name"]) == {}
    assert encoder_part_keys(["llama", "clip_l_out"]) == {}


def test_bad_parts_are_refused():
    with pytest.raises(ModelFormatError, match="want '\\*' or clip_l, clip_g, t5"):
        save_embedding_file("unused.safetensors", {"llama": _t(1, 8, 1)})
    with pytest.raises(ModelFormatError, match="either one tensor or one per encoder"):
        save_embedding_file("unused.safetensors", {"*": _t(1, 8, 1), "clip_l": _t(1, 8, 1)})


def test_bundled_parts_map_to_file_parts():
    state = {
        "bundle_emb.old.string_to_param.*": _t(2, 768, 1),  # A1111 layout, older OneTrainer
        "bundle_emb.new.clip_l": _t(2, 768, 2),  # newer OneTrainer's SD1
        "bundle_emb.xl.clip_l": _t(1, 768, 3),
        "bundle_emb.xl.clip_g": _t(1, 1280, 4),
        "bundle_emb.xl.clip_g_out": _t(1, 1280, 5),  # an output embedding's: bundled_file_outputs, OneTrainer's keys
        "bundle_emb.f.clip_l": _t(1, 768, 6),
        "bundle_emb.f.t5": _t(1, 4096, 7),
    }
    found = {e.name: bundled_file_vectors(e) for e in bundled_embeddings(state)}
    assert sorted(found["old"]) == ["*"] and torch.equal(found["old"]["*"], state["bundle_emb.old.string_to_param.*"])
    assert sorted(found["new"]) == ["*"] and torch.equal(found["new"]["*"], state["bundle_emb.new.clip_l"])
    assert sorted(found["xl"]) == ["clip_g", "clip_l"]
    outputs = {e.name: bundled_file_outputs(e) for e in bundled_embeddings(state)}
    assert list(outputs["xl"]) == ["clip_g"] and torch.equal(outputs["xl"]["clip_g"], state["bundle_emb.xl.clip_g_out"])
    assert not outputs["old"] and not outputs["f"]
    (sd1,) = bundled_embeddings({"bundle_emb.s.clip_l": _t(1, 8, 1), "bundle_emb.s.clip_l_out": _t(1, 8, 2)})
    assert list(bundled_file_outputs(sd1)) == ["*"] == list(bundled_file_vectors(sd1))  # OneTrainer's SD1 bundle
    assert sorted(file_tensors(bundled_file_vectors(sd1), bundled_file_outputs(sd1))) == [
        "emp_params",
        "emp_params_out",
    ]
    (alone,) = bundled_embeddings({"bundle_emb.a.clip_l_out": _t(1, 8, 3), "bundle_emb.a.clip_g_out": _t(1, 16, 4)})
    tensors = file_tensors(bundled_file_vectors(alone), bundled_file_outputs(alone))  # zero inputs, as OneTrainer's
    assert sorted(tensors) == ["clip_g", "clip_g_out", "clip_l", "clip_l_out"]
    assert not tensors["clip_g"].any() and torch.equal(tensors["clip_g_out"], _t(1, 16, 4))
    (bad,) = bundled_embeddings({"bundle_emb.b.clip_l": _t(1, 8, 1), "bundle_emb.b.clip_g": _t(1, 8, 1),
                                 "bundle_emb.b.llama_out": _t(1, 8, 1)})  # fmt: skip
    with pytest.raises(ModelFormatError, match="'b' has a 'llama_out' part"):
        bundled_file_outputs(bad)
    assert sorted(found["f"]) == ["clip_l", "t5"]
    # ComfyUI's t5xxl beside OneTrainer's t5: t5 is read, as encoder_part_keys reads a file; alone it is the T5 part
    (both,) = bundled_embeddings({"bundle_emb.c.t5": _t(1, 8, 1), "bundle_emb.c.t5xxl": _t(1, 8, 2)})
    (comfy,) = bundled_embeddings({"bundle_emb.c.clip_l": _t(1, 8, 3), "bundle_emb.c.t5xxl": _t(1, 8, 2)})
    assert list(bundled_file_vectors(both)) == ["t5"] and torch.equal(bundled_file_vectors(both)["t5"], _t(1, 8, 1))
    assert sorted(bundled_file_vectors(comfy)) == ["clip_l", "t5"]
    assert torch.equal(bundled_file_vectors(comfy)["t5"], _t(1, 8, 2))
    (llama,) = bundled_embeddings({"bundle_emb.h.llama": _t(1, 8, 1), "bundle_emb.h.clip_l": _t(1, 8, 2)})
    with pytest.raises(ModelFormatError, match="'h' has a 'llama' part"):
        bundled_file_vectors(llama)
    with pytest.raises(ModelFormatError, match="'e' has no vectors"):
        bundled_file_vectors(BundledEmbedding(name="e"))


def test_onetrainer_file_names_and_folder(tmp_path):
    assert embedding_file_name("mychar") == "mychar.safetensors"
    assert embedding_file_name("<sks>") == "sks.safetensors"  # OneTrainer's safe_filename keeps no brackets
    assert embedding_file_name("my char#2") == "my_char#2.safetensors"
    assert embedding_file_name("héllo-wörld") == "héllo-wörld.safetensors"  # str.isalnum: letters of any script
    for bad in ("<>", "..", "/"):
        with pytest.raises(ModelFormatError, match="no letter or digit"):
            embedding_file_name(bad)
    assert embeddings_folder(tmp_path / "out" / "x.safetensors") == tmp_path / "out" / "x.safetensors_embeddings"


@pytest.mark.parametrize("name", ["CON", "nul", "Aux.v2", "com1", "LPT9", "COM¹", "<prn>"])
def test_windows_device_names_are_refused(name):
    """Windows reserves these stems whatever the extension (``nul.safetensors`` is the NUL device there): a file
    sdcore writes under such a name could never be copied to or loaded on Windows."""
    with pytest.raises(ModelFormatError, match="a device name Windows reserves"):
        embedding_file_name(name)


@pytest.mark.parametrize(("name", "file"), [("console", "console.safetensors"), ("com10", "com10.safetensors"),
                                            ("nulla", "nulla.safetensors"), ("my con", "my_con.safetensors")])  # fmt: skip
def test_names_only_resembling_devices_are_kept(name, file):
    assert embedding_file_name(name) == file
