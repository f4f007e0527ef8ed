"""File formats: A1111 .pt, safetensors (emb_params / clip_l+clip_g), diffusers .bin, PNG."""

from __future__ import annotations

import pickle
import zlib

import pytest
import torch
from sdcore.errors import ModelFormatError, UnsafeFileError
from sdplugin_ti.embedding import CLIP_G, CLIP_L, SINGLE, Embedding
from sdplugin_ti.formats import a1111_dict, load_embedding, save_embedding
from sdplugin_ti.png import TEXT_KEY, data_from_b64, embed_in_pixels, extract_from_pixels, read_image_embedding


def _emb(name: str = "mystyle", n: int = 3, width: int = 32) -> Embedding:
    g = torch.Generator().manual_seed(1)
    return Embedding(
        name=name,
        vectors={SINGLE: torch.randn(n, width, generator=g)},
        step=120,
        sd_checkpoint="abcdef0123",
        sd_checkpoint_name="tiny",
    )


def test_a1111_file_built_from_documented_keys_loads(tmp_path):
    vec = torch.randn(2, 768)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": "inner-name",
        "step": 4500,
        "sd_checkpoint": "7460a6fa",
        "sd_checkpoint_name": "sd-v1-5",
    }
    path = tmp_path / "file-stem.pt"
    torch.save(data, path)
    emb = load_embedding(path)
    assert emb.name == "file-stem"  # prompt word is the stem, as in A1111
    assert emb.stored_name == "inner-name"
    assert emb.step == 4500 and emb.sd_checkpoint == "7460a6fa" and emb.sd_checkpoint_name == "sd-v1-5"
    assert torch.equal(emb.vectors[SINGLE], vec)
    assert emb.num_vectors == 2 and emb.widths == {SINGLE: 768}


def test_pt_roundtrip_has_a1111_keys(tmp_path):
    emb = _emb()
    path = save_embedding(emb, tmp_path / "mystyle.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["string_to_token"] == {"*": 265}
    assert set(raw["string_to_param"]) == {"*"}
    assert raw["name"] == "mystyle" and raw["step"] == 120 and raw["sd_checkpoint"] == "abcdef0123"
    back = load_embedding(path)
    assert torch.equal(back.vectors[SINGLE], emb.vectors[SINGLE])
    assert back.step == 120 and back.sd_checkpoint_name == "tiny"


def test_safetensors_and_bin_layouts(tmp_path):
    from safetensors import safe_open

    emb = _emb()
    st = save_embedding(emb, tmp_path / "mystyle.safetensors")
    with safe_open(str(st), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert f.metadata()["step"] == "120"
    back = load_embedding(st)
    assert torch.equal(back.vectors[SINGLE], emb.vectors[SINGLE]) and back.step == 120
    b = save_embedding(emb, tmp_path / "mystyle.bin")
    raw = torch.load(b, weights_only=True)
    assert list(raw) == ["mystyle"]
    assert torch.equal(load_embedding(b).vectors[SINGLE], emb.vectors[SINGLE])


def test_diffusers_single_vector_file_is_unsqueezed(tmp_path):
    path = tmp_path / "tok.bin"
    torch.save({"<cat-toy>": torch.ones(768)}, path)
    emb = load_embedding(path)
    assert emb.vectors[SINGLE].shape == (1, 768) and emb.stored_name == "<cat-toy>"


def test_sdxl_files(tmp_path):
    emb = Embedding("xl", {CLIP_L: torch.randn(2, 768), CLIP_G: torch.randn(2, 1280)})
    for suffix in ("safetensors", "pt", "bin"):
        path = save_embedding(emb, tmp_path / f"xl.{suffix}")
        back = load_embedding(path)
        assert back.is_sdxl and back.widths == {CLIP_L: 768, CLIP_G: 1280}
        assert torch.equal(back.vectors[CLIP_G], emb.vectors[CLIP_G])
    # SDXL .pt holds only tensors (A1111 converts every value of such a dict to a tensor)
    raw = torch.load(tmp_path / "xl.pt", weights_only=True)
    assert set(raw) == {CLIP_L, CLIP_G}


def test_multiple_terms_and_unknown_layouts_are_errors(tmp_path):
    bad = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 4), "x": torch.ones(1, 4)}}, bad)
    with pytest.raises(ModelFormatError, match="2 terms"):
        load_embedding(bad)
    odd = tmp_path / "odd.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1, 4), "b": torch.ones(1, 4)}, str(odd))
    with pytest.raises(ModelFormatError, match="unknown embedding layout"):
        load_embedding(odd)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty"):
        load_embedding(empty)


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Evil.marker),))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _Evil()}}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeFileError, match=r"evil\.pt"):
        load_embedding(path)
    assert not marker.exists()
    # a legacy (non-zip) pickle stream too
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"tok": _Evil()}))
    with pytest.raises(UnsafeFileError):
        load_embedding(legacy)
    assert not marker.exists()


def test_png_text_chunk_roundtrip(tmp_path):
    from PIL import Image

    emb = _emb(n=2)
    preview = Image.new("RGB", (40, 30), (200, 10, 10))
    path = save_embedding(emb, tmp_path / "mystyle.png", preview=preview)
    with Image.open(path) as image:
        assert image.size == (40, 30)
        data = data_from_b64(image.text[TEXT_KEY])
    assert data["name"] == "mystyle" and data["string_to_token"] == {"*": 265}
    back = load_embedding(path)
    assert back.name == "mystyle" and back.step == 120
    assert torch.allclose(back.vectors[SINGLE], emb.vectors[SINGLE])
    # without a preview a picture is generated
    path2 = save_embedding(emb, tmp_path / "gen.png")
    assert load_embedding(path2).name == "mystyle"  # image embeddings use the stored name


