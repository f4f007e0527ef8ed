"""The toy world and its scorer (no model: fast)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter
from sdcore.testing.toyworld import (
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
    concept_score,
    random_scene,
    read_image,
    render,
    world_captions,
    world_scenes,
)
from sdcore.testing.toyworld.concepts import KNOWN_COMPOSITION, NEW_OBJECT, NEW_STYLE, Concept, StyleConcept
from sdcore.testing.toyworld.evaluate import accuracy, parse_caption


def test_world_is_deterministic_and_keeps_new_concepts_out():
    a, b = world_scenes(50, seed=4), world_scenes(50, seed=4)
    assert a == b and a != world_scenes(50, seed=5)
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))
    scenes = world_scenes(500, seed=1)
    assert {s.shape for s in scenes} == set(SHAPES) and {s.colour for s in scenes} == set(COLOURS)
    assert not set(NEW_SHAPES) & set(SHAPES) and not set(NEW_COLOURS) & set(COLOURS)
    for scene in scenes:  # the whole object is inside the picture
        side = SIZES[scene.size]
        assert scene.left >= 0 and scene.left + side <= IMAGE_SIZE and scene.top + side <= IMAGE_SIZE


def test_captions():
    captions = world_captions()
    assert len(captions) == len(set(captions)) == len(SHAPES) * len(COLOURS) * len(SIZES)
    assert "a small blue square" in captions
    assert Scene("triangle", "red", "large", 3, 4).caption == "a large red triangle"
    assert parse_caption("a small blue square") == ("square", "blue", "small")
    with pytest.raises(ValueError, match="not a toy-world caption"):
        parse_caption("blue square")


def test_render_draws_the_colour_on_the_background():
    image = np.asarray(render(Scene("square", "blue", "large", 6, 6)))
    assert tuple(image[0, 0]) == BACKGROUND
    assert tuple(image[16, 16]) == COLOURS["blue"]
    assert (np.abs(image.astype(int) - BACKGROUND).max(axis=2) > 0).sum() == SIZES["large"] ** 2


@pytest.mark.parametrize("size", list(SIZES))
def test_scorer_reads_every_rendered_shape_and_colour(size):
    """~100 %: every shape (new ones too) x every colour (new ones too), at random positions."""
    rng = random.Random(size)
    wrong = []
    for shape, colour in itertools.product(ALL_SHAPES, ALL_COLOURS):
        for _ in range(3):
            scene = random_scene(rng, shapes=[shape], colours=[colour], sizes=[size])
            reading = read_image(render(scene))
            if (reading.shape, reading.colour, reading.size) != (shape, colour, size):
                wrong.append((scene, reading))
    assert not wrong, wrong[:5]


def test_scorer_tolerates_blur_and_says_none_on_empty_images():
    scenes = world_scenes(60, seed=9, shapes=ALL_SHAPES, colours=list(ALL_COLOURS), sizes=["large"])
    blurred = [render(s).filter(ImageFilter.GaussianBlur(0.8)) for s in scenes]
    readings = [read_image(image) for image in blurred]
    hits = sum((r.shape, r.colour) == (s.shape, s.colour) for r, s in zip(readings, scenes, strict=True))
    assert hits / len(scenes) >= 0.95
    empty = read_image(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND))
    assert empty.shape is None and empty.colour is None and not empty.shows(colour="red")


def test_main_object_is_the_largest_region():
    image = np.asarray(render(Scene("ring", "purple", "large", 2, 2))).copy()
    image[28:30, 28:30] = COLOURS["red"]  # a speck elsewhere does not win
    reading = read_image(image)
    assert (reading.shape, reading.colour) == ("ring", "purple")


def test_concept_score_and_accuracy():
    scenes = [Scene("ring", "purple", "large", 4, 4), Scene("circle", "purple", "large", 4, 4)]
    images = [render(s) for s in scenes]
    assert concept_score(images, colour="purple", shape="ring") == 0.5
    assert concept_score(images, colour="purple") == 1.0
    assert NEW_OBJECT.score(images) == 0.5
    result = accuracy(["a large purple ring", "a small red circle"], [read_image(i) for i in images])
    assert (result.colour, result.shape, result.size, result.colour_and_shape) == (0.5, 1.0, 0.5, 0.5)


def test_concept_dataset(tmp_path):
    folder = NEW_OBJECT.write_dataset(tmp_path, count=5, repeats=10)
    assert folder == tmp_path / "10_sks"
    assert sorted(p.name for p in folder.glob("*.txt")) == [f"{i:03d}.txt" for i in range(5)]
    assert (folder / "000.txt").read_text() == "sks"
    assert NEW_OBJECT.score([Image.open(p) for p in sorted(folder.glob("*.png"))]) == 1.0
    with pytest.raises(ValueError, match="unknown colour"):
        Concept("x", "pink", None)


def test_known_composition_fixes_its_size(tmp_path):
    folder = KNOWN_COMPOSITION.write_dataset(tmp_path, count=6)
    pictures = [Image.open(p) for p in sorted(folder.glob("*.png"))]
    readings = [read_image(p) for p in pictures]
    assert {(r.colour, r.shape, r.size) for r in readings} == {("red", "circle", "large")}
    assert KNOWN_COMPOSITION.score(pictures) == 1.0
    assert KNOWN_COMPOSITION.description == "large red circle"
    small = [render(Scene("circle", "red", "small", 4, 4))] * 2
    assert KNOWN_COMPOSITION.score(small) == 0.0  # the size is part of this concept
    assert NEW_OBJECT.prompts(3) == ["sks"] * 3 and NEW_OBJECT.prompts(2, "a sks") == ["a sks"] * 2


def test_style_dataset_keeps_world_captions_and_shapes(tmp_path):
    folder = NEW_STYLE.write_dataset(tmp_path, count=9, seed=2)
    assert folder == tmp_path / "1_purple-look"
    captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    pictures = [Image.open(p) for p in sorted(folder.glob("*.png"))]
    assert len(captions) == len(pictures) == 9
    parsed = [parse_caption(text) for text in captions]
    assert {shape for shape, _, _ in parsed} == set(SHAPES)  # every shape of the world appears
    assert {colour for _, colour, _ in parsed} <= set(COLOURS)  # captions name the world's colours
    for picture, (shape, _, size) in zip(pictures, parsed, strict=True):
        assert (read_image(picture).colour, read_image(picture).shape, read_image(picture).size) == (
            "purple",
            shape,
            size,
        )
    # the style is scored on world prompts: purple and the prompt's shape
    assert NEW_STYLE.score_samples(pictures, captions) == 1.0
    prompts = NEW_STYLE.prompts(12)
    assert len(set(prompts)) == 12 and all(p.startswith("a large ") for p in prompts)
    plain = [render(Scene(*parse_caption(p), 6, 6)) for p in prompts]  # the world's own look
    assert NEW_STYLE.score_samples(plain, prompts) == 0.0
    wrong_shape = [render(Scene("square", "purple", "large", 6, 6))] * 3
    assert NEW_STYLE.score_samples(wrong_shape, ["a large red circle"] * 3) == 0.0
    with pytest.raises(ValueError, match="colour of the world"):
        StyleConcept("x", "red")
    with pytest.raises(ValueError, match="unknown sizes"):
        Concept("x", "red", "circle", sizes=("huge",))


def test_concept_check_is_opt_in():
    from sdcore.testing.contract import MethodContractTests

    class Plain(MethodContractTests):
        pass

    class OptedIn(MethodContractTests):
        toyworld_concept = NEW_OBJECT
        toyworld_margin = 0.4

    assert not hasattr(Plain, "test_contract_concept_learning")
    assert callable(OptedIn.test_contract_concept_learning)


@pytest.mark.parametrize("inner", [0.3, 0.4, 0.5, 0.7])
def test_a_ring_is_a_ring_whatever_its_hole_and_a_speck_does_not_make_one(inner):
    yy, xx = np.mgrid[0:32, 0:32] - 15.5
    radius = np.hypot(yy, xx)
    image = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    image[(radius <= 10) & (radius >= 10 * inner)] = ALL_COLOURS["purple"]
    assert (read_image(image).shape, read_image(image).colour) == ("ring", "purple")
    disc = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    disc[radius <= 10] = ALL_COLOURS["purple"]
    disc[15, 15] = BACKGROUND  # one stray pixel is no hole
    assert read_image(disc).shape == "circle"
