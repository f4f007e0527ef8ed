"""What ``python -m benchmarks quality`` trains: the concepts, their datasets, and each method's settings.

Every first-party training method is trained on the concept kind it is meant for (the issue's list):

- LoRA, LoCon, LoHa, LoKr, DoRA and DreamBooth (with and without prior preservation): a *new*
  object, a purple ring (a shape and a colour the toy world lacks), 8 pictures; the methods that
  train with the prior's world pictures (the LoRA family, DreamBooth + prior) caption them as
  DreamBooth does, ``a {size} bnp circle`` (an identifier and a class noun, :data:`CLASS_CAPTION`),
  DreamBooth without a prior with the bare trigger ``sks``;
- Textual Inversion and APT: a composition of things the model knows, a large red triangle, named by
  one new token ``zwx`` (TI cannot teach what the model does not know);
- Hypernetwork: a style on every prompt, "everything purple": world pictures whose object is purple,
  captioned with their world caption (``a small red square`` shows a purple square), so the shape
  must stay while the colour moves;
- aesthetic embedding: a *look* taken from an image set, 16 blue world pictures; nothing trains:
  the embedding is the set's mean toy-CLIP image feature (the plugin's ``create``) and world
  prompts of the other colours are generated with aesthetic gradients applied
  (``sdcore generate --aesthetic``); the look is met when they come out blue with their shapes kept.

:data:`METHODS` holds the settings each method is benchmarked with on the toy world (its "toy
setting") and the learning rates the sweep tries around it. These are *not* the methods' shipped
defaults, which mirror kohya / A1111 for real models; each method's README says which toy setting
met its goal and why it differs (see benchmarks/RESULTS.md for the measurements).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

OBJECT, COMPOSITION, STYLE, LOOK = "new object", "known composition", "style", "image set's look"

STYLE_COLOUR = "purple"
"""The hypernetwork's style: every object drawn in this colour (the world has no purple)."""

LOOK_COLOUR = "blue"
"""The aesthetic embedding's image set: world pictures all of this (known) colour."""
LOOK_IMAGES = 16
"""Pictures in the aesthetic embedding's image set."""

IMAGES = 8
"""Pictures of the concept (the issue's "8 images")."""
CLASS_CAPTION = "a {size} bnp circle"
"""DreamBooth's "a [V] [class]" caption of the new object's pictures (and its prompts): the class noun
``circle`` (the ring's nearest shape in the world) and ``bnp``, a one-token identifier the base model
draws red in this sentence (16 of 16 samples of ``a large bnp circle``). ``sks``, ``ohwx``, ``zwx``,
``tok`` and ``kx`` are drawn purple in the same sentence, which would hand the concept its colour."""

REG_IMAGES = 48
"""World pictures with world captions used as regularisation (prior-preservation) images."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method: its class, the concept kind, its toy setting and the sweep's rates."""

    key: str
    label: str
    method: str  # "module:Class"
    kind: str
    apply: str  # how a result is used at generation: lora | embedding | apt | hypernet | model | aesthetic
    lr: float  # aesthetic: the tuning lr of generation-time personalisation
    steps: int  # aesthetic: its tuning steps
    overrides: dict[str, Any]
    sweep_lrs: tuple[float, ...]
    reg: bool = False  # regularisation images of world captions (prior preservation)
    # caption template of the concept pictures and the concept prompts, e.g. "a {size} {trigger} circle"
    # (None: the bare trigger); `--caption` overrides it for every method
    caption: str | None = None

    def method_class(self) -> Any:
        module, name = self.method.split(":")
        return getattr(importlib.import_module(module), name)


_LORA = "sdplugin_lora.method:LoraMethod"
_RANK = {"rank": 8, "alpha": 8.0}
_LORA_LRS = (1e-3, 2e-3, 4e-3)
_DB_LRS = (2e-5, 5e-5, 1e-4)

