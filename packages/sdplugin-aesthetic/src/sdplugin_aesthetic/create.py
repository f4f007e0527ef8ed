"""Aesthetic embeddings: the mean CLIP image embedding of a folder of images.

The file is what the A1111 extension and vicgalle's scripts write: a raw torch tensor (not a
dict) of shape ``[1, D]``, the unnormalised mean of the images' CLIP features, saved with ``torch.save``. Readers accept ``[1, D]`` and ``[D]``, fp16
and fp32, saved on any device (some shipped files were pickled on ``cuda:0``), and always
normalise to unit length, because only the direction matters to the cosine objective.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from sdcore.errors import DataError, ModelFormatError
from sdcore.io import atomic_save

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".webp", ".bmp")

#: The full CLIP model whose text tower each family's (first) text encoder is.
DEFAULT_CLIP = {
    "sd1": "openai/clip-vit-large-patch14",
    "sd2": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}


def default_clip_for(family: str) -> str:
    """The CLIP model the extension would load for a model family (SD1: OpenAI CLIP ViT-L/14)."""
    if family not in DEFAULT_CLIP:
        raise ModelFormatError(f"aesthetic gradients support SD1 and SD2 text encoders, not {family}")
    return DEFAULT_CLIP[family]


def load_clip(clip_path_or_id: str | Path, *, vision_only: bool = False) -> tuple[Any, Any]:
    """Load a transformers ``CLIPModel`` and its ``CLIPImageProcessor`` (folder or hub id).

    With ``vision_only`` (creating embeddings needs only the image tower) a
    ``CLIPVisionModelWithProjection`` checkpoint is accepted too. The checkpoint's type is
    checked first and every weight must load: transformers would otherwise fill a mismatched
    checkpoint with random weights and the embedding would be silently meaningless.
    """
    from transformers import AutoConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    source = str(clip_path_or_id)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        text = str(exc).strip()
        raise ModelFormatError(
            f"{source}: cannot load a CLIP model ({text.splitlines()[0] if text else type(exc).__name__}); "
            "offline, download it first: docs/offline-models.md"
        ) from exc
    kinds: dict[str, Any] = {"clip": CLIPModel}
    if vision_only:
        kinds["clip_vision_model"] = CLIPVisionModelWithProjection
    cls = kinds.get(getattr(config, "model_type", ""))
    if cls is None:
        wanted = " or ".join(kinds)
        raise ModelFormatError(
            f"{source}: cannot load a CLIP model: it is a {config.model_type!r} checkpoint, not {wanted}"
        )
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True)
        processor = CLIPImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        text = str(exc).strip()
        raise ModelFormatError(
            f"{source}: cannot load a CLIP model and image processor ({text.splitlines()[0] if text else type(exc).__name__})"
        ) from exc
    broken = [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]
    if broken:
        raise ModelFormatError(
            f"{source}: the CLIP checkpoint lacks or mismatches {len(broken)} weights, e.g. {broken[0]}"
        )
    model.eval()
    model.requires_grad_(False)
    return model, processor


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(images_dir: str | Path) -> list[Path]:
    """The images directly in ``images_dir``, not in its subfolders: the extension (and vicgalle's script) read
    the folder's own files only, so a folder keeps the same embedding it had there."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    images = sorted(p for p in folder.iterdir() if _is_image(p))
    if not images:
        below = subfolder_images(folder)
        where = f"; {below} in its subfolders, which are not read (as in the extension)" if below else ""
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found{where}")
    return images


def subfolder_images(images_dir: str | Path) -> int:
    """How many images lie in ``images_dir``'s subfolders (left out of the embedding; said so on the console)."""
    folder = Path(images_dir)
    return sum(1 for p in folder.rglob("*") if p.parent != folder and _is_image(p))


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image features (``get_image_features``), unnormalised, ``[B, D]``."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def text_features(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Projected CLIP text features (``get_text_features``), unnormalised, ``[B, D]``."""
    pooled = model.text_model(input_ids=input_ids).pooler_output
    return model.text_projection(pooled)


@torch.no_grad()
def create_aesthetic_embedding(
    images_dir: str | Path,
    clip_path_or_id: str | Path | tuple[Any, Any],
    batch_size: int = 256,
    *,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The aesthetic embedding of a folder: ``mean_i(f_i)``, shape ``[1, D]``.

    ``f_i`` are the projected CLIP image features (``get_image_features``), raw: the A1111
    extension and vicgalle's ``gen_aesthetic_embeddings.py`` average them unnormalised and save
    the mean as is (readers normalise it on load), so this is the same vector they write.
    ``clip_path_or_id`` may also be an already loaded ``(model, CLIPImageProcessor)`` pair, the
    model a ``CLIPModel`` or a ``CLIPVisionModelWithProjection``.
    """
    from PIL import Image

    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    paths = list_images(images_dir)
    model, processor = (
        clip_path_or_id if isinstance(clip_path_or_id, tuple) else load_clip(clip_path_or_id, vision_only=True)
    )
    if device is not None:
        model = model.to(device)
    run_device = next(model.parameters()).device
    total: torch.Tensor | None = None
    for batch in _batches(paths, batch_size):
        images = []
        for path in batch:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as exc:
                raise DataError(f"{path}: unreadable image ({exc})") from exc
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(run_device, dtype=model.dtype)
        features = image_features(model, pixels).float()
        summed = features.sum(dim=0, keepdim=True).cpu()
        total = summed if total is None else total + summed
    assert total is not None
    return total / len(paths)


def save_aesthetic_embedding(embedding: torch.Tensor, path: str | Path) -> Path:
    """Write ``embedding`` as the extension does: a raw ``[1, D]`` float32 tensor ``.pt``."""
    tensor = embedding.detach().to("cpu", torch.float32).reshape(1, -1).contiguous().clone()
    return atomic_save(path, lambda tmp: torch.save(tensor, tmp))


def load_aesthetic_embedding(path: str | Path) -> torch.Tensor:
    """Read an aesthetic embedding file as a unit-length float32 ``[D]`` tensor on the CPU."""
    from sdcore.models.safe_pickle import load_pickle

    path = Path(path)
    data = load_pickle(path, mmap=False)
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise ModelFormatError(f"{path}: expected a float tensor of shape [1, D] or [D], found {type(data).__name__}")
    if data.dim() == 2 and data.shape[0] == 1:
        data = data[0]
    if data.dim() != 1:
        raise ModelFormatError(
            f"{path}: expected an aesthetic embedding of shape [1, D] or [D], found {list(data.shape)}"
        )
    vector = data.float()
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ModelFormatError(f"{path}: the aesthetic embedding is zero or not finite")
    return vector / norm


def embedding_hash(embedding: torch.Tensor) -> str:
    """A short content hash of an embedding (cache keys, PNG info)."""
    data = embedding.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:10]
