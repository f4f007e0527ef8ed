"""Sample a model on toy-world prompts and score what it drew."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .scorer import Reading, read_image
from .world import IMAGE_SIZE, world_captions

SAMPLER = "ddim"
"""Sampler, steps and guidance the accuracy figures and checks use (fast on a CPU)."""
STEPS = 10
CFG = 5.0


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Shares of samples whose main object has the prompt's colour, shape, size, colour and shape."""

    n: int
    colour: float
    shape: float
    size: float
    colour_and_shape: float

    def __str__(self) -> str:
        return (
            f"colour {self.colour:.2f}, shape {self.shape:.2f}, size {self.size:.2f}, "
            f"colour+shape {self.colour_and_shape:.2f} (N={self.n})"
        )


SHIPPED_ACCURACY = Accuracy(n=64, colour=0.91, shape=0.75, size=0.83, colour_and_shape=0.75)
"""The shipped base model's documented accuracy (``measure(bundle, 64)``: world prompts, seeds
1000-1063, DDIM 10 steps, CFG 5); ``python -m sdcore.testing.toyworld check`` compares a rebuild with it."""


def parse_caption(text: str) -> tuple[str, str, str]:
    """``"a small blue square"`` -> ``("square", "blue", "small")``."""
    words = text.split()
    if len(words) != 4 or words[0] != "a":
        raise ValueError(f"not a toy-world caption: {text!r}")
    return words[3], words[2], words[1]


def sample(
    bundle: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = STEPS,
    cfg: float = CFG,
    sampler: str = SAMPLER,
    networks: Any = None,
    negative_prompt: str = "",
) -> list[Any]:
    """Images for ``prompts`` (image ``i`` uses seed ``seed + i``) at the world's size."""
    from ...generate.pipeline import generate_images

    return generate_images(
        bundle,
        list(prompts),
        steps=steps,
        cfg=cfg,
        seed=seed,
        sampler=sampler,
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        networks=networks,
        negative_prompt=negative_prompt,
    )


def world_prompts(n: int) -> list[str]:
    """``n`` world captions, cycling through every caption of the world in a fixed order."""
    captions = world_captions()
    return [captions[i % len(captions)] for i in range(n)]


def accuracy(prompts: Sequence[str], readings: Sequence[Reading]) -> Accuracy:
    """How often each reading matches its world prompt."""
    hits = {"colour": 0, "shape": 0, "size": 0, "both": 0}
    for prompt, reading in zip(prompts, readings, strict=True):
        shape, colour, size = parse_caption(prompt)
        hits["colour"] += reading.colour == colour
        hits["shape"] += reading.shape == shape
        hits["size"] += reading.size == size
        hits["both"] += reading.colour == colour and reading.shape == shape
    n = max(len(prompts), 1)
    return Accuracy(len(prompts), hits["colour"] / n, hits["shape"] / n, hits["size"] / n, hits["both"] / n)


def compare(measured: Accuracy, reference: Accuracy, tolerance: float) -> list[str]:
    """The fields of ``measured`` further than ``tolerance`` from ``reference`` (empty: they match)."""
    misses = []
    for name in ("colour", "shape", "size", "colour_and_shape"):
        a, b = getattr(measured, name), getattr(reference, name)
        if abs(a - b) > tolerance:
            misses.append(f"{name} {a:.2f} vs {b:.2f}")
    return misses


def measure(
    bundle: Any, n: int = 64, *, seed: int = 1000, steps: int = STEPS, cfg: float = CFG, sampler: str = SAMPLER
) -> Accuracy:
    """Accuracy of ``bundle`` on ``n`` world prompts with fixed seeds (``seed``, ``seed + 1``, ...)."""
    prompts = world_prompts(n)
    images = sample(bundle, prompts, seed=seed, steps=steps, cfg=cfg, sampler=sampler)
    return accuracy(prompts, [read_image(image) for image in images])