def _reference_pixel_encoding(image, data):
    """The documented A1111 pixel layout, built independently of the library (research 1.3)."""
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    def to_json(v):
        if isinstance(v, torch.Tensor):
            return {"TORCHTENSOR": v.tolist()}
        if isinstance(v, dict):
            return {k: to_json(x) for k, x in v.items()}
        return v

    raw = np.frombuffer(zlib.compress(json.dumps(to_json(data)).encode(), level=9), np.uint8)
    h = image.size[1]
    size = raw.shape[0] + (h - raw.shape[0] % h)
    size = size + (h * 3 - size % (h * 3))
    lo = np.resize(raw & 0x0F, size).reshape(h, -1, 3)
    hi = np.resize(raw >> 4, size).reshape(h, -1, 3)
    first = np.abs(data["string_to_param"]["*"][0].numpy()[:1024])
    seq = (first / first.max() * 255).astype(np.uint8)

    def dots(block, seq):
        canvas = Image.new("RGB", (block.shape[1], block.shape[0]))
        draw = ImageDraw.Draw(canvas)
        k = 0
        for x in range(-6, canvas.size[0], 8):
            for r, y in enumerate(range(-6, canvas.size[1], 8)):
                off = 4 if r % 2 == 0 else 0
                s = int(seq[k % len(seq)])
                k += 1
                draw.ellipse((x + off, y, x + 6 + off, y + 6), fill=(s, s, s))
        return block ^ (np.array(canvas).astype(np.uint8) & 0xF0)

    def lcg_xor(block):
        state, out = 0, []
        for _ in range(block.size):
            state = (1664525 * state + 1013904223) % 2**32
            out.append(state % 255)
        return block.astype(np.uint8) ^ (np.array(out, dtype=np.uint8).reshape(block.shape) & 0x0F)

    lo = lcg_xor(dots(lo, seq))
    hi = lcg_xor(dots(hi, seq[::-1]))
    w = lo.shape[1] + 1 + image.size[0] + 1 + hi.shape[1]
    canvas = Image.new("RGB", (w, h))
    canvas.paste(Image.fromarray(lo, "RGB"), (0, 0))
    canvas.paste(image, (lo.shape[1] + 1, 0))
    canvas.paste(Image.fromarray(hi, "RGB"), (lo.shape[1] + 1 + image.size[0] + 1, 0))
    return canvas


def test_pixel_strip_png_decodes(tmp_path):
    from PIL import Image

    emb = _emb(name="strip", n=2, width=16)
    data = a1111_dict(emb)
    picture = Image.new("RGB", (24, 32), (90, 120, 200))
    encoded = _reference_pixel_encoding(picture, data)
    path = tmp_path / "no-chunk.png"
    encoded.save(path)  # no text chunk: only the pixels carry the data
    decoded = read_image_embedding(path)
    assert decoded["name"] == "strip" and decoded["step"] == 120
    assert torch.allclose(decoded["string_to_param"]["*"], emb.vectors[SINGLE], atol=1e-6)
    back = load_embedding(path)
    assert back.name == "strip" and back.num_vectors == 2
    # our own encoder produces the same pixels as the documented layout
    ours = embed_in_pixels(picture, data)
    assert ours.tobytes() == encoded.tobytes() and ours.size == encoded.size
    assert extract_from_pixels(picture) is None


def test_plain_image_without_embedding_is_an_error(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (16, 16), (255, 255, 255)).save(path)
    with pytest.raises(ModelFormatError, match="no embedding"):
        load_embedding(path)


def test_embeddings_bundled_in_a_lora_state_dict():
    from sdplugin_ti.formats import embeddings_in_lora

    state = {
        "lora_unet_x.lora_down.weight": torch.zeros(4, 4),
        "bundle_emb.char.string_to_param.*": torch.ones(2, 768),
        "bundle_emb.xl.clip_l": torch.ones(1, 768),
        "bundle_emb.xl.clip_g": torch.ones(1, 1280),
    }
    found = {e.name: e for e in embeddings_in_lora(state)}
    assert found["char"].widths == {SINGLE: 768} and found["char"].num_vectors == 2
    assert found["xl"].is_sdxl and found["xl"].widths == {CLIP_L: 768, CLIP_G: 1280}
    flux = embeddings_in_lora({"bundle_emb.f.clip_l": torch.ones(1, 768), "bundle_emb.f.t5": torch.ones(1, 4096)})
    assert flux[0].widths == {CLIP_L: 768, "t5": 4096}  # SD3/Flux embeddings carry a T5 part
    with pytest.raises(ModelFormatError, match="unknown bundled"):
        embeddings_in_lora({"bundle_emb.a.llama": torch.ones(1, 4)})
    # ComfyUI's t5xxl is the T5 part; beside OneTrainer's t5 it is a copy and t5 is read, as from a file
    (both,) = embeddings_in_lora({"bundle_emb.c.t5": torch.ones(1, 8), "bundle_emb.c.t5xxl": torch.zeros(1, 8)})
    (comfy,) = embeddings_in_lora({"bundle_emb.c.t5xxl": torch.zeros(1, 8)})
    assert list(both.vectors) == ["t5"] and torch.equal(both.vectors["t5"], torch.ones(1, 8))
    assert list(comfy.vectors) == ["t5"] and torch.equal(comfy.vectors["t5"], torch.zeros(1, 8))
