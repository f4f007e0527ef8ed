"""A toy world sdcore ships, trains in and measures learning in.

- :mod:`.world`: flat shapes on a plain background, captioned ``"a small blue square"``
  (:data:`SHAPES` x :data:`COLOURS` x :data:`SIZES` x positions), deterministic from a seed.
  :data:`NEW_SHAPES` and :data:`NEW_COLOURS` are drawn by the renderer but absent from the world:
  they are the new concepts methods can be asked to teach.
- :mod:`.scorer`: what an image shows (colour, shape, size of its main object), with no weights.
- the base model, ``toyworld:`` in sdcore (a diffusers folder inside the package,
  :func:`sdcore.models.load.toyworld_model_dir`): an SD1-architecture model trained from scratch on
  the world by :mod:`.build` (``python -m sdcore.testing.toyworld build``).
- :mod:`.evaluate`: sample a model on world prompts and measure its accuracy.
- :mod:`.concepts`: teach a method a new concept and measure how often it shows (the learning
  check of :class:`sdcore.testing.contract.MethodContractTests`).

Only numpy and PIL are imported here; torch loads when a model is built or sampled.
"""

from __future__ import annotations

from .scorer import Reading, concept_score, read_image, read_images
from .world import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    NEW_COLOURS,
    NEW_SHAPES,
    SHAPES,
    SIZES,
    Scene,
    caption,
    random_scene,
    render,
    shape_mask,
    world_captions,
    world_scenes,
    write_dataset,
)

MODEL = "toyworld:"
"""The model path sdcore reads the shipped base model from."""

__all__ = [
    "ALL_COLOURS",
    "ALL_SHAPES",
    "BACKGROUND",
    "COLOURS",
    "IMAGE_SIZE",
    "MODEL",
    "NEW_COLOURS",
    "NEW_SHAPES",
    "SHAPES",
    "SIZES",
    "Reading",
    "Scene",
    "caption",
    "concept_score",
    "random_scene",
    "read_image",
    "read_images",
    "render",
    "shape_mask",
    "world_captions",
    "world_scenes",
    "write_dataset",
]
