"""Aesthetic gradients on the toy world: generation moves toward an image set's look.

Aesthetic gradients are no training method (nothing is trained before generation; the text tower is
tuned per prompt toward the mean CLIP image embedding of a set), so they do not fit the method
contract's learning check; this is the same kind of check, direct. ``toyworld:`` has no CLIP model,
so sdcore's toy world builds one (:mod:`sdcore.testing.toyworld.clip`, cached under the sdcore cache
dir): a ``CLIPModel`` whose text tower *is* the toy model's text encoder (so the personaliser tunes
the model's own encoder, as with SD1 and OpenAI CLIP) and whose small vision tower and both
projections are trained contrastively on world pictures and their captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sdcore.testing.contract import toyworld_bundle
from sdcore.testing.toyworld import ALL_COLOURS, BACKGROUND, COLOURS, SHAPES, read_image, render, world_scenes
from sdcore.testing.toyworld.evaluate import CFG, SAMPLER, STEPS
from sdcore.testing.toyworld.world import write_dataset

LOOK = "blue"
"""The colour of the image set (a colour the toy model knows; the prompts ask for the others)."""
PROMPTS = [f"a large {colour} {shape}" for colour in COLOURS if colour != LOOK for shape in SHAPES][:8]


@pytest.fixture(scope="module")
def toy_clip() -> Path:
    from sdcore.testing.toyworld.clip import toy_clip_dir

    return toy_clip_dir()


def _object_rgb(image: Any) -> np.ndarray:
    """Mean colour of the pixels that differ clearly from the background (the scorer's threshold)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = np.abs(pixels - np.asarray(BACKGROUND, dtype=np.float32)).max(axis=2) > 60
    return pixels[mask].mean(axis=0) if mask.any() else np.asarray(BACKGROUND, dtype=np.float32)


def _generate(bundle: Any, embeddings: Path, clip: Path, settings: dict[str, str] | None) -> list[Any]:
    from sdcore.generate.pipeline import generate_images
    from sdcore.generate.session import NetworkSession
    from sdplugin_aesthetic.handler import AestheticHandler

    handler = AestheticHandler(embeddings)
    if settings is not None:
        handler.options = {"aesthetic": "look", "aesthetic_clip": str(clip), **settings}
    return generate_images(
        bundle, PROMPTS, steps=STEPS, cfg=CFG, seed=100, sampler=SAMPLER, width=32, height=32,
        networks=NetworkSession({None: handler}),
    )  # fmt: skip


def test_toy_clip_reads_colours(toy_clip: Path) -> None:
    """The toy CLIP is a real joint space: a picture is nearest to its own colour's caption."""
    from sdplugin_aesthetic.create import image_features, load_clip, text_features

    model, processor = load_clip(toy_clip)
    tokenizer = toyworld_bundle().tokenizers[0]
    scenes = world_scenes(24, seed=99)
    captions = [f"a large {colour} circle" for colour in COLOURS]
    with torch.no_grad():
        images = image_features(
            model, processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        )
        ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        texts = text_features(model, ids)
    similarity = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    guessed = [list(COLOURS)[i] for i in similarity.argmax(1).tolist()]
    right = sum(g == s.colour for g, s in zip(guessed, scenes, strict=True)) / len(scenes)
    assert right >= 0.75, f"the toy CLIP matches colours on {right:.2f} of pictures"


def look_scores(toy_clip: Path, tmp_path: Path) -> dict[str, tuple[float, float]]:
    """(share of samples in the set's colour, mean distance of the objects' colour to it) without
    aesthetic gradients, with a mild setting and with a strong one."""
    from sdplugin_aesthetic.create import create_aesthetic_embedding, save_aesthetic_embedding

    torch.set_num_threads(1)
    pictures = write_dataset(tmp_path / "set", world_scenes(16, 5, colours=[LOOK]), captions=False)
    save_aesthetic_embedding(create_aesthetic_embedding(pictures, toy_clip), tmp_path / "embs" / "look.pt")
    bundle = toyworld_bundle()
    target = np.asarray(ALL_COLOURS[LOOK], dtype=np.float32)

    def measure(settings: dict[str, str] | None) -> tuple[float, float]:
        images = _generate(bundle, tmp_path / "embs", toy_clip, settings)
        share = sum(read_image(image).colour == LOOK for image in images) / len(images)
        distance = float(np.mean([np.linalg.norm(_object_rgb(image) - target) for image in images]))
        return share, distance

    return {
        "base": measure(None),
        "mild": measure({"aesthetic_weight": "0.9", "aesthetic_steps": "10", "aesthetic_lr": "1e-3"}),
        "strong": measure({"aesthetic_weight": "0.9", "aesthetic_steps": "20", "aesthetic_lr": "5e-3"}),
    }


def test_generation_moves_toward_the_sets_look(toy_clip: Path, tmp_path: Path) -> None:
    """With an embedding of blue pictures, red, green and yellow prompts come out bluer: a mild setting
    moves the objects' mean colour toward blue, the extension's strong one draws them blue."""
    scores = look_scores(toy_clip, tmp_path)
    base_share, base_distance = scores["base"]
    mild_share, mild_distance = scores["mild"]
    strong_share = scores["strong"][0]
    assert base_share == 0.0
    assert mild_distance < 0.8 * base_distance, (base_distance, mild_distance, mild_share)
    assert strong_share >= 0.75, (base_share, mild_share, strong_share)
