"""A CLIP model for the toy world: the base model's text encoder plus a small image tower.

Aesthetic gradients (and anything else that needs a joint image/text space) use the full CLIP
model whose text tower is the checkpoint's text encoder (SD1: OpenAI CLIP ViT-L/14). The toy
world's encoder was trained from scratch with the UNet, so it has no such partner; this module
makes one: a transformers ``CLIPModel`` whose text tower *is* ``toyworld:``'s text encoder (frozen)
and whose small vision tower and both projections are trained with CLIP's symmetric contrastive
loss on world pictures and their captions (captions that are equal count as positives of each
other). It names a picture's colour right far more often than chance, which is what a look needs.

The build is deterministic (fixed seeds, one torch thread) and takes a few seconds; :func:`toy_clip_dir`
keeps one copy under the sdcore cache dir, keyed by the base encoder's weights and this recipe's
version, so tests and ``benchmarks quality`` share it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

RECIPE = 1
"""Bump when the build below changes: the cache key includes it."""

VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 16,
}
PROJECTION_DIM = 32
STEPS = 150
SCENES = 256


def build_toy_clip(folder: str | os.PathLike[str], *, steps: int = STEPS) -> Path:
    """Train the toy CLIP and save it with its ``CLIPImageProcessor`` in ``folder`` (returned).

    Only the vision tower and the two projections train (AdamW, lr 5e-3, batches of 32 of
    :data:`SCENES` world pictures); the text tower stays the base encoder, so an aesthetic
    personaliser that tunes the model's own encoder tunes exactly this tower.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ..contract import toyworld_bundle
    from .world import render, world_scenes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the result depends on the thread count; one is the recorded build
    try:
        bundle = toyworld_bundle()
        encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
        torch.manual_seed(0)
        config = CLIPConfig(
            text_config=encoder.config.to_dict(), vision_config=VISION_CONFIG, projection_dim=PROJECTION_DIM
        )
        clip: Any = CLIPModel(config)
        clip.text_model.load_state_dict(encoder.state_dict())
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        scenes = world_scenes(SCENES, seed=11)
        captions = [scene.caption for scene in scenes]
        pixels = processor(images=[render(scene) for scene in scenes], return_tensors="pt")["pixel_values"]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        clip.text_model.requires_grad_(False)
        with torch.no_grad():
            pooled = clip.text_model(input_ids=ids).pooler_output
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=5e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):  # CLIP's symmetric contrastive loss; equal captions are all positives
            index = torch.randperm(len(scenes), generator=generator)[:32]
            image = torch.nn.functional.normalize(
                clip.visual_projection(clip.vision_model(pixel_values=pixels[index]).pooler_output), dim=-1
            )
            text = torch.nn.functional.normalize(clip.text_projection(pooled[index]), dim=-1)
            logits = clip.logit_scale.exp() * image @ text.T
            target = same[index][:, index]
            target = target / target.sum(1, keepdim=True)
            loss = (
                torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
            ) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out = Path(folder)
        clip.eval().save_pretrained(out)
        processor.save_pretrained(out)
        return out
    finally:
        torch.set_num_threads(threads)


def _cache_root() -> Path:
    from ...io import cache_dir

    return cache_dir() / "toyworld-clip"


def _base_key() -> str:
    """A hash of the shipped base's text-encoder file and of :data:`RECIPE` (a rebuilt base gets a new CLIP)."""
    from ...models.load import toyworld_model_dir

    digest = hashlib.sha256(f"recipe {RECIPE}".encode())
    for path in sorted((toyworld_model_dir() / "text_encoder").glob("*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def toy_clip_dir() -> Path:
    """The toy CLIP's folder (a ``CLIPModel`` + image processor), built on first use and cached.

    Built into a temporary folder beside the cache entry and renamed into place, so a reader never
    sees half a model and two processes building at once both end with the same folder.
    """
    folder = _cache_root() / _base_key()
    if (folder / "preprocessor_config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_toy_clip(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
