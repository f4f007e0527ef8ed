"""A1111's "Hires. fix": a txt2img pass at the base size, an upscale, and an img2img pass at the large size.

What A1111 does (``modules/processing.py`` ``StableDiffusionProcessingTxt2Img``, facts rewritten here):

- **Target size** (``calculate_target_resolution``): with ``hr_scale`` ``s`` and no resize, the upscale goes
  to ``int(width * s) x int(height * s)``. With ``--hr-resize-x/-y`` one side 0 keeps the aspect ratio
  (``x * height // width``); both given, the image is scaled to cover that box and the latent cropped
  afterwards by ``(upscaled - wanted) // 8`` latent pixels, half on each side (the extra one at the end).
  The latent is ``size // 8`` (the VAE floors odd sizes as well), so the final image is the target rounded
  down to a multiple of 8: 1.5 x 500 = 750 gives 744.
- **Upscalers**: the ``Latent`` modes interpolate the first pass's latent (``torch.nn.functional.interpolate``
  with the mode and antialias of A1111's ``latent_upscale_modes``); the image upscalers decode it, upscale
  the 8-bit image (A1111's ``images.resize_image``: the upscaler to ``(w * scale) // 8 * 8``, then Lanczos
  to the exact size) and encode it again. Only the upscalers A1111 has without a model are offered
  (``Lanczos``, ``Nearest``); ESRGAN and friends need weights sdcore does not ship.
- **Steps** (``sd_samplers_common.setup_img2img_steps`` with an explicit step count): the second pass
  runs exactly ``hr_steps`` (0: the first pass's steps) on a schedule of ``int(hr_steps / min(strength,
  0.999))`` steps, starting ``hr_steps`` steps before its end; strength 0 runs none (the upscaled latent
  is decoded as it is).
- **Noise**: fresh noise drawn from each image's own seed at the large latent's shape, as the first pass does.
- **Prompts**: the hires prompt (default the prompt) is scheduled with A1111's hires offsets (an integer
  step counts from the first pass's steps, a fraction from 1.0: ``[a:b:1.5]`` switches half-way through
  the second pass); its networks are the ones its tags name.

Encoding an upscaled image takes the VAE posterior's mean where A1111 draws a sample from its global
RNG (which no seed fixes): the image depends on its seed alone.

**Flow-matching families** (SD3/SD3.5, FLUX.1, Chroma) run the same rules, as Forge runs them
(lllyasviel/stable-diffusion-webui-forge, ``modules/sd_samplers_kdiffusion.py`` ``sample_img2img`` with the
flow predictor of ``backend/modules/k_prediction.py``; facts rewritten here):

- The second pass runs the last ``hr_steps`` steps of an ``int(hr_steps / min(strength, 0.999))``-step
  schedule, as on SD; the start latent is noised at that step's sigma the flow way,
  ``(1 - sigma) * x0 + sigma * noise`` (Forge's ``noise_scaling`` of a flow model). This is not diffusers'
  img2img ``strength`` rule (there a ``steps``-step schedule cut to about ``steps * strength`` steps), which
  Forge users would not recognise: ``--hr-steps 10 --denoising-strength 0.5`` runs 10 steps of a 20-step
  schedule.
- The sigmas are the family pipeline's for the large image (its shift; FLUX.1-dev's and Chroma's dynamic
  shift ``mu`` from the large image's sequence length, as diffusers' pipelines compute it). Forge fixes
  ``mu`` instead (FLUX.1-dev: the value of a 1024x1024 image whatever the size; Chroma: 1.0), as it does
  for its first pass; sdcore's first pass follows diffusers, and so does its second.
- Sizes: these models take latents of even sides (SD3's 2x2 patches, Flux's and Chroma's 2x2 packing), so
  the target is rounded down to a multiple of 16 pixels where the SD families round to 8 (1.5 x 496 = 744
  gives 736; a "Hires resize" crop counts 16-pixel units). Forge pads the odd latent and makes 744.
- Each family's pipeline runs the pass (:class:`FlowStart`, :func:`flow_second_pass`): the prompt
  encoding, CFG, true CFG, distilled guidance and masks are those of its first pass (Forge's "Hires CFG
  Scale" and, on FLUX.1, "Hires Distilled CFG Scale" replace the CFG and the distilled guidance: ``HiresFix.cfg``,
  ``HiresFix.distilled_cfg``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from ..models.bundle import ModelBundle
    from .variation import ImageNoise

#: A1111's ``shared.latent_upscale_modes``: name -> (torch interpolate mode, antialias)
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
#: the image upscalers A1111 has without a model (``modules/upscaler.py``) -> PIL filter name
IMAGE_UPSCALERS: dict[str, str] = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}
#: A1111's txt2img defaults (the UI's "Upscale by", "Denoising strength", "Upscaler")
DEFAULT_SCALE = 2.0
DEFAULT_DENOISING_STRENGTH = 0.7
DEFAULT_UPSCALER = "Latent"
#: the largest image side ``sdcore generate`` makes (first pass and hires): a WebP holds 16383, and a typo's
#: ``--size 1000000000000`` or ``--hr-scale 1e12`` overflowed torch's size computation in a traceback
MAX_SIDE = 16384


def upscaler_name(name: str) -> str:
    """A1111's spelling of an upscaler (``latent (bicubic)`` -> ``Latent (bicubic)``), or a one-line error."""
    for known in (*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS):
        if name.strip().lower() == known.lower():
            return known
    choices = ", ".join(repr(n) for n in (*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS))
    raise ConfigError(f"unknown hires upscaler {name!r}; choose one of: {choices} (model upscalers are not supported)")


