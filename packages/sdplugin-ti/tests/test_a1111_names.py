"""Names and metadata as A1111 stores and reads them (issue 18).

The reader below reimplements A1111's documented rules (research/ti_hn_apt_aesthetic.md 1.1, 1.3,
1.4; the A1111 wiki: "put the embedding into the embeddings directory and use its filename in the
prompt"), independently of sdplugin_ti's own reader:

- ``.pt`` / ``.bin``: a pickled dict; ``.safetensors``: tensors only. The prompt word is the file stem.
- images: ``*.preview.png`` skipped; the ``sd-ti-embedding`` text chunk is base64 of JSON; the
  prompt word is the ``name`` stored inside (the file stem only when none is stored); images
  without the chunk (and without pixel data) are skipped silently.
- training saves ``<name>-<step>.pt`` every N steps storing ``name = "<name>-<step>"`` and
  ``sd_checkpoint`` = the model's shorthash (sha256[:10]), ``sd_checkpoint_name`` = the model file's stem.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sdcore.models.text import encode_prompts
from sdcore.testing.contract import contract_options
from sdplugin_ti.apply import EmbeddingHandler
from sdplugin_ti.embedding import SINGLE, Embedding
from sdplugin_ti.formats import save_embedding
from sdplugin_ti.method import TIMethod

TI_OPTIONS = {"name": "tiny", "vectors": 2, "template": "subject_filewords", "lr": 5e-2}


def a1111_prompt_words(folder: Path) -> dict[str, Path]:
    """Which file each prompt word (lower-cased) refers to, by A1111's documented rules."""
    words: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.stat().st_size == 0:
            continue
        suffix = path.suffix.lower()
        if suffix in (".pt", ".bin", ".safetensors"):
            words[path.stem.lower()] = path
        elif suffix in (".png", ".webp"):
            if Path(path.stem).suffix.lower() == ".preview":
                continue
            with Image.open(path) as image:
                chunk = dict(getattr(image, "text", {}) or {}).get("sd-ti-embedding")
            if chunk is None:
                continue  # (no pixel data in these test images either) -> skipped silently
            data = json.loads(base64.b64decode(chunk))
            words[str(data.get("name", path.stem)).lower()] = path
    return words


def _png_embedding(path: Path, stored_name: str, vectors: torch.Tensor) -> None:
    """A PNG embedding written the way A1111 does (independently of sdplugin_ti.png)."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}},
        "name": stored_name,
        "step": 500,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (16, 16), "white").save(path, pnginfo=info)


def test_png_embedding_answers_to_its_stored_name_as_in_a1111(make_bundle, tmp_path):
    torch.manual_seed(0)
    _png_embedding(tmp_path / "downloaded (1).png", "mychar", torch.randn(2, 32) * 0.5)
    save_embedding(Embedding("ignored", {SINGLE: torch.randn(1, 32)}), tmp_path / "style.pt")
    Image.new("RGB", (8, 8)).save(tmp_path / "holiday.png")  # a plain picture: skipped
    _png_embedding(tmp_path / "style.preview.png", "previewword", torch.randn(1, 32))  # a preview: skipped

    expected = a1111_prompt_words(tmp_path)
    assert set(expected) == {"mychar", "style"}
    handler = EmbeddingHandler(tmp_path)
    assert handler.names() == expected

    bundle = make_bundle("sd1")
    plain = encode_prompts(bundle, ["a photo of mychar"]).hidden_states
    act = handler.activate(bundle, [], "a photo of mychar", "")
    assert act.prompt != "a photo of mychar" and "mychar: " in act.info["TI hashes"]
    assert not torch.equal(encode_prompts(bundle, [act.prompt]).hidden_states, plain)
    act.undo()
    # the file stem is not a prompt word for an image embedding
    stem = handler.activate(bundle, [], "downloaded (1)", "holiday")
    assert stem.prompt == "downloaded (1)" and stem.negative_prompt == "holiday" and not stem.info


def _single_file_bundle(make_bundle, tmp_path: Path):
    bundle = make_bundle("sd1")
    model = bundle.save(tmp_path / "models" / "my-model.safetensors")
    bundle.source = str(model)
    return bundle, hashlib.sha256(model.read_bytes()).hexdigest()[:10]


def test_intermediate_saves_store_name_step_and_the_model_hash(make_bundle, tmp_path):
    from sdcore.train.loop import train

    bundle, shorthash = _single_file_bundle(make_bundle, tmp_path)
    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, "max_steps": 2, "save_every": 1})
    result = train(TIMethod(options), bundle=bundle)
    first = result.output.parent / "embeddings" / "tiny-1.pt"
    raw = torch.load(first, weights_only=True)
    assert raw["name"] == "tiny-1" and raw["step"] == 1
    assert raw["sd_checkpoint"] == shorthash and raw["sd_checkpoint_name"] == "my-model"
    final = torch.load(result.output, weights_only=True)
    assert final["name"] == "tiny" and final["step"] == 2 and final["sd_checkpoint"] == shorthash
    # A1111 reading the folder: the intermediate answers to "tiny-1", the same word it stores
    words = a1111_prompt_words(first.parent)
    assert words == {"tiny-1": first} and raw["name"].lower() in words
