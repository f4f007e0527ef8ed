"""A1111's inpainting with the regular flow-matching models (SD3/SD3.5, FLUX.1 dev/schnell/Kontext, Chroma), as Forge
runs it on them.

Forge inpaints every model through A1111's img2img: the same mask preparation, masked content and paste-back
(:mod:`.inpaint`), and in its CFG denoiser the same per-step blend, the denoised estimate made the init latent
where the latent mask keeps (``denoised * nmask + init * (1 - nmask)``, after CFG; a flow model's denoised
estimate is ``x - sigma * v``), then the final latent blended once more. sdcore runs it on the families' diffusers
img2img pipelines:

- the **start**: the init latent (the VAE posterior's mean, as sdcore's other img2img paths) with A1111's latent
  masked content (``latent noise``: the seed's noise in the hole, the noise the pipeline draws from the same seed;
  ``latent nothing``: zero there), handed to the pipeline as latents, which it noises to the start sigma
  (``(1 - sigma) * x0 + sigma * noise``) as any flow img2img;
- the **blend**: each model output the scheduler steps with is replaced by the one whose denoised estimate is the
  blend (:func:`flow_blended_output`); the sigma of the evaluation is ``timestep / num_train_timesteps``, how
  every diffusers flow scheduler (Euler, Heun, the flow DPM++ and UniPC) lays out its timesteps, so the rule
  holds for every sampler of :mod:`.flow_samplers`. The output stepped with is the guided one (true CFG's or
  real CFG's mix, ``AND``'s sum), as Forge blends after its CFG;
- the **end**: the final latent blended, decoded by the pipeline's own decode, pasted back.

Forge also replaces the unmasked part of the denoiser's input by the init latent noised afresh from its unseeded
global RNG before each call; with the blend, sdcore's unmasked input already is the init latent at that sigma,
with the start's noise (the trajectory of a clean estimate that never moves), so only Forge's unseeded draw is
left out, and an image stays a function of its seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inpaint import PreparedInpaint


def flow_blended_output(output: Any, sample: Any, sigma: float, init_latent: Any, nmask: Any) -> Any:
    """The flow-matching ``output`` (velocity) whose denoised estimate ``sample - sigma * output`` is A1111's blend
    (:func:`.inpaint.blend`) with ``init_latent``. The blend is affine with weights summing to one, so blending
    each CFG branch would give the same as blending their mix."""
    import torch

    from .inpaint import blend

    if sigma <= 0.0:  # no evaluation runs at sigma 0; nothing to rewrite if one did
        return output
    work = torch.promote_types(output.dtype, torch.float32)
    x, v = sample.to(work), output.to(work)
    target = blend(x - sigma * v, init_latent.to(x), nmask.to(x))
    return ((x - target) / sigma).to(output.dtype)


@dataclasses.dataclass
class FlowInpainting:
    """One inpainting call on a flow pipeline: ``starts`` (``[B, C, h, w]``, one per seed, the pipeline's
    ``image``), the blend's ``init_latent`` (``[1, C, h, w]``) and ``nmask`` (``[1, 1, h, w]``, 1 repaints), and
    ``pack``: the family's latent packing (Flux, Chroma: the scheduler steps the packed tokens)."""

    prepared: PreparedInpaint
    starts: Any
    init_latent: Any
    nmask: Any
    pack: Callable[[Any], Any] | None = None

    @classmethod
    def of(cls, pipe: Any, prepared: PreparedInpaint, seeds: list[int], dtype: Any,
           pack: Callable[[Any], Any] | None = None) -> FlowInpainting:  # fmt: skip
        """Encode ``prepared``'s image with ``pipe``'s VAE and make each seed's start (A1111's masked content)."""
        from .pipeline import inpaint_latents

        starts, init_latent, nmask = inpaint_latents(pipe, prepared, seeds)
        return cls(prepared, starts.to(dtype=dtype), init_latent, nmask, pack)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What the img2img call takes instead of the init image: the starts as latents (the pipelines pass a
        tensor with the VAE's latent channels through unencoded), and the latents back for :meth:`finish`."""
        return {"image": self.starts, "output_type": "latent"}

    @contextlib.contextmanager
    def blending(self, scheduler: Any) -> Iterator[None]:
        """While inside, ``scheduler.step`` steps with :func:`flow_blended_output` of the model output it is given."""
        init_latent, nmask = self.init_latent, self.nmask
        if self.pack is not None:  # the tokens' layout: each 2x2 patch's channels together
            init_latent = self.pack(init_latent)
            nmask = self.pack(nmask.expand_as(self.init_latent).contiguous())
        step = scheduler.step
        own = vars(scheduler).get("step")  # another wrapper's, put back on leaving
        scale = float(scheduler.config.num_train_timesteps)

        def blended_step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            sigma = float(timestep) / scale
            fixed = flow_blended_output(model_output, sample, sigma, init_latent.to(sample.device),
                                        nmask.to(sample.device))  # fmt: skip
            return step(fixed, timestep, sample, *args, **kwargs)

        scheduler.step = blended_step
        try:
            yield
        finally:
            if own is None:
                vars(scheduler).pop("step", None)
            else:
                scheduler.step = own

    def finish(self, pipe: Any, latents: Any, output_type: str = "pil") -> Any:
        """The final latents (``[B, C, h, w]``, unpacked) blended once more, then decoded and pasted back (PIL
        images), or the blended latents with ``output_type="latent"``."""
        from .inpaint import blend
        from .pipeline import decode_latents

        final = blend(latents.float(), self.init_latent.to(latents.device), self.nmask.to(latents.device))
        if output_type == "latent":
            return final.to(latents.dtype)
        return [self.prepared.paste_back(image) for image in decode_latents(pipe, final, "pil")]


__all__ = ["FlowInpainting", "flow_blended_output"]