@dataclass(frozen=True)
class HiresFix:
    """The second pass's settings, named and defaulted as A1111's txt2img has them.

    ``prompt``/``negative_prompt``/``sampler`` ``None``: the first pass's. ``steps`` 0: the first pass's.
    ``resize_x``/``resize_y`` (0 = unset) take over from ``scale`` when either is set.

    ``cfg`` and ``distilled_cfg`` are Forge's "Hires CFG Scale" and "Hires Distilled CFG Scale" (its txt2img
    ``hr_cfg``/``hr_distilled_cfg``), ``None``: the first pass's. ``cfg`` is the pass's real CFG scale (on
    FLUX.1 its true CFG, ``--true-cfg-scale``), ``distilled_cfg`` FLUX.1's embedded guidance (its ``--cfg``).
    """

    scale: float = DEFAULT_SCALE
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = DEFAULT_UPSCALER
    steps: int = 0
    denoising_strength: float = DEFAULT_DENOISING_STRENGTH
    prompt: str | None = None
    negative_prompt: str | None = None
    sampler: str | None = None
    cfg: float | None = None
    distilled_cfg: float | None = None

    def problems(self) -> list[str]:
        """Everything wrong with these settings, one line each (checked before a model loads)."""
        found = []
        try:
            upscaler_name(self.upscaler)
        except ConfigError as exc:
            found.append(str(exc))
        if not self.scale > 0 or not math.isfinite(self.scale):
            found.append(f"--hr-scale must be a positive number, got {self.scale}")
        if self.resize_x < 0 or self.resize_y < 0:
            found.append(f"--hr-resize-x/-y must be 0 or more, got {self.resize_x}x{self.resize_y}")
        if max(self.resize_x, self.resize_y) > MAX_SIDE:
            found.append(f"--hr-resize-x/-y must be at most {MAX_SIDE}, got {self.resize_x}x{self.resize_y}")
        if self.steps < 0:
            found.append(f"--hr-steps must be 0 (the first pass's) or more, got {self.steps}")
        if not 0.0 <= self.denoising_strength <= 1.0:
            found.append(f"--denoising-strength must be in [0, 1], got {self.denoising_strength}")
        for option, value in (("--hr-cfg", self.cfg), ("--hr-distilled-cfg", self.distilled_cfg)):
            if value is not None and not math.isfinite(value):
                found.append(f"{option} must be a finite number, got {value}")
        if self.sampler is not None:
            from .pipeline import sampler_id

            try:
                sampler_id(self.sampler)
            except ConfigError as exc:
                found.append(f"--hr-sampler: {exc}")
        return found

    @property
    def latent_mode(self) -> tuple[str, bool] | None:
        """(interpolate mode, antialias) of a ``Latent`` upscaler, ``None`` for an image upscaler."""
        return LATENT_UPSCALE_MODES.get(upscaler_name(self.upscaler))

    def target(self, width: int, height: int, factor: int = 8) -> tuple[int, int, int, int]:
        """``(upscale_to_x, upscale_to_y, truncate_x, truncate_y)`` for a first pass of ``width x height``
        (A1111's ``calculate_target_resolution``; the truncations are in latent pixels of ``factor``)."""
        rx, ry = self.resize_x, self.resize_y
        if rx == 0 and ry == 0:
            return int(width * self.scale), int(height * self.scale), 0, 0
        if ry == 0:
            return rx, rx * height // width, 0, 0
        if rx == 0:
            return ry * width // height, ry, 0, 0
        if width / height < rx / ry:
            to_x, to_y = rx, rx * height // width
        else:
            to_x, to_y = ry * width // height, ry
        return to_x, to_y, (to_x - rx) // factor, (to_y - ry) // factor

    def final_size(self, width: int, height: int, factor: int = 8) -> tuple[int, int]:
        """The size of the image the second pass makes (the cropped latent times ``factor``)."""
        to_x, to_y, tx, ty = self.target(width, height, factor)
        return (to_x // factor - tx) * factor, (to_y // factor - ty) * factor

    def schedule(self, first_steps: int) -> tuple[int, int]:
        """``(schedule steps, steps run)`` of the second pass (A1111's ``setup_img2img_steps`` when it is
        given the steps): the last ``run`` steps of a ``schedule``-step sampler; (0, 0) at strength 0."""
        return img2img_steps(first_steps, self.denoising_strength, requested=self.steps or first_steps)

    def infotext_fields(
        self,
        prompt: str,
        negative_prompt: str,
        sampler: str,
        bundle: ModelBundle | None = None,
        *,
        cfg: float | None = None,
        distilled_cfg: float | None = None,
    ) -> dict[str, Any]:
        """A1111's infotext fields for this pass, in A1111's order ("Denoising strength" is placed by the
        caller where A1111 writes it): "Hires sampler"/"Hires prompt"/"Hires negative prompt" only when they
        differ from the first pass's, then Forge's "Hires CFG Scale"/"Hires Distilled CFG Scale" when they
        differ from the first pass's ``cfg`` ("CFG scale") and ``distilled_cfg`` ("Distilled CFG Scale"),
        "Hires upscale" or "Hires resize", "Hires steps" when set, "Hires upscaler". (Forge writes its two on
        every hires image; an infotext without them reads as the first pass's values here, and A1111, which
        has no hires CFG, gets the fields it knows; ``distilled_cfg`` None, a model without the guidance, FLUX.1
        schnell included, writes no hires one, as Forge.)

        With ``bundle``, a differing hires sampler also gets "Hires schedule type", decided as the first
        pass's "Schedule type" is (:func:`~sdcore.generate.pipeline.schedule_type_field`): A1111 1.9+ reads
        a plain "Hires sampler: DPM++ 2M" with its Automatic (Karras) schedule, sdcore ran uniform sigmas.
        A missing field means "Use same scheduler" there, so when the first pass names its schedule and the
        hires sampler's is A1111's Automatic, "Automatic" is written rather than nothing."""
        from .pipeline import sampler_id, sampler_label, schedule_type_field

        fields: dict[str, Any] = {}
        if self.sampler is not None and sampler_id(self.sampler) != sampler_id(sampler):
            fields["Hires sampler"] = sampler_label(self.sampler)
            if bundle is not None:
                schedule = schedule_type_field(bundle, self.sampler)
                if schedule is None and schedule_type_field(bundle, sampler) is not None:
                    schedule = "Automatic"
                if schedule is not None:
                    fields["Hires schedule type"] = schedule
        if self.prompt is not None and self.prompt != prompt:
            fields["Hires prompt"] = self.prompt
        if self.negative_prompt is not None and self.negative_prompt != negative_prompt:
            fields["Hires negative prompt"] = self.negative_prompt
        if self.cfg is not None and self.cfg != cfg:
            fields["Hires CFG Scale"] = float(self.cfg)
        if self.distilled_cfg is not None and distilled_cfg is not None and self.distilled_cfg != distilled_cfg:
            fields["Hires Distilled CFG Scale"] = float(self.distilled_cfg)
        if self.resize_x == 0 and self.resize_y == 0:
            fields["Hires upscale"] = float(self.scale)
        else:
            fields["Hires resize"] = f"{self.resize_x}x{self.resize_y}"
        if self.steps:
            fields["Hires steps"] = self.steps
        fields["Hires upscaler"] = upscaler_name(self.upscaler)
        return fields


def img2img_steps(steps: int, strength: float, requested: int | None = None) -> tuple[int, int]:
    """``(schedule, run)``: an img2img pass runs the last ``run`` steps of a ``schedule``-step sampler, starting
    from the init latent noised to the sigma (timestep) of its first one (A1111's ``setup_img2img_steps``, whose
    ``t_enc`` is ``run - 1``, and ``sample_img2img``'s ``sigmas[schedule - t_enc - 1:]``; Forge's the same).

    Plain img2img (``requested`` None; A1111's default, "With img2img, do exactly the amount of steps the slider
    specifies" off): the schedule is ``steps`` and ``run`` is ``int(min(strength, 0.999) * steps) + 1``, one step
    more than diffusers' img2img pipelines run (``int(steps * strength)``, from a step later), and never 0: one
    step at strength 0.75 runs that step. The hires pass asks for ``requested`` steps: ``run`` is exactly that,
    on a schedule of ``int(requested / min(strength, 0.999))`` steps; (0, 0) at strength 0 (no pass)."""
    if requested is not None:
        if strength <= 0:
            return 0, 0
        return int(requested / min(strength, 0.999)), requested
    return steps, int(min(strength, 0.999) * steps) + 1


def pipeline_strength(schedule: int, run: int, *, flow: bool = False) -> float:
    """The ``strength`` that makes a diffusers img2img pipeline of ``schedule`` steps run exactly its last ``run``
    (:func:`img2img_steps`): the SD1/SD2/SDXL pipelines run ``int(schedule * strength)`` steps, the flow ones
    (SD3, FLUX.1, Chroma) start at ``int(schedule - schedule * strength)``; half a step inside the boundary, so
    that no rounding of the product moves it."""
    return min(1.0, (run - 0.5 if flow else run + 0.5) / schedule)


def flow_img2img_strength(steps: int, strength: float) -> float:
    """The ``strength`` a flow family's img2img pipeline (SD3, FLUX.1 incl. Fill, Chroma) is given for A1111's
    ``strength``: Forge's plain img2img on those models counts as A1111's (:func:`img2img_steps`; its
    ``sample_img2img``, the flow noise ``(1 - sigma) * x + sigma * noise`` at the first step's sigma, which the
    pipelines' ``scale_noise`` is)."""
    schedule, run = img2img_steps(steps, strength)
    return pipeline_strength(schedule, run, flow=True)


def hires_from_fields(fields: dict[str, str], sampler: str | None = None) -> HiresFix | None:
    """The :class:`HiresFix` an infotext's fields describe, or ``None`` when it has none (A1111 turns the
    hires fix on when "Denoising strength" comes with "Hires upscale", "Hires upscaler" or "Hires resize")."""
    if "Denoising strength" not in fields or not any(
        key in fields for key in ("Hires upscale", "Hires upscaler", "Hires resize")
    ):
        return None
    try:
        resize_x = resize_y = 0
        if "Hires resize" in fields:
            x_text, _, y_text = fields["Hires resize"].partition("x")
            resize_x, resize_y = int(x_text), int(y_text)
        hires_sampler = fields.get("Hires sampler")
        if hires_sampler is not None and hires_sampler != "Use same sampler":
            from .pipeline import sampler_id

            with contextlib.suppress(ConfigError):  # an A1111 label reads as sdcore's id; others stay as written
                hires_sampler = sampler_id(hires_sampler)
        return HiresFix(
            scale=float(fields.get("Hires upscale", DEFAULT_SCALE)),
            resize_x=resize_x,
            resize_y=resize_y,
            upscaler=fields.get("Hires upscaler", DEFAULT_UPSCALER),
            steps=int(fields.get("Hires steps", 0)),
            denoising_strength=float(fields["Denoising strength"]),
            prompt=fields.get("Hires prompt"),
            negative_prompt=fields.get("Hires negative prompt"),
            sampler=None if hires_sampler in (None, "Use same sampler", sampler) else hires_sampler,
            cfg=float(fields["Hires CFG Scale"]) if "Hires CFG Scale" in fields else None,
            distilled_cfg=float(fields["Hires Distilled CFG Scale"]) if "Hires Distilled CFG Scale" in fields else None,
        )
    except ValueError as exc:
        raise ConfigError(f"infotext hires fields are invalid: {exc}") from exc


def upscale_image(image: Image.Image, width: int, height: int, upscaler: str) -> Image.Image:
    """``image`` at ``width x height`` through an image upscaler, as A1111's ``images.resize_image``
    (mode "Just resize") runs it: when enlarging, the upscaler scales by ``max`` of the two ratios to
    ``int(side * scale)``, Lanczos takes that to ``(side * scale) // 8 * 8`` and then to the exact size."""
    from PIL import Image as PILImage

    name = upscaler_name(upscaler)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        resample = getattr(PILImage.Resampling, IMAGE_UPSCALERS[name])
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if image.size != dest:
            image = image.resize(dest, resample=PILImage.Resampling.LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), resample=PILImage.Resampling.LANCZOS)
    return image


