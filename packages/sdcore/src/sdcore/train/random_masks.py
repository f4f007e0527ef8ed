"""Random inpainting masks as kohya sd-scripts draws them for ``--train_inpainting`` (v0.10.4+, PRs #2309/#2318).

kohya trains an inpainting UNet on a new procedural mask for every sample each time it is loaded (its
``library/mask_generator.py``, called from the dataset's ``__getitem__`` after crop and flip, at the sample's
pixel size). sdcore draws the same kinds of masks with the same parameters (``--inpainting-masks random``), from
a seed of the run's ``--seed`` and the sample's draw (:meth:`sdcore.train.data.SampleRef.seed`), so a run (and a
resumed run) draws the same masks again; kohya seeds its generator from nothing (``random.Random(None)``), so
its masks never repeat. The rule, in kohya's draw order from one ``random.Random(seed)``:

1. two 31-bit seeds: the cloud noise's, then the polygon/shape's;
2. the kind: cloud 40 %, polygon 35 %, shape 25 % (``random.choices`` with those weights);
3. cloud: the masked share ``uniform(0.1, 0.3)`` of the area; then with probability 0.33 the union with a polygon
   or a shape mask (one ``random.choice`` of the two); polygon: ``randint(1, 2)`` polygons; shape: one.

- cloud: fractional Brownian motion, 4 octaves of uniform noise on a coarse grid (``max(2, int(side / scale))``
  cells, scale 16 then doubling: each octave coarser) upsampled bicubically to the image, amplitudes 1, 1/2,
  1/4, 1/8, normalised; the pixels at or above the ``1 - share`` quantile are masked. kohya upsamples with
  OpenCV's ``INTER_CUBIC``, sdcore with PIL's bicubic (same blobs, not the same pixels: kohya's draws are not
  reproducible anyway).
- polygon: a radius ``uniform(r(0.1), r(0.6))`` with ``r(c) = sqrt(c * W * H / pi)``, a centre
  ``uniform(0.2 r, side - 0.2 r)`` on each axis, 6 vertices at sorted ``uniform(0, 2 pi)`` angles, each at
  ``r * uniform(0.6, 1)`` (irregularity 0.4), filled.
- shape: a box of ``randint(int(W sqrt 0.1), int(W sqrt 0.6))`` by the same of H at ``randint(0, W - w)``,
  ``randint(0, H - h)``, an ellipse or a rectangle with even odds, filled (PIL's inclusive box, as kohya draws).

:func:`wobbly_ellipse` is kohya's mask for inpainting *samples* (``wobbly_ellipse_mask``, seeded by the sample
prompt's seed): one connected blob of about 20 % of the image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

#: the mask kinds and kohya's weights (``mask_generator._TYPE_WEIGHTS``)
KIND_WEIGHTS: tuple[tuple[str, float], ...] = (("cloud", 0.40), ("polygon", 0.35), ("shape", 0.25))
#: the chance a cloud mask is joined by a polygon or shape mask
COMBINE_PROBABILITY = 0.33
#: the cloud's masked share of the area: uniform in this range (kohya's 0.2 +- 0.1 within [0.05, 0.4])
CLOUD_SHARE = (0.1, 0.3)
#: the polygon and shape masks' coverage bounds (random_mask passes 0.1 and 0.6 to both)
COVERAGE = (0.1, 0.6)
#: polygon vertices and how far each may fall inside the radius
POLYGON_POINTS, POLYGON_IRREGULARITY = 6, 0.4
#: fBm octaves, amplitude falloff, the first octave's grid scale
CLOUD_OCTAVES, CLOUD_PERSISTENCE, CLOUD_SCALE = 4, 0.5, 16.0
_SEED_RANGE = 2**31


@dataclass(frozen=True)
class MaskPlan:
    """What one draw decided before any pixel: the kind, a cloud's share and partner, the polygon count and the
    two seeds the pixels are drawn from."""

    kind: str
    noise_seed: int
    shape_seed: int
    share: float = 0.0
    partner: str | None = None
    polygons: int = 1


def plan(seed: int) -> MaskPlan:
    """The draw of mask ``seed`` in kohya's order (:mod:`module docs <sdcore.train.random_masks>`)."""
    rng = random.Random(seed)
    noise_seed = rng.randint(0, _SEED_RANGE)
    shape_seed = rng.randint(0, _SEED_RANGE)
    kind = rng.choices([k for k, _ in KIND_WEIGHTS], weights=[w for _, w in KIND_WEIGHTS])[0]
    if kind == "cloud":
        share = rng.uniform(*CLOUD_SHARE)
        partner = rng.choice(["polygon", "shape"]) if rng.random() < COMBINE_PROBABILITY else None
        return MaskPlan(kind, noise_seed, shape_seed, share=share, partner=partner)
    if kind == "polygon":
        return MaskPlan(kind, noise_seed, shape_seed, polygons=rng.randint(1, 2))
    return MaskPlan(kind, noise_seed, shape_seed)


