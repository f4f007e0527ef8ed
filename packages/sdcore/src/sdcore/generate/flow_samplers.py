"""The flow-matching samplers every flow family (SD3/SD3.5, Flux.1) generates with: one table, one builder.

A flow model's schedule lives in its training scheduler's config (``FlowMatchEulerDiscreteScheduler``):
a static ``shift`` (SD3: 3.0, schnell: 1.0) or, with ``use_dynamic_shifting`` (FLUX.1-dev), a shift
``exp(mu)`` where ``mu`` grows with the image's token count and the pipeline computes it per call. A sampler
here is a diffusers scheduler configured from that config, so every sampler follows the model's shift:

- ``euler``: the flow-matching Euler the references use (SD3's and Flux's default);
- ``euler_a``: the same with fresh noise each step (diffusers' ``stochastic_sampling``); its noise comes
  from torch's global generator (the pipelines hand no generator to ``step``), so :func:`run_pipeline`
  renders each image in its own call with the generator seeded from that image's seed: the image depends
  on its seed alone, as with the other samplers, whatever the batch;
- ``heun``: diffusers' ``FlowMatchHeunDiscreteScheduler`` (two evaluations per step). Its ``set_timesteps``
  takes neither a sigma list nor ``mu``, which ``FluxPipeline`` always passes, and has no dynamic shift.
  Where a pipeline or the model needs those, :func:`flow_scheduler` gives a Heun that runs on the Euler
  scheduler's own schedule (same sigmas, shift and ``mu`` as ``euler``) with Heun's steps: the
  dynamic shift stays exact instead of being dropped;
- ``dpm++2m`` and ``unipc``: diffusers' multistep solvers in their flow mode (``use_flow_sigmas``,
  ``prediction_type="flow_prediction"``, the model's shift as ``flow_shift``, its dynamic shift as
  ``use_dynamic_shifting``), the configuration diffusers' own flow pipelines (SANA, Wan) use. They make
  their own sigmas (``linspace(1, 1/1000, n + 1)``, shifted), not Euler's.

What a sampler cannot do is refused with one line rather than run wrong: a sampler the table lacks
(DDIM, LMS, PNDM assume an epsilon/v noise schedule); ``dpm++2m`` on a fixed-shift model in a pipeline
that always passes ``mu`` (FLUX.1-schnell in ``FluxPipeline``: diffusers' DPM-Solver then insists on the
dynamic shift, which would give schnell a shift it was not trained with); the solvers with an init
image (the flow img2img pipelines noise it with ``scale_noise``, which only the flow-matching schedulers
have); and ``heun`` with an init image where the pipeline hands it sigmas (``FluxImg2ImgPipeline`` then
counts Heun's doubled timesteps as steps, and ``--strength`` 0.5 of 4 steps ran one Euler step instead of two).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class FlowSampler:
    """One flow-matching sampler: its diffusers scheduler class, the config it overrides and its A1111 label."""

    scheduler: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    #: draws fresh noise while sampling (needs :func:`sampler_noise` to be reproducible)
    stochastic: bool = False
    #: a multistep solver in flow mode (its config is mapped from the model's; see the module doc)
    solver: bool = False
    #: its ``set_timesteps`` accepts a ``mu`` it does not use (a fixed-shift model in ``FluxPipeline``)
    ignores_unused_mu: bool = True
    #: it can noise an init image (img2img): the flow-matching schedulers' ``scale_noise``
    img2img: bool = True
    #: model evaluations per step (Heun: 2, its timesteps listed twice)
    order: int = 1


#: id -> sampler; ids are A1111's (``sdcore.generate.pipeline.sampler_id`` reads their names)
FLOW_SAMPLERS: dict[str, FlowSampler] = {
    "euler": FlowSampler("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": False}, "Euler"),
    "euler_a": FlowSampler("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "Euler a", True),
    "heun": FlowSampler("FlowMatchHeunDiscreteScheduler", {}, "Heun", order=2),
    "dpm++2m": FlowSampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
        solver=True,
        ignores_unused_mu=False,
        img2img=False,
    ),
    "unipc": FlowSampler("UniPCMultistepScheduler", {}, "UniPC", solver=True, img2img=False),
}


def quiet_pipeline_import() -> None:
    """Importing diffusers' pipelines makes transformers warn that ``CLIPImageProcessor`` and
    ``SiglipImageProcessor`` want torchvision (IP-Adapter image processors a flow pipeline here never uses):
    two lines telling the user to install a package that does not work with this torch. Call before
    ``import diffusers``; ``SDCORE_VERBOSE=1`` keeps transformers' warnings."""
    import os

    import transformers

    if not os.environ.get("SDCORE_VERBOSE"):
        transformers.utils.logging.set_verbosity_error()