def upscale_latents(latents: Any, width: int, height: int, upscaler: str, factor: int = 8, patch: int = 1) -> Any:
    """The first pass's latents interpolated to the latent of a ``width x height`` image (``size // factor``;
    with ``patch``, a multiple of it: ``size // (factor * patch) * patch``)."""
    import torch

    mode, antialias = LATENT_UPSCALE_MODES[upscaler_name(upscaler)]
    size = (height // (factor * patch) * patch, width // (factor * patch) * patch)
    return torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)


def crop_latents(latents: Any, truncate_x: int, truncate_y: int, patch: int = 1) -> Any:
    """A1111's crop of a "Hires resize" box: ``truncate // 2`` units at the start, the rest at the end.

    A unit is a latent pixel, or ``patch`` of them for a family whose latent sides are multiples of
    ``patch`` (the truncations then come from :meth:`HiresFix.target` with ``factor * patch``); the rows
    and columns past the last whole patch (an image upscaler's odd latent side) are dropped first."""
    height, width = latents.shape[-2:]
    height, width = height - height % patch, width - width % patch
    top, bottom = truncate_y // 2 * patch, height - (truncate_y + 1) // 2 * patch
    left, right = truncate_x // 2 * patch, width - (truncate_x + 1) // 2 * patch
    return latents[:, :, top:bottom, left:right]


