"""A1111's "Variation seed", "Variation strength" and "Resize seed from width/height": one function
for the initial noise of every family.

What A1111 does (``modules/rng.py`` ``ImageRNG.first`` and ``slerp``, ``modules/processing.py``
``process_images_inner`` and ``create_infotext``; facts rewritten here):

- **Batch** (``process_images_inner``): image ``i`` uses subseed ``subseed + i``; its seed is ``seed + i``
  only while the variation strength is 0, otherwise every image has ``seed`` itself (a batch then shows
  variations of one image).
- **Noise of one image**, a ``[C, h, w]`` latent: the seed's noise is the first draw of a CPU generator
  seeded with the seed (sdcore's "RNG: CPU"); with a strength ``s`` above 0 the subseed's noise is drawn
  the same way and the two are slerp'd, ``slerp(s, seed_noise, subseed_noise)``: ``s = 0`` is the seed's
  noise, ``s = 1`` exactly the subseed's.
- **slerp** treats each column of each channel (a ``[C, :, w]`` slice, the norm along the height axis) as a
  vector: ``omega = acos(<a/|a|, b/|b|>)``, result ``sin((1 - s) omega) / sin(omega) * a + sin(s omega) /
  sin(omega) * b``; when the mean cosine is above 0.9995 it is the linear ``s * a + (1 - s) * b`` instead.
- **Resize seed from** ``W0 x H0``: the seed's (and the subseed's) noise is drawn at ``[C, H0 // 8, W0 // 8]``
  (a fresh generator each), slerp'd there, and pasted centred into the seed's noise at the real size
  (the generator's first draw at that size): offsets ``d = (full - small) // 2`` per side; a larger small
  side is cropped by ``-d`` at its start and keeps ``small + 2 d`` (so an odd difference loses its last
  row/column to the full-size noise), a smaller one is pasted at ``d``. The composition of an image made
  at ``W0 x H0`` then mostly survives at another size.
- **Later noise**: ancestral samplers and the hires pass's start noise keep drawing from the seed's
  generator only (A1111's ``ImageRNG.next``); the hires pass draws its start noise with a new ``ImageRNG``
  at the large latent's shape, with the same subseeds, strength and resize.
- **Infotext**: "Variation seed" (the image's subseed) and "Variation seed strength" when the strength is
  not 0, "Seed resize from: WxH" when both sides are above 0, after "Model" and before "Denoising strength".

How sdcore hands the noise to each pipeline: :meth:`ImageNoise.initial` draws the full-size noise from the
pipeline's own per-image generators (consuming their first draw as the pipeline would, so an ancestral
sampler's later noise is the same as without variation), applies the variation and is given as
``latents=`` (diffusers scales it by ``init_noise_sigma`` exactly as its own draw; Flux and Chroma get it
packed). Where a pipeline draws the noise itself (img2img, the SD hires pass), :meth:`ImageNoise.swapped`
rewrites that draw where the scheduler adds it to the image. With strength 0 and no resize the noise is
the plain run's, bit for bit. Every draw is float32 on the CPU generators, then the model's dtype, as
A1111's (:mod:`.rng`). One difference from A1111: where the pipeline adds the noise itself to a
half-precision model's image (fp16/bf16 models, img2img and the SD hires pass), the slerp starts from the
float32 draw rounded to that dtype where A1111 slerps the float32 draw (the txt2img start and the flow
hires start slerp the float32 draw).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: A1111's "Variation seed" infotext fields, in its order (``create_infotext``)
VARIATION_SEED = "Variation seed"
VARIATION_STRENGTH = "Variation seed strength"
SEED_RESIZE_FROM = "Seed resize from"


@dataclass(frozen=True)
class VariationSeeds:
    """A1111's seed extras of one generation: ``subseed`` (image ``i`` uses ``subseed + i``), ``strength``
    in [0, 1] and ``resize_from`` ``(width, height)`` in pixels (``None``: off)."""

    subseed: int = 0
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None

    def problems(self, factor: int = 8) -> list[str]:
        """What is wrong with these settings, one phrase each (``factor``: the VAE's)."""
        found = []
        if not 0.0 <= self.strength <= 1.0:
            found.append(f"--subseed-strength must be in [0, 1], got {self.strength}")
        if self.strength > 0 and self.subseed < 0:
            found.append(f"the variation seed must be 0 or more (draw -1's random one first), got {self.subseed}")
        if self.resize_from is not None and min(self.resize_from) < factor:
            width, height = self.resize_from
            found.append(f"--seed-resize-from {width}x{height}: each side must be at least {factor} pixels")
        return found

    def batch(self, seed: int, count: int) -> tuple[list[int], list[int]]:
        """``(seeds, subseeds)`` of a ``count``-image batch: A1111's rule (module doc)."""
        step = 1 if self.strength == 0 else 0
        return [seed + i * step for i in range(count)], [self.subseed + i for i in range(count)]

    def infotext_fields(self, subseed: int) -> dict[str, Any]:
        """The image's infotext fields (``subseed``: its own), only those A1111 writes."""
        fields: dict[str, Any] = {}
        if self.strength != 0:
            fields[VARIATION_SEED] = subseed
            fields[VARIATION_STRENGTH] = float(self.strength)
        if self.resize_from is not None:
            fields[SEED_RESIZE_FROM] = f"{self.resize_from[0]}x{self.resize_from[1]}"
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> VariationSeeds | None:
        """The settings an infotext's fields describe (``None`` when they have none); raises ``ValueError``."""
        resize = None
        if SEED_RESIZE_FROM in fields:
            width, _, height = fields[SEED_RESIZE_FROM].partition("x")
            if int(width) > 0 and int(height) > 0:
                resize = (int(width), int(height))
        strength = float(fields.get(VARIATION_STRENGTH, 0.0))
        subseed = int(fields.get(VARIATION_SEED, 0)) if strength != 0 else 0
        if strength == 0 and resize is None:
            return None
        return cls(subseed, strength, resize)


def batch_seeds(seed: int, count: int, variation: VariationSeeds | None) -> list[int]:
    """Each image's seed: ``seed + i``, or ``seed`` for all with a variation strength (A1111)."""
    return (variation or VariationSeeds()).batch(seed, count)[0]


def slerp(strength: float, low: Any, high: Any) -> Any:
    """A1111's slerp of two ``[C, h, w]`` noises (see the module doc: per channel column)."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_norm * high_norm).sum(1)
    if cosine.mean() > 0.9995:  # A1111's fallback (note its weights: strength on the first)
        return low * strength + high * (1 - strength)
    omega = torch.acos(cosine)
    sine = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / sine).unsqueeze(1) * low + (
        torch.sin(strength * omega) / sine
    ).unsqueeze(1) * high


def _draw(seed: int, shape: tuple[int, ...]) -> Any:
    import torch

    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(int(seed)))


@dataclass
class ImageNoise:
    """The variation of one pipeline call's images (``seeds[i]``, ``subseeds[i]`` for image ``i``);
    ``resize_from`` in latent pixels ``(height, width)`` (A1111's ``size // 8``)."""

    seeds: list[int]
    subseeds: list[int]
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None
    _cursor: int = field(default=0, repr=False)

    @classmethod
    def of(cls, variation: VariationSeeds, seeds: Sequence[int], subseeds: Sequence[int], factor: int) -> ImageNoise:
        resize = None
        if variation.resize_from is not None:
            resize = (variation.resize_from[1] // factor, variation.resize_from[0] // factor)
        return cls(list(seeds), list(subseeds), float(variation.strength), resize)

    def apply(self, base: Any, first: int = 0) -> Any:
        """The variation of ``base`` ``[B, C, h, w]``, each image's noise as drawn from its seed's generator
        (images ``first ..`` of the call); a new tensor of ``base``'s dtype and device (float32 inside)."""
        import torch

        out = []
        for row, noise in enumerate(base.float().cpu()):
            out.append(self._one(noise, first + row))
        return torch.stack(out).to(device=base.device, dtype=base.dtype)

    def _one(self, full: Any, index: int) -> Any:
        channels, height, width = full.shape
        small = (channels, *self.resize_from) if self.resize_from is not None else full.shape
        resized = tuple(small) != tuple(full.shape)
        noise = _draw(self.seeds[index], tuple(small)) if resized else full
        if self.strength != 0:
            noise = slerp(self.strength, noise, _draw(self.subseeds[index], tuple(small)))
        if not resized:
            return noise
        out = full.clone()
        dx, dy = (width - small[2]) // 2, (height - small[1]) // 2
        w = small[2] if dx >= 0 else small[2] + 2 * dx
        h = small[1] if dy >= 0 else small[1] + 2 * dy
        tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
        out[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
        return out

    def initial(self, shape: tuple[int, int, int], dtype: Any, generators: Sequence[Any]) -> Any:
        """A txt2img call's start noise ``[B, C, h, w]`` (unscaled, unpacked) from the pipeline's per-image
        CPU ``generators``, drawn in float32 as the pipeline's own draw (:func:`.rng.randn_float32`) and consuming
        it, varied in float32, then ``dtype``."""
        import torch

        from .rng import randn_float32

        base = randn_float32((len(generators), *shape), generator=list(generators), dtype=torch.float32)
        return self.apply(base).to(dtype)

    @contextlib.contextmanager
    def swapped(self, scheduler: Any) -> Iterator[None]:
        """While inside, the noise a pipeline adds to an image (img2img, the SD hires pass: the scheduler's
        ``add_noise``, a flow scheduler's ``scale_noise``) is varied; calls take the images in order (a
        stochastic flow sampler renders one image a call)."""
        flow = hasattr(scheduler, "scale_noise")  # flow: scale_noise(sample, timestep, noise)
        name = "scale_noise" if flow else "add_noise"  # add_noise(original_samples, noise, timesteps)
        original = getattr(scheduler, name)
        own = vars(scheduler).get(name)
        self._cursor = 0

        def varied(noise: Any) -> Any:
            first = self._cursor
            self._cursor += noise.shape[0]
            return self.apply(noise, first)

        def scale_noise(sample: Any, timestep: Any, noise: Any) -> Any:
            return original(sample, timestep, varied(noise))

        def add_noise(sample: Any, noise: Any, timesteps: Any) -> Any:
            return original(sample, varied(noise), timesteps)

        setattr(scheduler, name, scale_noise if flow else add_noise)
        try:
            yield
        finally:
            if own is None:
                delattr(scheduler, name)
            else:
                setattr(scheduler, name, own)


def maybe_swapped(noise: ImageNoise | None, scheduler: Any) -> contextlib.AbstractContextManager[Any]:
    """:meth:`ImageNoise.swapped`, or nothing without a variation."""
    return contextlib.nullcontext() if noise is None else noise.swapped(scheduler)


__all__ = [
    "SEED_RESIZE_FROM",
    "VARIATION_SEED",
    "VARIATION_STRENGTH",
    "ImageNoise",
    "VariationSeeds",
    "batch_seeds",
    "maybe_swapped",
    "slerp",
]