def render(p: MaskPlan, width: int, height: int) -> Any:
    """The pixels of plan ``p``: float32 ``[height, width]``, 1 = the hole (repaint), 0 = kept."""
    import numpy as np

    if p.kind == "cloud":
        mask = cloud(width, height, p.share, p.noise_seed)
        if p.partner == "polygon":
            mask = np.maximum(mask, polygons(width, height, 1, p.shape_seed))
        elif p.partner == "shape":
            mask = np.maximum(mask, shape(width, height, p.shape_seed))
        return mask
    if p.kind == "polygon":
        return polygons(width, height, p.polygons, p.shape_seed)
    return shape(width, height, p.shape_seed)


def random_mask(width: int, height: int, seed: int) -> Any:
    """kohya's random training mask number ``seed`` at ``width`` x ``height`` (float32, 1 = the hole)."""
    return render(plan(seed), width, height)


def cloud(width: int, height: int, share: float, seed: int) -> Any:
    """The fBm cloud mask with ``share`` of the pixels masked (ties at the cut-off included)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = np.zeros((height, width), dtype=np.float32)
    amplitude, total, scale = 1.0, 0.0, CLOUD_SCALE
    for _ in range(CLOUD_OCTAVES):
        grid = rng.random((max(2, int(height / scale)), max(2, int(width / scale)))).astype(np.float32)
        smooth = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        noise += amplitude * np.asarray(smooth, dtype=np.float32)
        total += amplitude
        amplitude *= CLOUD_PERSISTENCE
        scale *= 2.0
    noise /= total
    return (noise >= np.quantile(noise, 1.0 - share)).astype(np.float32)


def polygons(width: int, height: int, count: int, seed: int) -> Any:
    """``count`` filled irregular polygons (:mod:`module docs <sdcore.train.random_masks>`)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    low, high = (math.sqrt(c * width * height / math.pi) for c in COVERAGE)
    for _ in range(count):
        radius = rng.uniform(low, high)
        cx = rng.uniform(radius * 0.2, width - radius * 0.2)
        cy = rng.uniform(radius * 0.2, height - radius * 0.2)
        angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(POLYGON_POINTS))
        points = []
        for angle in angles:
            r = radius * rng.uniform(1.0 - POLYGON_IRREGULARITY, 1.0)
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=255)
    return _binary(image)


def shape_box(width: int, height: int, seed: int) -> tuple[tuple[int, int, int, int], bool]:
    """The shape mask's box ``(x1, y1, x2, y2)`` (inclusive) and whether it is an ellipse."""
    rng = random.Random(seed)
    low, high = (math.sqrt(c) for c in COVERAGE)
    w = rng.randint(int(width * low), int(width * high))
    h = rng.randint(int(height * low), int(height * high))
    x1, y1 = rng.randint(0, width - w), rng.randint(0, height - h)
    return (x1, y1, x1 + w, y1 + h), rng.random() < 0.5


def shape(width: int, height: int, seed: int) -> Any:
    """A filled axis-aligned ellipse or rectangle (:func:`shape_box`)."""
    from PIL import Image, ImageDraw

    box, ellipse = shape_box(width, height, seed)
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if ellipse else draw.rectangle)(box, fill=255)
    return _binary(image)


def wobbly_ellipse(width: int, height: int, seed: int, coverage: float = 0.2) -> Any:
    """kohya's sample mask (``wobbly_ellipse_mask``): an ellipse of about ``coverage`` of the area (aspect
    ``uniform(0.6, 1.4)``, rotation ``uniform(0, pi)``, centre ``uniform(0.25, 0.75)`` of each side) whose radius
    wobbles by periodic fBm (4 harmonics with random phases, amplitudes halving, scaled to a spread of 0.5),
    drawn as a 128-point polygon; numpy's legacy ``RandomState(seed)`` draws, in kohya's order."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed % 2**32)
    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    aspect, rotation = rng.uniform(0.6, 1.4), rng.uniform(0, math.pi)
    base = math.sqrt(coverage * width * height / (math.pi * aspect))
    a, b = base * math.sqrt(aspect), base / math.sqrt(aspect)
    thetas = np.linspace(0, 2 * math.pi, 128, endpoint=False)
    wobble = np.zeros(128, dtype=np.float32)
    amplitude, total = 1.0, 0.0
    for k in range(1, CLOUD_OCTAVES + 1):
        wobble += amplitude * np.cos(k * thetas + rng.uniform(0, 2 * math.pi))
        total += amplitude
        amplitude *= CLOUD_PERSISTENCE
    wobble /= total
    if wobble.std() > 1e-6:
        wobble = wobble / wobble.std() * 0.5
    points = []
    for theta, w in zip(thetas, wobble, strict=True):
        t = theta - rotation
        r = a * b / math.sqrt((b * math.cos(t)) ** 2 + (a * math.sin(t)) ** 2)
        r = max(r * (1.0 + float(w)), 1.0)
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).polygon(points, fill=255)
    return _binary(image)


def _binary(image: Any) -> Any:
    import numpy as np

    return (np.asarray(image, dtype=np.uint8) >= 128).astype(np.float32)


__all__ = [
    "COMBINE_PROBABILITY",
    "KIND_WEIGHTS",
    "MaskPlan",
    "cloud",
    "plan",
    "polygons",
    "random_mask",
    "render",
    "shape",
    "shape_box",
    "wobbly_ellipse",
]
