"""New concepts for the toy world's base model, and how often a model shows one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .evaluate import CFG, SAMPLER, STEPS, sample
from .scorer import concept_score
from .world import ALL_COLOURS, ALL_SHAPES, world_scenes, write_dataset


@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept named by ``trigger``: objects of ``colour`` and ``shape`` (``None``: any)."""

    trigger: str
    colour: str | None
    shape: str | None
    sizes: tuple[str, ...] = ("small", "large")

    def __post_init__(self) -> None:
        if self.colour is not None and self.colour not in ALL_COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose one of {', '.join(ALL_COLOURS)}")
        if self.shape is not None and self.shape not in ALL_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(ALL_SHAPES)}")

    @property
    def description(self) -> str:
        return " ".join(part for part in (self.colour, self.shape) if part)

    def write_dataset(
        self, root: str | Path, *, count: int = 8, seed: int = 3, repeats: int = 1, captions: bool = True
    ) -> Path:
        """``root/<repeats>_<trigger>/`` with ``count`` images of the concept, captioned with the trigger."""
        scenes = world_scenes(
            count,
            seed,
            shapes=[self.shape] if self.shape else ALL_SHAPES,
            colours=[self.colour] if self.colour else list(ALL_COLOURS),
            sizes=self.sizes,
        )
        return write_dataset(
            root, scenes, repeats=repeats, name=self.trigger, captions=captions, caption_text=lambda _: self.trigger
        )

    def score(self, images: Any) -> float:
        """The share of ``images`` showing the concept (colour and shape)."""
        return concept_score(images, colour=self.colour, shape=self.shape)


NEW_OBJECT = Concept("sks", "purple", "ring")
"""A new object: a shape and a colour the world lacks."""


def concept_score_of(
    bundle: Any,
    concept: Concept,
    *,
    prompt: str | None = None,
    n: int = 16,
    seed: int = 100,
    steps: int = STEPS,
    cfg: float = CFG,
    sampler: str = SAMPLER,
    networks: Any = None,
) -> float:
    """Sample ``prompt`` (default: the trigger) with seeds ``seed .. seed + n - 1`` and score the concept."""
    images = sample(
        bundle, [prompt or concept.trigger] * n, seed=seed, steps=steps, cfg=cfg, sampler=sampler, networks=networks
    )
    return concept.score(images)