def flow_sampler_id(sampler: str, family: str = "flow-matching") -> str:
    """The table's id of ``sampler`` (A1111 spellings too: ``"Euler a"``, ``k_heun``) or a one-line error."""
    from .pipeline import sampler_id

    try:
        sid = sampler_id(sampler)
    except ConfigError:
        sid = sampler
    if sid not in FLOW_SAMPLERS:
        raise ConfigError(
            f"sampler {sampler!r} does not sample flow-matching models ({family}); "
            f"choose one of: {', '.join(FLOW_SAMPLERS)}"
        )
    return sid


def flow_scheduler(config: Mapping[str, Any], sampler: str = "euler", *, family: str = "flow-matching",
                   pipeline_sigmas: bool = False, img2img: bool = False) -> Any:  # fmt: skip
    """A fresh scheduler for ``sampler`` following the model's schedule ``config`` (its training scheduler's).

    ``pipeline_sigmas``: the pipeline hands ``set_timesteps`` its own sigma list (unless the scheduler makes
    flow sigmas itself) and ``mu`` on every call, as ``FluxPipeline`` does; ``img2img``: for an init image.
    """
    import diffusers

    sid = flow_sampler_id(sampler, family)
    spec = FLOW_SAMPLERS[sid]
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    dynamic = bool(base.get("use_dynamic_shifting"))
    if img2img and (not spec.img2img or (pipeline_sigmas and spec.order > 1)):
        choices = ", ".join(k for k, v in FLOW_SAMPLERS.items() if v.img2img and (v.order == 1 or not pipeline_sigmas))
        raise ConfigError(f"sampler {sid!r} cannot start from an init image on {family} models; use {choices}")
    if pipeline_sigmas and not dynamic and not spec.ignores_unused_mu:
        choices = ", ".join(k for k, v in FLOW_SAMPLERS.items() if v.ignores_unused_mu)
        raise ConfigError(
            f"sampler {sid!r} cannot sample this {family} model: its schedule has a fixed shift, and the pipeline "
            f"passes a resolution shift that diffusers' {spec.scheduler} would then apply; use {choices}"
        )
    if spec.scheduler == "FlowMatchEulerDiscreteScheduler":
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config({**base, **spec.overrides})
    cls = getattr(diffusers, spec.scheduler)
    if spec.solver:
        solver = {
            "num_train_timesteps": base.get("num_train_timesteps", 1000),
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
            "flow_shift": float(base.get("shift", 1.0)),
            "use_dynamic_shifting": dynamic,
            "time_shift_type": base.get("time_shift_type", "exponential"),
        }
        if pipeline_sigmas:  # the solver's own flow sigmas, as FluxPipeline arranges; ChromaPipeline does not
            cls = _own_sigmas(cls)
        return cls.from_config({**solver, **spec.overrides})
    if pipeline_sigmas or dynamic:
        return _euler_schedule_heun()(base)
    keep = set(cls.from_config({}).config)
    return cls.from_config({**{k: v for k, v in base.items() if k in keep}, **spec.overrides})


@functools.cache
def _own_sigmas(cls: Any) -> Any:
    """``cls`` (a multistep solver in flow mode) taking and ignoring the sigma list a pipeline hands it.

    ``FluxPipeline`` drops its Euler sigma list for a scheduler with ``use_flow_sigmas``, so the solver lays
    out its own (``linspace(1, 1/1000, n + 1)``, shifted); ``ChromaPipeline`` and its img2img sibling always
    pass the list: diffusers' DPM-Solver then refuses it ("does not support custom sigmas") and UniPC
    would shift the pipeline's list instead of its own. Ignoring the list here gives every flow family the
    same solver schedule; the step count is the list's length when only the list is given, as diffusers'
    ``retrieve_timesteps`` counts it.
    """

    def set_timesteps(self: Any, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, **kwargs: Any) -> None:  # fmt: skip
        if num_inference_steps is None and sigmas is not None:
            num_inference_steps = len(sigmas)
        cls.set_timesteps(self, num_inference_steps, device=device, mu=mu, **kwargs)

    return type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "__doc__": _own_sigmas.__doc__})