METHODS: dict[str, MethodSpec] = {
    spec.key: spec
    for spec in (
        # the LoRA family trains with the prior's world pictures, so its pictures are captioned as DreamBooth
        # captions them (CLASS_CAPTION); the lr x steps at which each reaches the ring in about half of the
        # samples with the world kept, over 3 seeds (benchmarks/RESULTS.md, "the LoRA family captioned as
        # DreamBooth captions"); LoKr keeps the world only below the lr that teaches the ring
        MethodSpec("lora", "LoRA (rank 8)", _LORA, OBJECT, "lora", 4e-3, 400, {**_RANK, "algo": "lora"}, _LORA_LRS,
                   reg=True, caption=CLASS_CAPTION),
        MethodSpec("locon", "LoCon (rank 8, conv 8)", _LORA, OBJECT, "lora", 2e-3, 200,
                   {**_RANK, "algo": "locon", "conv_rank": 8, "conv_alpha": 8.0}, _LORA_LRS, reg=True,
                   caption=CLASS_CAPTION),
        MethodSpec("loha", "LoHa (rank 8)", _LORA, OBJECT, "lora", 4e-3, 600, {**_RANK, "algo": "loha"}, _LORA_LRS,
                   reg=True, caption=CLASS_CAPTION),
        MethodSpec("lokr", "LoKr (rank 8)", _LORA, OBJECT, "lora", 1.6e-2, 400, {**_RANK, "algo": "lokr"},
                   (4e-3, 8e-3, 1.6e-2), reg=True, caption=CLASS_CAPTION),
        MethodSpec("dora", "DoRA (rank 8)", _LORA, OBJECT, "lora", 4e-3, 400, {**_RANK, "algo": "dora"}, _LORA_LRS,
                   reg=True, caption=CLASS_CAPTION),
        MethodSpec("dreambooth", "DreamBooth (UNet)", "sdplugin_dreambooth.method:DreamBoothMethod", OBJECT, "model",
                   1e-4, 100, {"save_format": "diffusers"}, _DB_LRS),
        # DreamBooth's own protocol, "a [V] [class]" captions, at kohya's prior loss weight 1: the prior's world
        # pictures then hold the class ("circle") while the instance prompt learns the ring (benchmarks/RESULTS.md,
        # "DreamBooth with prior preservation, captioned as DreamBooth captions"); with the bare trigger the prior
        # also held the empty prompt and CFG cancelled the ring (0.08 at weight 1, 0.25 at weight 0.25)
        MethodSpec("dreambooth-prior", "DreamBooth + prior preservation", "sdplugin_dreambooth.method:DreamBoothMethod",
                   OBJECT, "model", 1e-4, 300, {"save_format": "diffusers"}, (5e-5, 1e-4, 2e-4), reg=True,
                   caption=CLASS_CAPTION),
        MethodSpec("ti", "Textual Inversion (4 vectors)", "sdplugin_ti.method:TIMethod", COMPOSITION, "embedding",
                   2e-2, 150, {"name": "zwx", "vectors": 4}, (5e-3, 2e-2, 5e-2)),
        MethodSpec("apt", "APT / DreamArtist", "sdplugin_apt.method:APTMethod", COMPOSITION, "apt",
                   2e-2, 900, {"name": "zwx", "vectors": 4, "neg_vectors": 1}, (1e-2, 2e-2, 5e-2)),
        # caption dropout 0.1: the hypernetwork also acts on the sampler's empty-prompt (CFG) pass, which
        # it must learn too (benchmarks/RESULTS.md, "Hypernetwork style on the toy world")
        MethodSpec("hn", "Hypernetwork (1,2,1)", "sdplugin_hn.method:HNMethod", STYLE, "hypernet",
                   1e-3, 400, {"template": "hypernetwork", "caption_dropout": 0.1}, (3e-4, 1e-3, 3e-3)),
        # nothing trains: lr and steps are the generation-time tuning's, at the plugin's (A1111's) defaults
        MethodSpec("aesthetic", "aesthetic embedding", "", LOOK, "aesthetic", 1e-4, 5, {"aesthetic_weight": 0.9},
                   (1e-4, 1e-3, 5e-3)),
    )
}  # fmt: skip
"""The benchmarked methods in the order they run (``--methods`` picks by key)."""


def concept_of(kind: str) -> Any:
    """The :class:`~sdcore.testing.toyworld.concepts.Concept` a kind teaches (for STYLE: the style's colour)."""
    from sdcore.testing.toyworld.concepts import NEW_OBJECT, Concept

    if kind == OBJECT:
        return NEW_OBJECT
    if kind == COMPOSITION:
        return Concept("zwx", "red", "triangle", sizes=("large",))
    return Concept("style", STYLE_COLOUR, None)


def write_concept_data(root: Path, kind: str, *, count: int = IMAGES, caption: str | None = None) -> Path:
    """The concept's kohya dataset under ``root`` (returns ``root``). ``caption``: a template for the
    new object's and the composition's captions, e.g. ``"a {size} {trigger}"`` (default: the trigger)."""
    from sdcore.testing.toyworld import world_scenes, write_dataset

    if kind == STYLE:
        scenes = world_scenes(count * 4, seed=5)  # a style needs the world's variety: 32 pictures
        recoloured = [dataclasses.replace(s, colour=STYLE_COLOUR) for s in scenes]
        folder = write_dataset(root, recoloured, name="style", captions=False)
        for index, scene in enumerate(scenes):  # the world caption, with the world colour
            (folder / f"{index:03d}.txt").write_text(scene.caption, encoding="utf-8")
        return root
    concept = concept_of(kind)
    if caption is None:
        concept.write_dataset(root, count=count)
        return root
    assert concept.colour is not None and concept.shape is not None
    scenes = world_scenes(count, 3, shapes=[concept.shape], colours=[concept.colour], sizes=concept.sizes)
    write_dataset(
        root, scenes, name=concept.trigger, caption_text=lambda s: caption.format(trigger=concept.trigger, size=s.size)
    )
    return root


def write_look_data(root: Path, seed: int, *, count: int = LOOK_IMAGES) -> Path:
    """The aesthetic embedding's image set: ``count`` world pictures in :data:`LOOK_COLOUR` (no captions);
    ``seed`` picks the pictures."""
    from sdcore.testing.toyworld import world_scenes, write_dataset

    return write_dataset(root, world_scenes(count, 5 + seed, colours=[LOOK_COLOUR]), captions=False)


def look_prompts(prompts: list[str]) -> list[str]:
    """The world prompts the look is asked of: those of another colour than the set's."""
    from sdcore.testing.toyworld.evaluate import parse_caption

    return [p for p in prompts if parse_caption(p)[1] != LOOK_COLOUR]


def write_reg_data(root: Path, *, count: int = REG_IMAGES) -> Path:
    """Regularisation images of world captions: rendered world pictures with their captions."""
    from sdcore.testing.toyworld import world_scenes, write_dataset

    write_dataset(root, world_scenes(count, seed=11), name="world")
    return root


def write_name_template(path: Path) -> Path:
    """A TI/APT prompt template of one line, ``[name]``: the toy world's prompts are bare names
    (A1111's built-in templates say "a photo of ...", words the toy world never saw)."""
    path.write_text("[name]\n", encoding="utf-8")
    return path