#: latent pixels per side of a flow family's token: SD3's 2x2 patches, Flux's and Chroma's 2x2 packing
FLOW_PATCH = 2


@dataclass(frozen=True)
class FlowStart:
    """A flow family's second pass, as :func:`sdcore.generate.pipeline.generate_images` hands it to the
    family's ``generate`` (``hires_start=``; that call's ``steps`` is ``run``, its size the latent's).

    ``latents``: the upscaled (and cropped) first pass, clean, ``[B, C, h, w]`` in the denoiser's latent
    space (unpacked); ``schedule``/``run`` from :meth:`HiresFix.schedule`; ``first_steps``: the first
    pass's step count as prompt editing counts it (its hires offsets)."""

    latents: Any
    schedule: int
    run: int
    first_steps: int


class _Probed(Exception):
    """Stops a pipeline call once its scheduler has made its sigmas (see :func:`flow_second_pass`)."""


@contextlib.contextmanager
def last_steps(scheduler: Any, run: int, on_schedule: Callable[[float], None] | None = None) -> Iterator[None]:
    """While inside, a pipeline over ``scheduler`` runs only the last ``run`` steps of the schedule it asks
    for (A1111's ``sigma_sched = sigmas[steps - t_enc - 1:]``), as diffusers' img2img pipelines cut theirs:
    the loop gets the tail of the timesteps (``order`` entries a step: Heun's are doubled) and the scheduler
    begins at its index, keeping its whole schedule for its own bookkeeping (a multistep solver's last step
    is the schedule's). ``on_schedule(sigma)`` is told the first step's sigma each time a schedule is made.
    """
    set_timesteps, set_begin_index, step = scheduler.set_timesteps, scheduler.set_begin_index, scheduler.step
    state: dict[str, Any] = {}

    @functools.wraps(set_timesteps)  # the pipelines read its signature (does it take ``sigmas``?)
    def cut_set_timesteps(*args: Any, **kwargs: Any) -> None:
        set_timesteps(*args, **kwargs)
        order = int(getattr(scheduler, "order", 1) or 1)
        full = scheduler.timesteps
        steps = -(-len(full) // order)  # Heun lists every timestep after the first twice
        begin = max(steps - run, 0) * order
        if on_schedule is not None:
            on_schedule(float(scheduler.sigmas[begin]))
        state.update(full=full, begin=begin)
        scheduler.timesteps = full[begin:]
        set_begin_index(begin)

    def keep_begin(begin_index: int = 0) -> None:  # the pipelines set 0 before their loop
        set_begin_index(state.get("begin", begin_index))

    def first_step(*args: Any, **kwargs: Any) -> Any:
        if "full" in state:  # the pipeline holds the tail; the scheduler gets its whole schedule back
            scheduler.timesteps = state.pop("full")
        return step(*args, **kwargs)

    scheduler.set_timesteps, scheduler.set_begin_index, scheduler.step = cut_set_timesteps, keep_begin, first_step
    try:
        yield
    finally:
        for name in ("set_timesteps", "set_begin_index", "step"):
            vars(scheduler).pop(name, None)
        if "full" in state:
            scheduler.timesteps = state["full"]


@contextlib.contextmanager
def flow_second_pass(
    pipe: Any,
    kwargs: dict[str, Any],
    start: FlowStart,
    seeds: list[int],
    pack: Callable[[Any], Any] | None = None,
    noise: ImageNoise | None = None,
) -> Iterator[None]:
    """Make ``kwargs`` (a flow pipeline's txt2img call at the large size, ``prompt_embeds`` set) the second
    pass of ``start``, and run the pipeline inside for the last ``start.run`` steps only.

    The pipeline's own schedule for ``start.schedule`` steps gives the start sigma (a first call stops as
    soon as the scheduler has made it: the sigmas, shift and ``mu`` are what the pipeline computes for the
    large image); the noise is drawn from each image's seed at the large latent's shape as the pipeline
    draws a txt2img's (per-seed CPU generators, float32 then the embeddings' dtype: :mod:`.rng`), and the start
    is ``(1 - sigma) * x0 + sigma * noise``. ``pack``: the family's latent packing (Flux, Chroma); ``noise``:
    A1111's variation seeds, applied to that noise as its hires pass does (:mod:`.variation`)."""
    import torch

    from .rng import randn_float32

    pack = pack or (lambda x: x)
    x0 = start.latents
    dtype = kwargs["prompt_embeds"].dtype
    kwargs.update(num_inference_steps=start.schedule, latents=pack(x0.to(dtype)))
    found: list[float] = []

    def stop(sigma: float) -> None:
        found.append(sigma)
        raise _Probed

    with contextlib.suppress(_Probed), last_steps(pipe.scheduler, start.run, on_schedule=stop):
        pipe(**kwargs)
    if not found:
        raise RuntimeError(f"{type(pipe).__name__} made no schedule")  # pragma: no cover - a diffusers change
    sigma = found[0]
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    drawn = randn_float32(tuple(x0.shape), generator=generators, device=x0.device, dtype=torch.float32)
    if noise is not None:  # A1111 slerps the float32 draw
        drawn = noise.apply(drawn)
    drawn = drawn.to(dtype)
    kwargs["latents"] = pack(((1.0 - sigma) * x0.float() + sigma * drawn.float()).to(dtype))
    with last_steps(pipe.scheduler, start.run):
        yield


__all__ = [
    "DEFAULT_DENOISING_STRENGTH",
    "DEFAULT_SCALE",
    "DEFAULT_UPSCALER",
    "FLOW_PATCH",
    "IMAGE_UPSCALERS",
    "LATENT_UPSCALE_MODES",
    "FlowStart",
    "HiresFix",
    "crop_latents",
    "flow_img2img_strength",
    "flow_second_pass",
    "hires_from_fields",
    "img2img_steps",
    "last_steps",
    "pipeline_strength",
    "upscale_image",
    "upscale_latents",
    "upscaler_name",
]