#: the schedule settings a flow pipeline reads from its scheduler's config to compute the resolution shift ``mu``
_DYNAMIC_SHIFT_KEYS = ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


@functools.cache
def _euler_schedule_heun() -> Any:
    """The Heun scheduler class over the Euler schedule (built on first use: diffusers is a heavy import)."""
    import diffusers
    import torch

    class EulerScheduleHeun(diffusers.FlowMatchHeunDiscreteScheduler):  # type: ignore[misc]
        """Heun's steps on the sigmas ``FlowMatchEulerDiscreteScheduler`` makes from the same config.

        ``set_timesteps`` accepts what the Euler one does (a sigma list, ``mu`` for the dynamic shift), asks an
        Euler scheduler for the schedule, and lays it out as Heun's: every sigma after the first twice (the
        predictor and the corrector evaluation), the last step to sigma 0 a plain Euler step.
        """

        def __init__(self, euler_config: Mapping[str, Any]) -> None:
            super().__init__(num_train_timesteps=int(euler_config.get("num_train_timesteps", 1000)),
                             shift=float(euler_config.get("shift", 1.0)))  # fmt: skip
            self.euler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
                {**euler_config, "stochastic_sampling": False}
            )
            # a pipeline asks its scheduler's config whether to compute the resolution shift ``mu`` (SD3's
            # pipelines only then do): the Euler schedule's dynamic-shift settings are this scheduler's too
            self.register_to_config(**{k: euler_config[k] for k in _DYNAMIC_SHIFT_KEYS if k in euler_config})  # type: ignore[attr-defined]

        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                          sigmas: Any = None, mu: float | None = None, timesteps: Any = None) -> None:  # fmt: skip
            self.euler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
            schedule = self.euler.sigmas  # the steps' sigmas and the terminal 0
            self.num_inference_steps = len(schedule) - 1
            times = self.euler.timesteps
            self.timesteps = torch.cat([times[:1], times[1:].repeat_interleave(2)])
            self.sigmas = torch.cat([schedule[:1], schedule[1:-1].repeat_interleave(2), schedule[-1:]])
            self.prev_derivative = None
            self.dt = None
            self._step_index = None
            self._begin_index = None

    return EulerScheduleHeun


def run_pipeline(pipe: Any, kwargs: dict[str, Any], sampler: str, seeds: list[int], device: Any = None,
                 hooks: Callable[[list[int]], AbstractContextManager[Any]] | None = None) -> list[Any]:  # fmt: skip
    """``pipe(**kwargs).images``; for a stochastic sampler one call per image (``seeds[i]``'s rows of every
    batched argument: tensors and lists as long as ``seeds``) under :func:`sampler_noise`.

    ``hooks(images)``: a context around each pipeline call for the images it renders (numbered in the batch),
    e.g. :meth:`sdcore.generate.step_conditioning.StepConditioning.installed` for those images' conditioning
    (its evaluation count starts again with each call)."""
    import torch

    def around(images: list[int]) -> AbstractContextManager[Any]:
        return hooks(images) if hooks is not None else contextlib.nullcontext()

    count = len(seeds)
    if not FLOW_SAMPLERS[flow_sampler_id(sampler)].stochastic:
        with around(list(range(count))):
            return list(pipe(**kwargs).images)
    images: list[Any] = []
    for index, seed in enumerate(seeds):
        one = {
            key: value[index : index + 1] if isinstance(value, (list, torch.Tensor)) and len(value) == count else value
            for key, value in kwargs.items()
        }
        with sampler_noise(sampler, seed, device), around([index]):
            images.extend(pipe(**one).images)
    return images


