"""Concepts a method can teach the toy world's base model, and how often a model shows one.

Two kinds, one interface (``write_dataset``, ``prompts``, ``score_samples``), so the contract's
learning check (:func:`sdcore.testing.contract.check_concept_learning`) runs either:

- :class:`Concept`: an *object* named by a trigger word (``"sks"``), sampled with the trigger and
  scored by colour and shape: a new object (:data:`NEW_OBJECT`, a shape and a colour the world
  lacks) for methods that change weights, or a composition of things the model already knows
  (:data:`KNOWN_COMPOSITION`) for methods that only learn a word (textual inversion cannot teach
  what the model cannot draw);
- :class:`StyleConcept`: a *look* that applies to every prompt (:data:`NEW_STYLE`: every object
  drawn in one new colour), trained on world captions, sampled with world prompts and scored by
  "the look shows and the prompt's shape stays" (hypernetwork-like methods).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .evaluate import CFG, SAMPLER, STEPS, parse_caption, sample
from .scorer import concept_score, read_image
from .world import ALL_COLOURS, ALL_SHAPES, COLOURS, SHAPES, SIZES, caption, world_scenes, write_dataset


class ConceptKind(Protocol):
    """What the learning check needs of a concept (:class:`Concept` and :class:`StyleConcept` have it)."""

    trigger: str

    @property
    def description(self) -> str: ...

    def write_dataset(
        self, root: str | Path, *, count: int = 8, seed: int = 3, repeats: int = 1, captions: bool = True
    ) -> Path: ...

    def prompts(self, n: int, prompt: str | None = None) -> list[str]: ...

    def score_samples(self, images: Sequence[Any], prompts: Sequence[str]) -> float: ...


def _check_names(colour: str | None, shape: str | None, sizes: Sequence[str]) -> None:
    if colour is not None and colour not in ALL_COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {', '.join(ALL_COLOURS)}")
    if shape is not None and shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(ALL_SHAPES)}")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown or not sizes:
        raise ValueError(f"unknown sizes {tuple(sizes)!r}; choose from {', '.join(SIZES)}")


@dataclasses.dataclass(frozen=True)
class Concept:
    """An object named by ``trigger``: objects of ``colour`` and ``shape`` (``None``: any).

    With a single size in ``sizes`` the size is part of the concept (its pictures have it and a
    sample must show it); with several, samples may show any of them.
    """

    trigger: str
    colour: str | None
    shape: str | None
    sizes: tuple[str, ...] = ("small", "large")

    def __post_init__(self) -> None:
        _check_names(self.colour, self.shape, self.sizes)

    @property
    def description(self) -> str:
        size = self.sizes[0] if len(self.sizes) == 1 else None
        return " ".join(part for part in (size, self.colour, self.shape) if part)

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

    def prompts(self, n: int, prompt: str | None = None) -> list[str]:
        """``n`` times ``prompt`` (default: the trigger)."""
        return [prompt or self.trigger] * n

    def score(self, images: Any) -> float:
        """The share of ``images`` showing the concept (colour, shape and, when fixed, size)."""
        size = self.sizes[0] if len(self.sizes) == 1 else None
        return concept_score(images, colour=self.colour, shape=self.shape, size=size)

    def score_samples(self, images: Sequence[Any], prompts: Sequence[str]) -> float:
        """:meth:`score` (the prompts all name the concept)."""
        return self.score(images)


@dataclasses.dataclass(frozen=True)
class StyleConcept:
    """A look on every prompt: world scenes with their world captions, every object drawn in ``colour``.

    It is sampled with world prompts (:meth:`prompts`) and a sample shows it when
    its main object has ``colour`` *and* the shape its prompt asks for: the look must come without
    breaking what the prompt says. ``trigger`` names the look (the dataset folder's name); the
    captions do not contain it, because a style applies to every prompt.
    """

    trigger: str
    colour: str

    def __post_init__(self) -> None:
        _check_names(self.colour, None, tuple(SIZES))
        if self.colour in COLOURS:
            raise ValueError(f"{self.colour!r} is a colour of the world; a style must change how the world looks")

    @property
    def description(self) -> str:
        return f"every object {self.colour}, shapes kept"

    def write_dataset(
        self, root: str | Path, *, count: int = 8, seed: int = 3, repeats: int = 1, captions: bool = True
    ) -> Path:
        """``root/<repeats>_<trigger>/``: ``count`` world scenes drawn in the style's colour, captioned as
        the world captions them (``"a small red circle"`` drawn in ``colour``); every shape of the world
        appears."""
        scenes = world_scenes(count, seed)
        shapes = [SHAPES[i % len(SHAPES)] for i in range(count)]  # every shape, whatever the seed
        world = [dataclasses.replace(scene, shape=shape) for scene, shape in zip(scenes, shapes, strict=True)]
        texts = iter([scene.caption for scene in world])  # write_dataset captions the scenes in order
        return write_dataset(
            root,
            [dataclasses.replace(scene, colour=self.colour) for scene in world],
            repeats=repeats,
            name=self.trigger,
            captions=captions,
            caption_text=lambda _: next(texts),
        )

    def prompts(self, n: int, prompt: str | None = None) -> list[str]:
        """``n`` world prompts of large objects, every colour and shape of the world in turn (12 in all);
        ``prompt``, when given, ``n`` times.

        Large only: the base model draws large shapes reliably but small ones often as blobs (its
        weak spot, see the README), and the score should measure the style, not that blur."""
        if prompt:
            return [prompt] * n
        colours = list(COLOURS)
        return [caption(SHAPES[i % len(SHAPES)], colours[i % len(colours)], "large") for i in range(n)]

    def score_samples(self, images: Sequence[Any], prompts: Sequence[str]) -> float:
        """The share of samples in the style's colour with the shape their (world) prompt names."""
        if not images:
            return 0.0
        hits = 0
        for image, text in zip(images, prompts, strict=True):
            reading = read_image(image)
            hits += reading.colour == self.colour and reading.shape == parse_caption(text)[0]
        return hits / len(images)


NEW_OBJECT = Concept("sks", "purple", "ring")
"""A new object: a shape and a colour the world lacks."""

KNOWN_COMPOSITION = Concept("sks", "red", "circle", sizes=("large",))
"""A composition of things the model knows (a large red circle), to be named by one new word."""

NEW_STYLE = StyleConcept("purple-look", "purple")
"""A style on every prompt: objects come out purple (a colour the world lacks), shapes stay."""


def concept_score_of(
    bundle: Any,
    concept: ConceptKind,
    *,
    prompt: str | None = None,
    n: int = 16,
    seed: int = 100,
    steps: int = STEPS,
    cfg: float = CFG,
    sampler: str = SAMPLER,
    networks: Any = None,
    negative_prompt: str = "",
) -> float:
    """Sample ``concept.prompts(n, prompt)`` with seeds ``seed .. seed + n - 1`` and score the concept.

    ``networks`` and ``negative_prompt`` are what a training method's ``sampling()`` context yields
    (a textual inversion's live embedding, DreamArtist's negative embedding)."""
    prompts = concept.prompts(n, prompt)
    images = sample(
        bundle,
        prompts,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler=sampler,
        networks=networks,
        negative_prompt=negative_prompt,
    )
    return concept.score_samples(images, prompts)
