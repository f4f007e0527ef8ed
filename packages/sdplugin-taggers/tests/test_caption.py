"""BLIP + CLIP interrogation with tiny random models built from small configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.models.tokenizer import write_tokenizer_files
from sdplugin_taggers.caption import CaptionTagger, builtin_list, trending_phrases
from wdmodels import save_image

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "cat", "dog", "sitting", "on", "the", "red",
         "blue", "photo", "of", "an", "image", "painting", "field"]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
    )

    root = tmp_path_factory.mktemp("ci-models")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    blip_dir = root / "blip"
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    text = dict(small, vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                eos_token_id=3, sep_token_id=3, decoder_start_token_id=5)  # fmt: skip
    blip = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    )
    blip.save_pretrained(blip_dir)
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(blip_dir)
    clip_dir = root / "clip"
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
            vision_config=dict(small, image_size=32, patch_size=8),
            projection_dim=16,
        )
    )
    clip.save_pretrained(clip_dir)
    write_tokenizer_files(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    return blip_dir, clip_dir


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    return [save_image(tmp_path / "img" / f"{i}.png", tuple(int(c) for c in rng.integers(0, 256, 3)), size=(40, 30))
            for i in range(3)]  # fmt: skip


def independent_top(clip_dir: Path, image: Path, labels: list[str]) -> str:
    """Best label by cosine similarity, computed directly with transformers (no caption.py code)."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    px = CLIPImageProcessor.from_pretrained(str(clip_dir))(images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(**px).pooler_output
        txt = model.get_text_features(**tok(labels, padding=True, return_tensors="pt")).pooler_output
    sims = torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(img, dim=-1)[0]
    return labels[int(sims.argmax())]


def test_caption_only_is_deterministic(models: tuple[Path, Path], images: list[Path]) -> None:
    blip_dir, _ = models
    tagger = CaptionTagger(blip_dir, mode="caption", device="cpu", max_length=6)
    first = [r.text for r in tagger.tag(images)]
    assert all(isinstance(t, str) and t and "[DEC]" not in t for t in first)
    assert all(set(t.split()) <= set(WORDS) for t in first)
    assert [r.text for r in tagger.tag(images)] == first


def test_modes_cache_and_known_ranking(models: tuple[Path, Path], images: list[Path], tmp_path: Path) -> None:
    blip_dir, clip_dir = models
    cache = tmp_path / "cache"
    flavors = tmp_path / "flavors.txt"
    flavors.write_text("\n".join(["highly detailed", "soft lighting", "vivid colors", "dramatic", "sharp focus",
                                  "cinematic", "pastel colors", "bokeh", "hdr", "8k"]) + "\n")  # fmt: skip
    common = dict(device="cpu", cache_dir=cache, flavors=flavors, artists=["Ann Example", "Bo Sample"], max_length=6)
    classic = CaptionTagger(blip_dir, clip_dir, mode="classic", **common)
    assert classic.clip is not None and classic.clip.cache_misses == 6 and classic.clip.cache_hits == 0
    assert len(list(cache.glob("*.safetensors"))) == 6
    captions = CaptionTagger(blip_dir, mode="caption", device="cpu", max_length=6).tag(images)
    results = classic.tag(images)
    for cap, res, image in zip(captions, results, images, strict=True):
        medium = independent_top(clip_dir, image, builtin_list("mediums"))
        movement = independent_top(clip_dir, image, builtin_list("movements"))
        assert res.text.startswith(cap.text + ", ")
        assert medium in res.text and movement in res.text
        assert any(t in res.text for t in trending_phrases())

    again = CaptionTagger(blip_dir, clip_dir, mode="classic", **common)
    assert again.clip is not None and again.clip.cache_hits == 6 and again.clip.cache_misses == 0
    assert [r.text for r in again.tag(images)] == [r.text for r in results]

    fast = CaptionTagger(blip_dir, clip_dir, mode="fast", **common).tag(images)
    best = CaptionTagger(blip_dir, clip_dir, mode="best", min_flavors=2, max_flavors=4, **common).tag(images)
    negative = CaptionTagger(None, clip_dir, mode="negative", max_flavors=3, **common).tag(images)
    for cap, f, b, n in zip(captions, fast, best, negative, strict=True):
        assert f.text.startswith(cap.text + ", ") and len(f.tags()) > 3
        assert b.text.startswith(cap.text)
        assert 1 <= len(n.tags()) <= 4 and not n.text.startswith(cap.text)
    assert [r.text for r in CaptionTagger(blip_dir, clip_dir, mode="best", min_flavors=2, max_flavors=4,
                                          **common).tag(images)] == [r.text for r in best]  # fmt: skip


def test_caption_command_writes_prompts(models: tuple[Path, Path], images: list[Path], tmp_path: Path) -> None:
    from click.testing import CliRunner
    from sdplugin_taggers.commands import caption_command

    blip_dir, clip_dir = models
    folder = images[0].parent
    args = [str(folder), "--blip", str(blip_dir), "--clip", str(clip_dir), "--ci-mode", "fast", "--device", "cpu",
            "--cache-dir", str(tmp_path / "c"), "--max-length", "6", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(caption_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "tagged: 3" in result.output
    assert len((folder / "0.txt").read_text(encoding="utf-8").split(", ")) > 3
    bad = CliRunner().invoke(caption_command, [str(folder), "--blip", str(blip_dir), "--ci-mode", "best"])
    assert bad.exit_code != 0 and "needs --clip" in bad.output


def test_mode_validation(models: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError):
        CaptionTagger(models[0], mode="weird")
    with pytest.raises(ConfigError):
        CaptionTagger(models[0], None, mode="best")