@contextlib.contextmanager
def sampler_noise(sampler: str, seed: int, device: Any = None) -> Iterator[None]:
    """Seed torch's global generator with ``seed`` for a stochastic sampler's call, and restore it afterwards.

    diffusers' flow schedulers draw ``euler_a``'s per-step noise without the pipeline's generator; seeding
    here makes the image a function of the seed (as the other samplers' are) and leaves the caller's
    random state untouched. Deterministic samplers run as they are.
    """
    import torch

    if not FLOW_SAMPLERS[flow_sampler_id(sampler)].stochastic:
        yield
        return
    cuda = [device] if device is not None and getattr(device, "type", str(device)).startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(seed))
        yield


#: the samplers that run the Euler scheduler's own sigmas (Heun too, see :func:`flow_scheduler`)
_EULER_SIGMAS = ("euler", "euler_a", "heun")
#: Forge's flow schedules (backend/modules/k_prediction.py, its engines in backend/diffusion_engine/): FLUX.1
#: dev's sigma table is shifted by exp(mu) with mu fixed at load, ``calculate_shift`` at 4096 tokens = 1.15, at
#: every image size; schnell's and Chroma's by exp(1.0); SD3's by a fixed 3.0
FORGE_FLUX_MU, FORGE_FIXED_MU, FORGE_SD3_SHIFT = 1.15, 1.0, 3.0


def pipeline_mu(config: Mapping[str, Any], size: tuple[int, int]) -> float:
    """The ``mu`` diffusers' FLUX.1/Chroma pipelines give a ``use_dynamic_shifting`` scheduler at ``size``
    (width, height): ``calculate_shift`` of the image's 2x2-packed latent tokens, ``(w // 16) * (h // 16)``, on
    the scheduler config's line from (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (int(size[0]) // 16) * (int(size[1]) // 16)
    return float(calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15)))  # fmt: skip


def forge_schedule_type(bundle: Any, sampler: str, size: tuple[int, int]) -> str | None:
    """Forge's "Schedule type" label (modules/sd_schedulers.py) for the sigmas ``sampler`` runs on a flow
    ``bundle`` at ``size`` (width, height), ``None`` where no Forge schedule gives them.

    Only the samplers on Euler's sigmas (``euler``, ``euler_a``, ``heun``); DPM++ 2M and UniPC make their own.
    SD3: diffusers' ``linspace(1000, 1000 * sigma_min, n)`` shifted is Forge's "Normal" (its ``timestep(sigma)``
    is ``sigma * 1000``) when the shift is Forge's 3.0. FLUX.1/Chroma: the pipelines' ``linspace(1, 1/n, n)``
    shifted by ``exp(mu)`` is Forge's "Simple" when ``mu`` is Forge's: FLUX.1 dev (and the releases with the
    guidance embedding) at 4096 tokens (1024x1024), as diffusers' mu grows with the token count and Forge's does
    not; never schnell (diffusers: no shift, Forge: exp(1)) nor Chroma (diffusers: the resolution's mu). Forge
    reads "Simple" off a 10000-entry table, so where the steps do not divide 10000 its t is within 1/10000."""
    import math

    try:
        sid = flow_sampler_id(sampler, bundle.family)
    except ConfigError:
        return None
    if sid not in _EULER_SIGMAS or bundle.family not in ("flux", "chroma", "sd3"):
        return None
    config = dict(bundle.noise_scheduler.config)
    dynamic = bool(config.get("use_dynamic_shifting"))
    if bundle.family == "sd3":
        shift = float(config.get("shift", 1.0))
        return "Normal" if not dynamic and math.isclose(shift, FORGE_SD3_SHIFT) else None
    from ..models.flux.variants import embeds_guidance

    forge_mu = FORGE_FLUX_MU if bundle.family == "flux" and embeds_guidance(bundle) else FORGE_FIXED_MU
    if dynamic:  # FluxPipeline/ChromaPipeline: mu from the image's 2x2-packed latent tokens
        mu = pipeline_mu(config, size)
    else:  # a fixed shift s is exp(mu) with mu = log(s)
        mu = math.log(float(config.get("shift", 1.0)))
    return "Simple" if math.isclose(mu, forge_mu, abs_tol=1e-9) else None


__all__ = [
    "FLOW_SAMPLERS",
    "FlowSampler",
    "flow_sampler_id",
    "flow_scheduler",
    "forge_schedule_type",
    "pipeline_mu",
    "run_pipeline",
    "sampler_noise",
]
