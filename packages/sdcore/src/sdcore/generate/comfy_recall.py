"""``sdcore generate --from-png`` on a ComfyUI image: its ``prompt`` graph read as A1111's infotext would be.

ComfyUI's ``SaveImage`` writes no infotext; it saves the API-format graph it ran as the PNG text ``prompt``
(``json.dumps`` of node id -> ``{"class_type", "inputs"}``, where an input linked to another node's output is
``[node_id, output_index]``) and the editor's layout as ``workflow``. This module walks the ``prompt`` graph
from the sampler that made the saved image back to its loaders and turns what it finds into the
:class:`~sdcore.generate.pnginfo.GenerationParameters` an A1111 infotext would hold, then into the same
:class:`~sdcore.generate.recall.Recalled` values through :func:`~sdcore.generate.recall.recall_parameters`,
so the rest of ``--from-png`` (options given win, notes, errors) is the A1111 path's.

ComfyUI facts used (comfy/samplers.py, comfy/sample.py, nodes.py): ``KSampler`` has ``seed``, ``steps``,
``cfg``, ``sampler_name``, ``scheduler``, ``denoise``; ``KSamplerAdvanced`` ``noise_seed`` and
``start_at_step``/``end_at_step``; ``SamplerCustomAdvanced`` takes its seed from ``RandomNoise``, its CFG from
``CFGGuider`` (``BasicGuider``: none), its sampler from ``KSamplerSelect`` and steps/scheduler/denoise from
``BasicScheduler``. A ``denoise`` d below 1 runs ``steps`` steps, the last of a ``int(steps / d)``-step
schedule (``KSampler.set_steps``), where sdcore's img2img runs A1111's ``int(min(s, 0.999) * steps) + 1`` of
``steps`` (:func:`~sdcore.generate.hires.img2img_steps`): sdcore's ``--steps`` is ``int(steps / d)`` and its
strength the one running ``steps`` of them (:func:`a1111_strength`); ``KSamplerAdvanced`` from
``start_at_step`` s on an encoded image runs the last ``steps - s`` of its ``steps``. Noise is drawn on the CPU from ``torch.manual_seed(seed)`` for the whole
batch at once (``prepare_noise``): sdcore's CPU noise for the first image; later images of a ComfyUI batch
continue that stream where sdcore seeds image i with ``seed + i``. ``CLIPSetLastLayer`` -n is clip skip n.
Two-pass graphs (LatentUpscale/LatentUpscaleBy: ``round(latent side * scale_by)``; ImageScale/ImageScaleBy on
the decoded image, then VAEEncode) are A1111's "Hires ..." fields: the second KSampler's ``steps`` and
``denoise`` are ``Hires steps`` and ``Denoising strength`` as they stand (both run the last ``steps`` of an
``int(steps / denoise)``-step schedule); its noise comes from its own seed, sdcore's from the first pass's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from ..errors import ConfigError
from .pnginfo import RNG_SOURCE, SCHEDULE_TYPE, GenerationParameters, _number

if TYPE_CHECKING:
    from .recall import Recalled

#: the PNG text ComfyUI's SaveImage writes the API-format graph to
COMFY_PROMPT_KEY = "prompt"
#: where ComfyUI's WebP saves (SaveAnimatedWEBP: comfy_api ``ImageSaveHelper._create_webp_metadata``) put the
#: graph: the IFD0 tag 0x0110 (Model) as the text ``"prompt:" + json.dumps(prompt)``; the extra_pnginfo items
#: (the editor's ``workflow``) go to 0x010F (Make) and down, as ``"<key>:" + json.dumps(value)``
COMFY_WEBP_PROMPT_TAG = 0x0110

#: ComfyUI's sampler_name -> sdcore's sampler id (its SAMPLER_NAMES). ComfyUI's ``ddim`` is its ``euler``
#: sampler (with random noise for inpainting only): sdcore's Euler on the scheduler's sigmas, or sdcore's DDIM
#: with ``ddim_uniform``, whose timesteps are DDIM's (``_DDIM``). Names not here are passed on as written and end
#: in the unknown-sampler error (dpm_2, dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde, lcm, uni_pc_bh2 ...).
SAMPLER_NAMES = {
    "euler": "euler",
    "euler_ancestral": "euler_a",
    "heun": "heun",
    "lms": "lms",
    "dpmpp_2m": "dpm++2m",
    "ddim": "euler",
    "uni_pc": "unipc",  # ComfyUI's sample_unipc is UniPC bh1, as sdcore's (A1111's); its sigmas differ (below)
}
#: ComfyUI's scheduler -> A1111 1.9+'s "Schedule type" label, which recall's notes check against the sigmas
#: sdcore's sampler runs. ComfyUI's "normal" is linspace(t_max, 0, n) timesteps, A1111's "Uniform"
#: (k-diffusion's get_sigmas); "ddim_uniform" is A1111's "DDIM".
SCHEDULE_TYPES = {
    "normal": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "kl_optimal": "KL Optimal",
    "linear_quadratic": "Linear Quadratic",
}
#: samplers whose id carries the schedule (as A1111's "DPM++ 2M" with "Schedule type: Karras"); ComfyUI's
#: ``ddim`` on ``ddim_uniform`` (timesteps 1, 1 + 1000 // n, ... and a last step to sigma 0) is sdcore's DDIM
#: (diffusers' ``leading`` spacing with ``steps_offset`` 1, the SD1/SD2/SDXL schedule's)
_WITH_SCHEDULE = {("dpm++2m", "karras"): "dpm++2m_karras", ("ddim", "ddim_uniform"): "ddim"}

_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
_OUTPUT_NODES = ("SaveImage", "PreviewImage")
_EMPTY_LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")
_CLIP_LOADERS = {
    "CLIPLoader": ("clip_name",),
    "DualCLIPLoader": ("clip_name1", "clip_name2"),
    "TripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3"),
}
#: what a user passes instead of a loader sdcore does not follow (said in the ignored line)
_LOADER_HINTS = {"UNETLoader": "--model", "CLIPLoader": "--clip-l/--t5xxl", "DualCLIPLoader": "--clip-l/--t5xxl",
                 "TripleCLIPLoader": "--clip-l/--clip-g/--t5xxl", "VAELoader": "--vae"}  # fmt: skip
#: a text encoder node's prompt input (sdcore's one prompt), then the inputs said where they differ from it:
#: CLIPTextEncodeSDXL (nodes.py), CLIPTextEncodeFlux (comfy_extras/nodes_flux.py), CLIPTextEncodeSD3
#: (comfy_extras/nodes_sd3.py: clip_l, clip_g, t5xxl, empty_padding; an empty text with empty_padding "none"
#: gives that encoder no tokens, which sdcore's one prompt for all three never does)
_TEXT_INPUTS = {
    "CLIPTextEncodeSDXL": ("text_g", "text_l"),
    "CLIPTextEncodeFlux": ("t5xxl", "clip_l"),
    "CLIPTextEncodeSD3": ("clip_g", "clip_l", "t5xxl"),
}
#: inputs a conditioning node passes on, first found first (ConditioningCombine's first input)
_CONDITIONING_INPUTS = ("conditioning", "conditioning_1", "conditioning_to")
#: a "hires fix" graph's upscale between its two samplers (nodes.py; ImageUpscaleWithModel: comfy_extras)
_LATENT_UPSCALES = ("LatentUpscale", "LatentUpscaleBy")
_IMAGE_UPSCALES = ("ImageScale", "ImageScaleBy", "ImageUpscaleWithModel")
#: ComfyUI's latent ``upscale_method`` -> sdcore's (A1111's) latent upscaler running the same
#: ``torch.nn.functional.interpolate`` (comfy.utils.common_upscale: that mode, no antialias). ``area`` is
#: ``Latent (nearest-exact)`` at whole-number scales only (each output pixel averages the one input pixel it
#: falls in); ``bislerp`` has none (``Latent``, bilinear, is used and said).
LATENT_UPSCALE_METHODS = {
    "bilinear": "Latent",
    "bicubic": "Latent (bicubic)",
    "nearest-exact": "Latent (nearest-exact)",
    "area": "Latent (nearest-exact)",
    "bislerp": "Latent",
}
#: ComfyUI's image ``upscale_method`` -> sdcore's image upscaler. ``lanczos`` is PIL's Lanczos on the image
#: truncated to 8 bits (comfy.utils.lanczos), as sdcore's; ``nearest-exact`` picks the pixels sdcore's Nearest
#: picks but on the decoded floats (said); the others (and upscale models) get Lanczos, said.
IMAGE_UPSCALE_METHODS = {"lanczos": "Lanczos", "nearest-exact": "Nearest"}


#: ComfyUI's model sampling nodes of the flow families (comfy_extras/nodes_model_advanced.py) -> their inputs'
#: defaults: ModelSamplingFlux sets ``mu = w * h / 256 * (max_shift - base_shift) / (4096 - 256) + b`` (the line
#: through (256, base_shift) and (4096, max_shift), diffusers' ``calculate_shift`` of the image's tokens);
#: ModelSamplingSD3 a fixed ``shift`` on 1000 timesteps; ModelSamplingAuraFlow the same with multiplier 1
FLOW_SAMPLING = {
    "ModelSamplingFlux": {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024},
    "ModelSamplingSD3": {"shift": 3.0},
    "ModelSamplingAuraFlow": {"shift": 1.73},
}
#: sdcore's samplers that run the flow scheduler's own (Euler's) sigmas, whose list is compared with ComfyUI's
_FLOW_EULER_SIGMAS = ("euler", "euler_a", "heun")
#: float32 rounding: ComfyUI's tables and sigmas are float32 tensors, sdcore's pipeline sigmas float64 numpy
_SIGMA_FLOAT32 = 1e-5


def _comfy_sigma(kind: str, value: float) -> Any:
    """ComfyUI's ``sigma(t)`` (t in [0, 1], the timestep over the multiplier) of a flow model sampling ``kind``:
    ``"flux"`` ``flux_time_shift(mu, 1, t)``, ``"sd3"`` ``time_snr_shift(shift, t)`` (comfy/model_sampling.py)."""
    import math

    def sigma(t: float) -> float:
        if kind == "flux":
            return math.exp(value) / (math.exp(value) + (1 / t - 1)) if t > 0 else 0.0
        return value * t / (1 + (value - 1) * t)

    return sigma


def _table_size(kind: str) -> int:
    """Entries of ComfyUI's sigma table: ModelSamplingFlux 10000, ModelSamplingDiscreteFlow 1000."""
    return 10000 if kind == "flux" else 1000


def comfy_flow_sigmas(kind: str, value: float, scheduler: str, steps: int) -> list[float] | None:
    """The sigmas (before the final 0) ComfyUI's ``scheduler`` gives on a flow model whose model sampling is
    ``kind``: ``"flux"`` (``ModelSamplingFlux``: ``exp(mu) / (exp(mu) + 1 / t - 1)`` on a 10000-entry table of t,
    ``value`` is mu), ``"sd3"`` (``ModelSamplingDiscreteFlow``, multiplier 1000: ``shift * t / (1 + (shift - 1) *
    t)`` on 1000 entries, ``value`` the shift). Schedulers (comfy/samplers.py): ``simple`` takes every
    ``len / steps``-th table entry from the end; ``normal`` ``linspace`` from the largest to the smallest entry's
    timestep, ``sgm_uniform`` the same over ``steps + 1`` without the last; ``None`` for the others."""
    sigma, size = _comfy_sigma(kind, value), _table_size(kind)
    if scheduler == "simple":
        step = size / steps
        return [sigma((size - int(x * step)) / size) for x in range(steps)]
    if scheduler in ("normal", "sgm_uniform"):  # timestep(sigma) is sigma (FLUX) or sigma * 1000 (SD3): t units
        start, end = sigma(1.0), sigma(1 / size)  # the table's last and first entries, as timesteps in t units
        count = steps + 1 if scheduler == "sgm_uniform" else steps
        if count == 1:  # torch.linspace(start, end, 1) is [start]
            return [sigma(start)]
        points = [start + (end - start) * i / (count - 1) for i in range(count)][:steps]
        return [sigma(t) for t in points]
    return None


def comfy_flow_slack(kind: str, value: float, scheduler: str, steps: int) -> list[float]:
    """How far each of :func:`comfy_flow_sigmas` may be from the same schedule on exact t, sigma by sigma:
    ``simple`` reads its t off the table, ``(size - int(x * size / steps)) / size``, at most one entry (1/size)
    above the pipelines' ``1 - x / steps``, so the slack is the sigma step of that entry (largest where the
    shift is steep: 2048x2048 at 49 steps is 1e-3 off); ``normal``/``sgm_uniform`` run on the continuous
    ``sigma(t)``: no slack but float32's."""
    if scheduler != "simple":
        return [_SIGMA_FLOAT32] * steps
    sigma, size = _comfy_sigma(kind, value), _table_size(kind)
    ts = [(size - int(x * (size / steps))) / size for x in range(steps)]
    return [sigma(t) - sigma(t - 1 / size) + _SIGMA_FLOAT32 for t in ts]


def sdcore_flow_sigmas(bundle: Any, size: tuple[int, int], steps: int) -> tuple[list[float], str]:
    """The sigmas (before the final 0) sdcore's Euler-sigma samplers run on a flow ``bundle`` at ``size``, from
    the scheduler :func:`~sdcore.generate.flow_samplers.flow_scheduler` builds, set as the family's diffusers
    pipeline sets it (FLUX.1/Chroma: ``linspace(1, 1/n, n)`` and ``mu``; SD3: its own, ``mu`` only with the
    dynamic shift); with how it is shifted, said in a note."""
    import numpy as np

    from .flow_samplers import flow_scheduler, pipeline_mu

    config = dict(bundle.noise_scheduler.config)
    scheduler = flow_scheduler(config, "euler", family=bundle.family)
    kwargs: dict[str, Any] = {}
    if config.get("use_dynamic_shifting"):
        kwargs["mu"] = pipeline_mu(config, size)
        how = f"mu {kwargs['mu']:.4g} (the {size[0]}x{size[1]} image's token count)"
    else:
        how = f"shift {_shown(float(config.get('shift', 1.0)))}"
    if bundle.family != "sd3":
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(steps, **kwargs)
    return [float(x) for x in scheduler.sigmas[:-1]], how


@dataclass
class FlowSchedule:
    """What a flow family's sigmas depend on in a ComfyUI graph, checked once the model is known
    (:meth:`check`, called by :meth:`~sdcore.generate.recall.Recalled.notes`): the sampler node's ``scheduler``
    and ``steps``, the ModelSampling* node on its model chain (``None``: the model's own: FLUX.1 dev and Chroma
    ModelSamplingFlux mu 1.15, schnell a fixed shift 1 (comfy/supported_models.py), SD3 a shift 3), and a hires
    graph's second-pass size (``hires``, with the first pass's ``size``) and the hires fix sdcore runs."""

    scheduler: str | None
    steps: int | None
    sampling: tuple[str, str, dict[str, Any]] | None = None
    size: tuple[int, int] | None = None
    hires: tuple[int, int] | None = None
    hires_fix: Any = None

    def _comfy(self, bundle: Any) -> tuple[str, float, str] | None:
        """(table kind, mu or shift, what sets it) of the graph on ``bundle``; ``None``: unreadable."""
        if self.sampling is None:
            from ..models.flux.variants import embeds_guidance

            if bundle.family == "sd3":
                return "sd3", 3.0, "SD3's own shift 3"
            if bundle.family == "flux" and not embeds_guidance(bundle):  # ModelSamplingDiscreteFlow, multiplier 1
                return "sd3", 1.0, "schnell's own shift 1"
            return "flux", 1.15, "the model's own mu 1.15, ModelSamplingFlux's 1024x1024"
        node, kind, values = self.sampling
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            return None
        if kind == "ModelSamplingFlux":
            slope = (values["max_shift"] - values["base_shift"]) / (4096 - 256)
            mu = values["width"] * values["height"] / 256 * slope + values["base_shift"] - slope * 256
            if not -700 < mu < 700:  # exp(mu) overflows (ComfyUI's math.exp too), or NaN: no schedule to compare
                return None
            return "flux", mu, f"{kind} {node} at {values['width']}x{values['height']}: mu {mu:.4g}"
        shift = float(values["shift"])  # AuraFlow's multiplier 1 scales timesteps only: the same sigmas in t
        if not 0 < shift < float("inf"):  # shift 0 (the node's minimum) divides 0 by 0 at t = 1; NaN
            return None
        return "sd3", shift, f"{kind} {node} shift {_shown(shift)}"

    def check(self, bundle: Any, sampler: str, size: tuple[int, int] | None) -> tuple[list[str], bool]:
        """Lines for the ignored list, and whether the schedule was checked here (on a flow family: the
        "Schedule type" label check is then skipped). No line when ComfyUI's sigmas are sdcore's within the
        table's step; one saying both shifts when they differ (sdcore has no shift option: the model's
        schedule config and, FLUX.1 dev/Chroma, the image's token count set it)."""
        said = f"{self.sampling[1]} {self.sampling[0]}" if self.sampling is not None else None
        if bundle.family_spec.denoiser == "unet":
            return ([f"{said} (not a flow model)"] if said else []), False
        lines: list[str] = []
        size = size or self.size
        if self.hires is not None and self.size is not None and self.hires_fix is not None:
            from .hires import FLOW_PATCH

            ours = self.hires_fix.final_size(*self.size, 8 * FLOW_PATCH)
            if ours != self.hires:  # the flow families' latents have even sides; ComfyUI keeps an odd one
                lines.append(
                    f"second pass {self.hires[0]}x{self.hires[1]} (sdcore's {bundle.family} hires fix rounds to "
                    f"16 pixels: {ours[0]}x{ours[1]})"
                )
        comfy = self._comfy(bundle)
        if self.scheduler is None or not isinstance(self.steps, int) or self.steps < 1 or size is None:
            return lines + ([f"{said} (unread)"] if said else []), False
        from .flow_samplers import flow_sampler_id

        try:
            sid = flow_sampler_id(sampler, bundle.family)
        except ConfigError:
            sid = sampler
        if sid not in _FLOW_EULER_SIGMAS:
            lines.append(f"scheduler {self.scheduler} (sdcore's {sid} runs its own sigmas)")
            return lines, True
        theirs = comfy_flow_sigmas(comfy[0], comfy[1], self.scheduler, self.steps) if comfy is not None else None
        ours, how = sdcore_flow_sigmas(bundle, size, self.steps)
        if theirs is None or comfy is None:
            lines.append(f"scheduler {self.scheduler}" + (f" with {said}" if said else "") +
                         f" (sdcore's {sid} runs the pipeline's sigmas, {how})")  # fmt: skip
        elif (
            differ := [  # beyond what ComfyUI's table and float32 account for (comfy_flow_slack)
                i
                for i, (a, b, slack) in enumerate(
                    zip(theirs, ours, comfy_flow_slack(*comfy[:2], self.scheduler, self.steps), strict=True)
                )
                if abs(a - b) > slack
            ]
        ):
            first = differ[0]
            lines.append(
                f"scheduler {self.scheduler} with {comfy[2]} (sdcore's {sid} shifts by {how}; no option sets it: "
                f"sigma {first + 1} is {theirs[first]:.4f} in ComfyUI, {ours[first]:.4f} here)"
            )
        return lines, True


def _is_link(value: Any) -> TypeGuard[list[Any]]:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
    )


@dataclass
class _Walk:
    """The graph being read, and what reading it found: ``used``: node ids mapped onto options; ``notes``:
    node id -> the ignored line's entry for a node met but only partly followed."""

    nodes: dict[str, dict[str, Any]]
    used: set[str] = field(default_factory=set)
    notes: dict[str, str] = field(default_factory=dict)

    def type(self, node: str) -> str:
        return str(self.nodes[node]["class_type"])

    def inputs(self, node: str) -> dict[str, Any]:
        inputs: dict[str, Any] = self.nodes[node].get("inputs", {})
        return inputs

    def link(self, node: str, name: str) -> str | None:
        """The node ``name`` of ``node`` links to (``None``: not a link; links were checked by :func:`_check`)."""
        value = self.inputs(node).get(name)
        return str(value[0]) if _is_link(value) else None

    def value(self, node: str, name: str, default: Any = None) -> Any:
        """A widget value, following a link to a primitive/string node (its ``value``, ``text``, ``string``,
        ``seed``, ``int`` or ``float`` input, or one named ``name``); ``default`` when absent or unreadable."""
        value = self.inputs(node).get(name, default)
        seen = set()
        while _is_link(value):
            source = str(value[0])
            if source in seen:
                return default
            seen.add(source)
            inputs = self.inputs(source)
            key = next((k for k in (name, "value", "text", "string", "seed", "int", "float") if k in inputs), None)
            if key is None:
                self.notes.setdefault(source, self.type(source))
                return default
            self.used.add(source)
            value = inputs[key]
        return value


def _check(nodes: Any) -> dict[str, dict[str, Any]]:
    """The graph as a dict of nodes, or a one-line error naming what is wrong: not an object, a node without
    ``class_type``, a link to a node the graph does not have, a cycle."""
    if not isinstance(nodes, dict) or not nodes:
        raise ConfigError("the PNG's ComfyUI 'prompt' is not a graph (a JSON object of nodes)")
    graph: dict[str, dict[str, Any]] = {}
    for key, node in nodes.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise ConfigError(f"the PNG's ComfyUI graph: node {key} has no class_type")
        if not isinstance(node.get("inputs", {}), dict):
            raise ConfigError(f"the PNG's ComfyUI graph: node {key} ({node['class_type']}) has no inputs object")
        graph[str(key)] = node
    edges: dict[str, list[str]] = {}
    for key, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if _is_link(value):
                if str(value[0]) not in graph:
                    raise ConfigError(
                        f"the PNG's ComfyUI graph: node {key} ({node['class_type']}) input '{name}' links to node "
                        f"{value[0]}, which the graph does not have"
                    )
                edges.setdefault(key, []).append(str(value[0]))
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        stack = [(start, iter(edges.get(start, ())))]
        if state.get(start):
            continue
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                cycle = [n for n, _ in stack][[n for n, _ in stack].index(child) :]
                raise ConfigError(f"the PNG's ComfyUI graph has a cycle: nodes {' -> '.join(cycle)} -> {child}")
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(edges.get(child, ()))))
    return graph


def _ancestors(walk: _Walk, start: str) -> list[str]:
    """``start`` and every node it depends on, nearest first."""
    found: dict[str, None] = {}
    todo = [start]
    while todo:
        node = todo.pop(0)
        if node in found:
            continue
        found[node] = None
        todo.extend(str(v[0]) for v in walk.inputs(node).values() if _is_link(v))
    return list(found)


def _choose_sampler(walk: _Walk) -> tuple[str, list[str]]:
    """The sampler that made the saved image and the output path's nodes (SaveImage, VAEDecode ...): the one a
    SaveImage/PreviewImage gets through VAEDecode, or the graph's only sampler; several are an error."""
    samplers = [n for n in walk.nodes if walk.type(n) in _SAMPLER_NODES]
    fed: dict[str, list[str]] = {}
    for output in (n for n in walk.nodes if walk.type(n) in _OUTPUT_NODES):
        path, node = [output], walk.link(output, "images")
        while node is not None and walk.type(node) not in _SAMPLER_NODES:
            path.append(node)
            kind = walk.type(node)
            name = "samples" if kind.startswith("VAEDecode") or "samples" in walk.inputs(node) else "image"
            node = walk.link(node, name if name in walk.inputs(node) else "images")
        if node is not None:
            fed.setdefault(node, path)
    if len(fed) == 1:
        return next(iter(fed.items()))
    if not fed and len(samplers) == 1:
        return samplers[0], []
    listed = ", ".join(f"{n} ({walk.type(n)})" for n in (fed or samplers))
    if not samplers:
        raise ConfigError("the PNG's ComfyUI graph has no sampler node (KSampler, KSamplerAdvanced, SamplerCustom)")
    raise ConfigError(
        f"the PNG's ComfyUI graph has several samplers making its images ({listed}); sdcore recalls one "
        "image's settings: type the options of the one you want"
    )


@dataclass
class _Sampling:
    """A sampler node's settings, whichever node kind held them."""

    seed: Any = None
    steps: Any = None
    cfg: Any = None
    sampler: Any = None
    scheduler: Any = None
    denoise: Any = 1.0
    model: str | None = None
    positive: str | None = None
    negative: str | None = None
    latent: str | None = None
    #: KSamplerAdvanced's start_at_step (0: from the first step) and what else it does unlike a KSampler
    start: int = 0
    odd: list[str] = field(default_factory=list)


def _sampling(walk: _Walk, node: str) -> _Sampling:
    kind = walk.type(node)
    found = _Sampling(latent=walk.link(node, "latent_image"))
    if kind in ("KSampler", "KSamplerAdvanced"):
        found.seed = walk.value(node, "seed" if kind == "KSampler" else "noise_seed")
        found.steps, found.cfg = walk.value(node, "steps"), walk.value(node, "cfg")
        found.sampler, found.scheduler = walk.value(node, "sampler_name"), walk.value(node, "scheduler")
        found.denoise = walk.value(node, "denoise", 1.0)
        found.model, found.positive, found.negative = (walk.link(node, k) for k in ("model", "positive", "negative"))
        if kind == "KSamplerAdvanced":
            found.odd = [
                f"{k} {walk.value(node, k)}"
                for k, plain in (("add_noise", "enable"), ("return_with_leftover_noise", "disable"))
                if walk.value(node, k, plain) != plain
            ]
            end = walk.value(node, "end_at_step")
            if isinstance(end, int) and isinstance(found.steps, int) and end < found.steps:
                found.odd.append(f"end_at_step {end}")
            start = walk.value(node, "start_at_step", 0)
            if isinstance(start, int) and start > 0:
                found.start = start
            elif start not in (0, None):
                found.odd.append(f"start_at_step {start}")
        walk.used.add(node)
        return found
    walk.used.add(node)
    if kind == "SamplerCustom":
        found.seed, found.cfg = walk.value(node, "noise_seed"), walk.value(node, "cfg")
        found.model, found.positive, found.negative = (walk.link(node, k) for k in ("model", "positive", "negative"))
        if walk.value(node, "add_noise", True) is not True:
            walk.notes[node] = f"{kind} (add_noise false)"
    else:  # SamplerCustomAdvanced: noise, guider, sampler, sigmas
        noise = walk.link(node, "noise")
        if noise is not None and walk.type(noise) == "RandomNoise":
            walk.used.add(noise)
            found.seed = walk.value(noise, "noise_seed")
        guider = walk.link(node, "guider")
        if guider is not None and walk.type(guider) in ("CFGGuider", "BasicGuider"):
            walk.used.add(guider)
            found.model = walk.link(guider, "model")
            if walk.type(guider) == "CFGGuider":
                found.cfg = walk.value(guider, "cfg")
                found.positive, found.negative = walk.link(guider, "positive"), walk.link(guider, "negative")
            else:
                found.positive = walk.link(guider, "conditioning")
    chosen = walk.link(node, "sampler")
    if chosen is not None and walk.type(chosen) == "KSamplerSelect":
        walk.used.add(chosen)
        found.sampler = walk.value(chosen, "sampler_name")
    sigmas = walk.link(node, "sigmas")
    if sigmas is not None and walk.type(sigmas) == "BasicScheduler":
        walk.used.add(sigmas)
        found.steps, found.scheduler = walk.value(sigmas, "steps"), walk.value(sigmas, "scheduler")
        found.denoise = walk.value(sigmas, "denoise", 1.0)
        found.model = found.model or walk.link(sigmas, "model")
    return found


@dataclass
class _Text:
    """A conditioning chain read back: the prompt (``None``: unreadable), its CLIP node, the FluxGuidance."""

    text: str | None = None
    clip: str | None = None
    guidance: Any = None
    #: CLIPTextEncodeSDXL's node and its size conditioning (width, height, crop_w, crop_h, target w, target h)
    sdxl: tuple[str, tuple[Any, ...]] | None = None


def _conditioning(walk: _Walk, node: str | None) -> _Text:
    """Follow a positive/negative input to its text encoder: CLIPTextEncode ``text``, CLIPTextEncodeSDXL
    ``text_g`` (a different ``text_l`` is said), CLIPTextEncodeFlux ``t5xxl`` (a different ``clip_l`` is said),
    through FluxGuidance; other conditioning nodes are said and their first conditioning input followed."""
    found = _Text()
    while node is not None:
        kind = walk.type(node)
        if kind in ("CLIPTextEncode", "CLIPTextEncodeSDXLRefiner"):
            walk.used.add(node)
            found.text, found.clip = walk.value(node, "text"), walk.link(node, "clip")
            break
        if kind in _TEXT_INPUTS:
            walk.used.add(node)
            main, *others = _TEXT_INPUTS[kind]
            found.text, found.clip = walk.value(node, main), walk.link(node, "clip")
            if kind == "CLIPTextEncodeSDXL":
                keys = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")
                found.sdxl = node, tuple(walk.value(node, k) for k in keys)
            differ = [(k, walk.value(node, k)) for k in others if walk.value(node, k) not in (None, found.text)]
            differ = [(k, v) for k, v in differ if v != "" or kind == "CLIPTextEncodeSD3"]  # SD3: an empty one too
            if differ:
                said = ", ".join(f"{k} {json.dumps(v, ensure_ascii=False)}" for k, v in differ)
                walk.notes[node] = f"{kind} {said}"
            if kind == "CLIPTextEncodeFlux" and found.guidance is None:
                found.guidance = walk.value(node, "guidance")
            break
        if kind == "FluxGuidance":
            walk.used.add(node)
            if found.guidance is None:  # the one nearest the sampler wins
                found.guidance = walk.value(node, "guidance")
        elif kind == "ConditioningZeroOut":  # zeroed embeddings: no prompt (said: not an empty prompt's)
            walk.notes[node] = kind
            found.text = ""
        else:
            walk.notes.setdefault(node, kind)
        node = next((walk.link(node, k) for k in _CONDITIONING_INPUTS if walk.link(node, k) is not None), None)
        if found.text == "":
            break
    if found.text is not None and not isinstance(found.text, str):
        found.text = None
    return found


@dataclass
class _Lora:
    name: str
    model: float = 0.0
    clip: float = 0.0


def _lora_name(file: str) -> str:
    """The ``<lora:...>`` name of a ComfyUI ``lora_name`` (``style/x.safetensors``): sdcore's lookup matches a
    file's stem anywhere under the LoRA folder, so the subfolder goes with the extension."""
    stem = file.replace("\\", "/").rsplit("/", 1)[-1]
    return stem.rsplit(".", 1)[0] if "." in stem else stem


def _chain(walk: _Walk, node: str | None, kind: str, loras: dict[str, _Lora], found: dict[str, Any]) -> None:
    """Follow a ``model`` or ``clip`` chain to its loader: LoRA loaders (collected), CLIPSetLastLayer (clip
    skip), ModelSampling* (said), CheckpointLoaderSimple (the model), other loaders (said with their files)."""
    while node is not None:
        node_kind = walk.type(node)
        if node_kind in ("LoraLoader", "LoraLoaderModelOnly"):
            walk.used.add(node)
            lora = loras.setdefault(node, _Lora(_lora_name(str(walk.value(node, "lora_name", "")))))
            strength = walk.value(node, f"strength_{kind}", 1.0)
            if not isinstance(strength, int | float):
                raise ConfigError(f"the PNG's ComfyUI graph: node {node} ({node_kind}) strength_{kind} {strength!r}")
            setattr(lora, kind, float(strength))
        elif node_kind == "CLIPSetLastLayer":
            walk.used.add(node)
            layer = walk.value(node, "stop_at_clip_layer", -1)
            if isinstance(layer, int) and layer < 0:
                found.setdefault("clip_skip", -layer)
            else:
                walk.notes[node] = f"{node_kind} ({layer})"
        elif node_kind.startswith("CheckpointLoader"):
            walk.used.add(node)
            found.setdefault("model", walk.value(node, "ckpt_name"))
            return
        elif node_kind in ("ModelSamplingFlux", "ModelSamplingSD3", "ModelSamplingAuraFlow", "ModelSamplingDiscrete"):
            shown = ", ".join(f"{k} {_shown(walk.value(node, k))}" for k in walk.inputs(node) if k != "model")
            walk.notes[node] = f"{node_kind} ({shown})" if shown else node_kind
            if node_kind in FLOW_SAMPLING and "sampling" not in found:  # checked once the family is known
                found["sampling"] = node
        elif node_kind in _LOADER_HINTS or node_kind in _CLIP_LOADERS:
            files = _CLIP_LOADERS.get(node_kind, ("unet_name", "vae_name"))
            names = [walk.value(node, k) for k in files if walk.value(node, k) is not None]
            walk.notes[node] = f"{node_kind} ({', '.join(map(str, names))}: {_LOADER_HINTS[node_kind]})"
            found.setdefault("loaders", {})[node] = (node_kind, names)
            return
        else:
            walk.notes.setdefault(node, node_kind)
        node = walk.link(node, kind)


@dataclass
class _Upscale:
    """A two-pass ("hires fix") graph's middle: the first pass's sampler and the nodes between it and the
    second sampler's ``latent_image``, first pass's side first; ``pixel``: decoded, scaled, encoded again.
    ``final``: the size of the image the second pass makes (set by :func:`_hires_fields`); ``guessed``: an
    upscale model's factor read from its file name, said with a PNG whose size disagrees."""

    first: str
    nodes: list[str]
    pixel: bool
    final: tuple[int, int] | None = None
    guessed: str | None = None


def _two_pass(walk: _Walk, node: str) -> _Upscale | None:
    """The first pass of a hires graph whose second sampler is ``node``: its latent comes from another sampler
    through LatentUpscale/LatentUpscaleBy, or through VAEDecode -> ImageScale/ImageScaleBy/ImageUpscaleWithModel
    -> VAEEncode; ``None`` for any other latent."""
    if walk.type(node) == "KSamplerAdvanced":  # start_at_step is its own rule: not followed as a hires pass
        return None
    nodes: list[str] = []
    latent, pixel = walk.link(node, "latent_image"), False
    while latent is not None and walk.type(latent) in _LATENT_UPSCALES:
        nodes.append(latent)
        latent = walk.link(latent, "samples")
    if latent is not None and not nodes and walk.type(latent) == "VAEEncode":
        nodes.append(latent)
        image = walk.link(latent, "pixels")
        while image is not None and walk.type(image) in _IMAGE_UPSCALES:
            nodes.append(image)
            image = walk.link(image, "image")
        if image is None or walk.type(image) != "VAEDecode" or len(nodes) < 2:
            return None
        nodes.append(image)
        latent, pixel = walk.link(image, "samples"), True
    if latent is None or not nodes or walk.type(latent) not in _SAMPLER_NODES:
        return None
    return _Upscale(latent, nodes[::-1], pixel)


def _refined(walk: _Walk, node: str) -> str | None:
    """The base sampler of an SDXL base -> refiner graph whose refiner is ``node``: a KSamplerAdvanced taking
    another sampler's latent as it is (the base stops at ``end_at_step`` with its noise left in)."""
    latent = walk.link(node, "latent_image")
    if walk.type(node) == "KSamplerAdvanced" and latent is not None and walk.type(latent) in _SAMPLER_NODES:
        return latent
    return None


def _model_scale(name: str) -> int | None:
    """An upscale model's factor read from its file name as they are named (``4x-UltraSharp.pth``,
    ``RealESRGAN_x4plus.pth``, ``2x_...``): the graph does not hold it, the model file does."""
    import re

    found = re.search(r"(?<![0-9a-z])([1-8])x(?![0-9])|(?<![0-9a-z])x([1-8])(?![0-9])", name.lower())
    return int(found.group(1) or found.group(2)) if found else None


def _scaled(width: int, height: int, to_w: Any, to_h: Any, smallest: int) -> tuple[int, int] | None:
    """ComfyUI's LatentUpscale/ImageScale size (``smallest``: 64 for a latent's pixels, 1 for an image's): a
    side of 0 keeps the aspect ratio (``round``), both 0 keep the size; ``None`` when unreadable."""
    if not (isinstance(to_w, int) and isinstance(to_h, int)) or isinstance(to_w, bool) or isinstance(to_h, bool):
        return None
    if to_w == 0 and to_h == 0:
        return None
    if to_w == 0:
        to_h = max(smallest, to_h)
        return max(smallest, round(width * to_h / height)), to_h
    if to_h == 0:
        to_w = max(smallest, to_w)
        return to_w, max(smallest, round(height * to_w / width))
    return max(smallest, to_w), max(smallest, to_h)


def _hires_fields(walk: _Walk, upscale: _Upscale, size: tuple[int, int]) -> dict[str, str] | None:
    """A1111's "Hires upscale"/"Hires resize" and "Hires upscaler" for ``upscale`` after a first pass of
    ``size``, chosen so that sdcore's hires fix (:class:`~sdcore.generate.hires.HiresFix`, A1111's rules)
    makes the second pass's latent at the size ComfyUI's nodes make it; what differs is put in
    ``walk.notes``. ``None``: a size sdcore cannot work out (an unreadable value, an upscale model whose
    factor its name does not say), and the graph is said as before."""
    from .hires import HiresFix

    latent = (size[0] // 8, size[1] // 8)
    image = (latent[0] * 8, latent[1] * 8)
    scales: list[str] = [n for n in upscale.nodes if walk.type(n) not in ("VAEDecode", "VAEEncode")]
    said: dict[str, str] = {}
    factor: float | None = None
    upscaler: str | None = None
    for node in upscale.nodes:
        kind, method = walk.type(node), walk.value(node, "upscale_method")
        if kind in ("LatentUpscaleBy", "ImageScaleBy"):
            scale_by = walk.value(node, "scale_by")
            if not isinstance(scale_by, int | float) or isinstance(scale_by, bool) or scale_by <= 0:
                return None
            factor = float(scale_by) if len(scales) == 1 else None
            shown = f"{kind} {method} x{_shown(scale_by)}"
            if kind == "LatentUpscaleBy":  # round(latent side * scale_by) latent pixels
                latent = (round(latent[0] * scale_by), round(latent[1] * scale_by))
            else:
                image = (round(image[0] * scale_by), round(image[1] * scale_by))
        elif kind in ("LatentUpscale", "ImageScale"):
            pixels = (latent[0] * 8, latent[1] * 8) if kind == "LatentUpscale" else image
            smallest = 64 if kind == "LatentUpscale" else 1
            base = latent if kind == "LatentUpscale" else image
            to = _scaled(base[0], base[1], walk.value(node, "width"), walk.value(node, "height"), smallest)
            if to is None:
                return None
            crop = walk.value(node, "crop", "disabled")
            shown = f"{kind} {method} {to[0]}x{to[1]}" + (f" crop {crop}" if crop != "disabled" else "")
            if crop != "disabled" and to[0] * pixels[1] != to[1] * pixels[0]:
                said[node] = f"{shown} (ComfyUI crops the image before scaling, sdcore's hires fix after)"
            if kind == "LatentUpscale":
                latent = (to[0] // 8, to[1] // 8)
            else:
                image = to
        elif kind == "ImageUpscaleWithModel":
            loader = walk.link(node, "upscale_model")
            name = walk.value(loader, "model_name") if loader is not None else None
            model_factor = _model_scale(name) if isinstance(name, str) else None
            if model_factor is None:
                return None
            walk.used.add(str(loader))
            image = (image[0] * model_factor, image[1] * model_factor)
            upscale.guessed = f"{name}'s x{model_factor} is read from its name"
            method, shown = None, f"{kind} {name}"
            said[node] = f"{shown} (sdcore has no upscale models: Lanczos, its x{model_factor} read from the name)"
        elif kind == "VAEEncode":  # ComfyUI encodes the pixels' whole 8-pixel blocks
            latent = (image[0] // 8, image[1] // 8)
            continue
        else:  # VAEDecode
            image = (latent[0] * 8, latent[1] * 8)
            continue
        if upscaler is None:  # the first upscale is sdcore's upscaler; the size is all of theirs
            if kind.startswith("Latent"):
                upscaler = LATENT_UPSCALE_METHODS.get(str(method))
                if upscaler is None:
                    return None
                whole = all(b % a == 0 for a, b in zip((size[0] // 8, size[1] // 8), latent, strict=True))
                if method == "bislerp" or (method == "area" and not whole):
                    said.setdefault(node, f"{shown} (sdcore has no {method} latent upscale: {upscaler})")
            elif kind != "ImageUpscaleWithModel":
                upscaler = IMAGE_UPSCALE_METHODS.get(str(method), "Lanczos")
                if method == "nearest-exact":
                    said.setdefault(node, f"{shown} (sdcore's Nearest upscales the 8-bit image, ComfyUI the floats)")
                elif method != "lanczos":
                    said.setdefault(node, f"{shown} (sdcore has no {method} image upscale: Lanczos)")
            else:
                upscaler = "Lanczos"
        elif node not in said:
            said[node] = f"{shown} (sdcore upscales once, to the size all of them make)"
    final = (latent[0] * 8, latent[1] * 8)
    wanted = image if upscale.pixel else final
    upscale.final = final
    if upscale.pixel and wanted != final:  # ComfyUI's VAE.encode: vae_encode_crop_pixels
        last = scales[-1]
        said.setdefault(
            last,
            f"{walk.type(last)} to {wanted[0]}x{wanted[1]}, not whole 8-pixel blocks (ComfyUI's VAEEncode crops "
            f"it to {final[0]}x{final[1]} at the centre; sdcore resizes and encodes it A1111's way)",
        )

    def makes(hires: HiresFix) -> bool:  # sdcore's upscale goes straight to that size, with no crop
        to_x, to_y, cut_x, cut_y = hires.target(*size)
        made = (to_x, to_y) if upscale.pixel else (to_x // 8 * 8, to_y // 8 * 8)
        return made == wanted and (cut_x, cut_y) == (0, 0)

    fields: dict[str, str] = {}
    if factor is not None and makes(HiresFix(scale=factor)):
        fields["Hires upscale"] = _number(factor)
    else:
        fields["Hires resize"] = f"{wanted[0]}x{wanted[1]}"
        if not makes(HiresFix(resize_x=wanted[0], resize_y=wanted[1])):
            last = scales[-1]
            said.setdefault(last, f"{walk.type(last)} to {final[0]}x{final[1]} (sdcore scales to cover it and crops)")
    fields["Hires upscaler"] = str(upscaler)
    walk.used.update(upscale.nodes)
    walk.notes.update(said)
    return fields


def a1111_strength(schedule: int, run: int) -> float:
    """The "Denoising strength" whose img2img runs the last ``run`` steps of a ``schedule``-step schedule as
    sdcore (A1111) counts them (:func:`~sdcore.generate.hires.img2img_steps`: ``int(min(s, 0.999) * schedule) +
    1`` steps): the shortest decimal inside that step, away from its edges so that no rounding moves it."""
    from .hires import img2img_steps

    middle = (run - 0.5) / schedule
    for digits in range(2, 8):
        strength = round(middle, digits)
        if img2img_steps(schedule, strength) == (schedule, run):
            return strength
    return middle


def _shown(value: Any) -> str:
    return _number(value) if isinstance(value, float | int) and not isinstance(value, bool) else str(value)


def _lora_tag(lora: _Lora) -> str:
    """A1111's tag: ``<lora:name:w>`` when both weights agree, else ``<lora:name:te:unet>`` (text encoder first,
    as A1111's positional arguments and sdcore's ``networks.NetworkRef`` read them)."""
    if lora.clip == lora.model:
        return f"<lora:{lora.name}:{_number(lora.model)}>"
    return f"<lora:{lora.name}:{_number(lora.clip)}:{_number(lora.model)}>"


def read_comfy_prompt(path: str | os.PathLike[str]) -> str | None:
    """An image's ComfyUI ``prompt`` text (``None``: it has none): a PNG's ``prompt`` text chunk, else (a WebP
    ComfyUI saved) the EXIF Model tag's text after ``prompt:`` (:data:`COMFY_WEBP_PROMPT_TAG`)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(COMFY_PROMPT_KEY)
        if not isinstance(text, str) and "exif" in image.info:
            try:
                tagged = image.getexif().get(COMFY_WEBP_PROMPT_TAG)
            except Exception:  # malformed EXIF: no graph
                tagged = None
            if isinstance(tagged, bytes):
                tagged = tagged.decode("utf8", errors="replace")
            if isinstance(tagged, str) and tagged.startswith(f"{COMFY_PROMPT_KEY}:"):
                text = tagged[len(COMFY_PROMPT_KEY) + 1 :].rstrip("\0")
    return text if isinstance(text, str) else None


def parse_comfy_graph(text: str) -> dict[str, dict[str, Any]]:
    """The checked graph of a ``prompt`` text (a one-line error for bad JSON, missing nodes, cycles)."""
    try:
        nodes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the PNG's ComfyUI 'prompt' is not valid JSON ({exc})") from None
    return _check(nodes)


def _sampler_schedule(walk: _Walk, node: str, sampling: _Sampling) -> tuple[str | None, str | None]:
    """``(sampler, "Schedule type")`` of a sampler node as the infotext gives them: sdcore's id where
    :data:`SAMPLER_NAMES` has one (the schedule folded in where the id carries it), else ComfyUI's name."""
    sampler = sampling.sampler if isinstance(sampling.sampler, str) else None
    scheduler = sampling.scheduler if isinstance(sampling.scheduler, str) else None
    sid = SAMPLER_NAMES.get(sampler) if sampler is not None else None
    schedule = None
    if sid is not None and scheduler is not None:
        if (sampler if sampler == "ddim" else sid, scheduler) in _WITH_SCHEDULE:
            sid = _WITH_SCHEDULE[sampler if sampler == "ddim" else sid, scheduler]
        elif sid == "unipc":  # recall does not check timestep samplers' schedules: said, whichever it is
            # ComfyUI's KSampler computes steps + 1 sigmas and drops the penultimate for uni_pc, then steps to
            # sigma 0.001; sdcore's (A1111's) UniPC runs its own timesteps to sigma_min: never the same sigmas
            walk.notes[f"{node}:scheduler"] = f"scheduler {scheduler} (sdcore's {sid} runs its own)"
        else:
            schedule = SCHEDULE_TYPES.get(scheduler, scheduler)
    return sid or sampler, schedule


def _tags(loras: dict[str, _Lora]) -> list[str]:
    """The LoRA tags of a model/clip chain, the loader next to the checkpoint first."""
    return [_lora_tag(lora) for lora in reversed(list(loras.values()))]


def _prompt(text: str | None, tags: list[str]) -> str:
    """An A1111 prompt: the text, then the LoRA tags."""
    return " ".join([text, *tags]) if text else " ".join(tags)


def _second_pass(
    walk: _Walk,
    node: str,
    first: _Sampling,
    prompts: tuple[str | None, list[str], str, str | None],
    schedule: tuple[str | None, str | None],
) -> dict[str, str] | None:
    """A1111's hires fields of a hires graph's second sampler ``node``: "Hires steps" and "Denoising
    strength" (its steps and denoise: ComfyUI's last ``steps`` of an ``int(steps / denoise)``-step schedule is
    sdcore's hires pass of ``hr_steps`` at that strength, :meth:`~sdcore.generate.hires.HiresFix.schedule`),
    and the sampler, schedule, prompts, CFG where they differ from the first pass's (``prompts``: its prompt
    text, LoRA tags, negative, checkpoint; ``schedule``: its sampler and "Schedule type"). ``None``: not a second
    pass sdcore runs (no steps, no denoise in (0, 1])."""
    second = _sampling(walk, node)
    denoise = second.denoise if second.denoise is not None else 1.0
    if not isinstance(second.steps, int) or not isinstance(denoise, int | float) or not 0 < denoise <= 1:
        return None
    fields = {"Hires steps": str(second.steps), "Denoising strength": _number(denoise)}
    from .hires import img2img_steps

    # ComfyUI's KSampler.set_steps: above 0.9999 the plain schedule, else int(steps / denoise) of them
    comfy = second.steps if denoise > 0.9999 else int(second.steps / denoise)
    if img2img_steps(second.steps, float(fields["Denoising strength"]), requested=second.steps)[0] != comfy:
        walk.notes[f"{node}:denoise"] = (
            f"{walk.type(node)} denoise {_shown(denoise)} (ComfyUI's schedule is {comfy} steps, sdcore's "
            f"{img2img_steps(second.steps, float(denoise), requested=second.steps)[0]})"
        )
    sid, scheduled = _sampler_schedule(walk, node, second)
    if sid is not None and sid != schedule[0]:
        fields["Hires sampler"] = sid
    if scheduled is not None and scheduled != schedule[1]:
        fields["Hires schedule type"] = scheduled
    if isinstance(second.cfg, int | float) and float(second.cfg) != first.cfg:
        fields["Hires CFG Scale"] = _shown(float(second.cfg))
    text, tags, negative_text, model = prompts
    positive = _conditioning(walk, second.positive) if second.positive != first.positive else None
    negative = _conditioning(walk, second.negative) if second.negative != first.negative else None
    if second.model != first.model:  # another model chain: its LoRAs go with the hires prompt's tags
        loras: dict[str, _Lora] = {}
        chain: dict[str, Any] = {}
        _chain(walk, second.model, "model", loras, chain)
        if positive is not None:
            _chain(walk, positive.clip, "clip", loras, chain)
        if chain.get("model") not in (None, model):
            walk.notes[f"{node}:model"] = (
                f"{walk.type(node)} checkpoint {chain['model']} (sdcore's hires pass runs the first pass's "
                f"{model}, the --model taken)"
            )
        tags = _tags(loras)
    prompt = _prompt(text if positive is None else positive.text, tags)
    if prompt != _prompt(text, prompts[1]):
        fields["Hires prompt"] = prompt
    if negative is not None and negative.text is not None and negative.text != negative_text:
        fields["Hires negative prompt"] = negative.text
    if second.seed != first.seed:  # sdcore's (A1111's) hires pass draws its noise from the first pass's seed
        walk.notes[f"{node}:seed"] = (
            f"{walk.type(node)} seed {second.seed} (sdcore's hires pass draws its noise from the first pass's "
            f"seed {first.seed})"
        )
    walk.used.add(node)
    return fields


#: the generate option of a text encoder file, by the words its ComfyUI name holds (lower case, ``-``/``.``/space
#: read as ``_``): T5 (``t5xxl_fp16``, ``t5xxl_fp8_e4m3fn``, ``flan_t5_xxl``, ``umt5``), CLIP-L (``clip_l``,
#: ``clipl``, OpenAI's ``ViT-L-14`` fine-tunes), CLIP-G (``clip_g``, ``ViT-bigG-14``); a word must not run on into
#: another (``clip_gmp`` is not CLIP-G, ``bit5`` not T5)
_ENCODER_WORDS = (
    (re.compile(r"(?:^|[^a-z0-9]|um|flan)t5(?![0-9])"), "t5xxl"),
    (re.compile(r"(?:^|[^a-z0-9])(?:clip_?l|vit_?l)(?![a-z])"), "clip_l"),
    (re.compile(r"(?:^|[^a-z0-9])(?:clip_?g|vit_?big_?g)(?![a-z])"), "clip_g"),
)
#: TripleCLIPLoader's inputs in SD3's order (comfy_extras/nodes_sd3.py: clip_l, clip_g, t5xxl) for names
#: that say none of those words
_TRIPLE_ORDER = ("clip_l", "clip_g", "t5xxl")
#: a CLIP loader's ``type`` (nodes.py) -> the encoders a model of it takes, for the sdcore families with separate
#: encoder files; a loader of another type (``sdxl``, ``stable_diffusion``: encoders sdcore only reads from the
#: checkpoint) stays said. TripleCLIPLoader has no type: SD3's.
_CLIP_TYPES = {"flux": ("clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g", "t5xxl"), "chroma": ("t5xxl",)}


def _encoder_word(name: str) -> str | None:
    """The part option (``clip_l``/``clip_g``/``t5xxl``) the words of a text encoder file's name say; ``None``:
    none, or more than one."""
    stem = re.sub(r"[-. ]", "_", name.replace("\\", "/").rsplit("/", 1)[-1].lower())
    found = {option for pattern, option in _ENCODER_WORDS if pattern.search(stem)}
    return found.pop() if len(found) == 1 else None


def _encoder_options(kind: str, clip_type: Any, names: list[str]) -> dict[str, str] | None:
    """The part options a CLIP loader's files go to (option -> file name), ``None`` where sdcore cannot tell:
    each file by the words of its name (:func:`_encoder_word`); where a name says none, what is left of the
    loader's type's encoders when one is left (a FLUX ``DualCLIPLoader`` with a T5 file: the other is the
    CLIP-L, as ComfyUI tells the files by their weights, not their order; a ``chroma`` ``CLIPLoader``: the T5),
    else TripleCLIPLoader's SD3 order."""
    untyped = kind == "TripleCLIPLoader" or clip_type is None  # a graph from before the input: by the names
    taken = _CLIP_TYPES["sd3"] if untyped else _CLIP_TYPES.get(str(clip_type))
    if taken is None or len(names) > len(taken):
        return None
    options = [_encoder_word(name) for name in names]
    if any(option is not None and option not in taken for option in options):
        return None
    left = [option for option in taken if option not in options]
    unknown = [i for i, option in enumerate(options) if option is None]
    if unknown and kind == "TripleCLIPLoader" and len(unknown) == len(names):
        options = list(_TRIPLE_ORDER)
    elif len(unknown) == 1 and len(left) == 1:
        options[unknown[0]] = left[0]
    if None in options or len(set(options)) != len(options):
        return None
    return {str(option): name for option, name in zip(options, names, strict=True)}


def _loader_values(walk: _Walk, chain: dict[str, Any], recalled: Recalled) -> None:
    """The separate loaders' files as the options that take them (ComfyUI's FLUX/SD3 graphs: UNETLoader,
    DualCLIPLoader/TripleCLIPLoader/CLIPLoader, VAELoader): UNETLoader's ``unet_name`` is ``--model`` (a
    transformer-only file from ``unet/``/``diffusion_models/``, when no checkpoint names the model), the text
    encoders ``--clip-l``/``--clip-g``/``--t5xxl`` by their names, VAELoader's ``--vae``. They go with the
    graph's model: ``recalled.model_parts`` says each (as the ignored line would) for the run that gives
    ``--model`` and so takes none of them. A loader whose files sdcore cannot place stays in the ignored line."""
    parts: dict[str, Any] = {}
    for node, (kind, names) in chain.get("loaders", {}).items():
        if not all(isinstance(name, str) and name for name in names):
            continue
        if kind == "UNETLoader":
            if "model" in recalled.values or not names:
                continue
            found = {"model": names[0]}
            recalled.model_input = "unet_name"
        elif kind == "VAELoader":
            found = {"vae": names[0]}
        else:
            encoders = _encoder_options(kind, walk.value(node, "type"), names)
            if encoders is None:  # a name that says no encoder, two of one, or a type sdcore reads no file of
                continue
            found = dict(encoders)
        if any(option in parts for option in found):
            continue
        parts.update(found)
        walk.used.add(node)
        recalled.model_parts[walk.notes.pop(node)] = tuple(o for o in found if o != "model")
    recalled.values.update(parts)


def recall_comfy(text: str, *, sampler_given: bool = False, image_size: tuple[int, int] | None = None) -> Recalled:
    """The ``generate`` options a ComfyUI ``prompt`` graph sets (see the module docstring), as
    :func:`~sdcore.generate.recall.recall_parameters` gives them for an infotext; ``values["model"]`` is the
    checkpoint's ``ckpt_name``. What the graph does that sdcore does not follow is in ``ignored``.

    A two-pass ("hires fix") graph, KSampler -> LatentUpscale(By) -> KSampler, or KSampler -> VAEDecode ->
    ImageScale(By)/ImageUpscaleWithModel -> VAEEncode -> KSampler, is recalled as A1111's hires fix: the first
    sampler is the first pass, the second the "Hires ..." fields (:func:`_hires_fields`, :func:`_second_pass`).
    An SDXL base -> refiner graph recalls the base sampler, the refiner said. ``image_size``: the PNG's own size,
    checked against the size a hires graph makes (an upscale model's factor is only read from its file name)."""
    from .recall import recall_parameters

    walk = _Walk(parse_comfy_graph(text))
    sampler_node, output_path = _choose_sampler(walk)
    walk.used.update(n for n in output_path if walk.type(n) in (*_OUTPUT_NODES, "VAEDecode"))
    decoded: dict[str, Any] = {}
    for node in output_path:
        if node not in walk.used:
            walk.notes.setdefault(node, walk.type(node))
        elif walk.type(node) == "VAEDecode":  # a VAELoader's file is --vae's (_loader_values)
            _chain(walk, walk.link(node, "vae"), "vae", {}, decoded)
    upscale = _two_pass(walk, sampler_node)
    refiner = _refined(walk, sampler_node) if upscale is None else None
    last = sampler_node
    if upscale is not None:
        sampler_node = upscale.first
    elif refiner is not None:
        sampler_node = refiner
    sampling = _sampling(walk, sampler_node)
    positive, negative = _conditioning(walk, sampling.positive), _conditioning(walk, sampling.negative)
    loras: dict[str, _Lora] = {}
    chain: dict[str, Any] = {}
    _chain(walk, sampling.model, "model", loras, chain)
    _chain(walk, positive.clip, "clip", loras, chain)
    chain.setdefault("loaders", {}).update(decoded.get("loaders", {}))
    if negative.clip != positive.clip:
        _chain(walk, negative.clip, "clip", {}, {})

    flow = FlowSchedule(sampling.scheduler if isinstance(sampling.scheduler, str) else None, sampling.steps)
    if isinstance(chain.get("sampling"), str):  # said by FlowSchedule.check where it differs, not here
        node = chain["sampling"]
        kind = walk.type(node)
        flow.sampling = node, kind, {k: walk.value(node, k, v) for k, v in FLOW_SAMPLING[kind].items()}
        walk.notes.pop(node, None)
        walk.used.add(node)
    extra: dict[str, str] = {"RNG": RNG_SOURCE}  # ComfyUI's prepare_noise: CPU torch noise of the seed
    steps = sampling.steps if isinstance(sampling.steps, int) else None
    size: tuple[int, int] | None = None
    latent, batch = sampling.latent, None
    denoise = float(sampling.denoise) if isinstance(sampling.denoise, int | float) else 1.0
    if latent is not None and walk.type(latent) in _EMPTY_LATENTS:
        walk.used.add(latent)
        width, height = walk.value(latent, "width"), walk.value(latent, "height")
        if isinstance(width, int) and isinstance(height, int):
            size = (width, height)
        batch = walk.value(latent, "batch_size", 1)
    elif (
        latent is not None
        and walk.type(latent) == "VAEEncode"
        and steps is not None
        and not sampling.odd  # KSamplerAdvanced without noise, or stopping early: no img2img
        and (0 < denoise < 1 or 0 < sampling.start < steps)
    ):
        walk.used.add(latent)
        pixels = walk.link(latent, "pixels")
        if pixels is not None and walk.type(pixels) == "LoadImage":
            walk.used.add(pixels)
        # ComfyUI runs the last `steps` of an int(steps / denoise)-step schedule (KSampler.set_steps), or
        # KSamplerAdvanced's steps from start_at_step on; sdcore counts A1111's way (hires.img2img_steps)
        schedule, run = (steps, steps - sampling.start) if sampling.start else (int(steps / denoise), steps)
        extra["Denoising strength"] = _number(a1111_strength(schedule, run))
        steps, sampling.start = schedule, 0
    for encoded in (positive, negative):  # sdcore conditions SDXL on the image's size, uncropped (diffusers')
        if encoded.sdxl is not None and size is not None and encoded.sdxl[1] != (*size, 0, 0, *size):
            w, h, cw, ch, tw, th = encoded.sdxl[1]
            size_said = f"size conditioning {w}x{h}, crop {cw},{ch}, target {tw}x{th}"
            walk.notes[encoded.sdxl[0]] = f"{walk.notes.get(encoded.sdxl[0], 'CLIPTextEncodeSDXL')}, {size_said}"
    if refiner is not None:  # the base's own steps stand for the whole image; the refiner is said instead
        sampling.odd = [odd for odd in sampling.odd if not odd.startswith(("end_at_step", "return_with"))]
    if sampling.start:  # on an empty latent, or another sampler's: not a txt2img sdcore can run
        sampling.odd.insert(0, f"start_at_step {sampling.start}")
    if sampling.odd:
        walk.notes[sampler_node] = f"{walk.type(sampler_node)} ({', '.join(sampling.odd)})"
    if denoise < 1 and "Denoising strength" not in extra:
        walk.notes[sampler_node] = walk.notes.get(sampler_node, walk.type(sampler_node)) + f" denoise {denoise:g}"

    sid, schedule_type = _sampler_schedule(walk, sampler_node, sampling)
    if schedule_type is not None:
        extra[SCHEDULE_TYPE] = schedule_type
    if "clip_skip" in chain:
        extra["Clip skip"] = str(chain["clip_skip"])
    if positive.guidance is not None:
        from .recall import DISTILLED_CFG

        extra[DISTILLED_CFG] = _shown(positive.guidance)

    prompt = _prompt(positive.text, _tags(loras))
    sampling.cfg = float(sampling.cfg) if isinstance(sampling.cfg, int | float) else None
    if upscale is not None:
        hires = second = None
        why = ""
        if "Denoising strength" in extra:  # A1111's (sdcore's) img2img has no hires fix
            why = ": its first pass is an img2img"
        elif size is None:
            why = ": its first pass's size is not read"
        else:
            hires = _hires_fields(walk, upscale, size)
        if hires is not None:
            model = chain.get("model") if isinstance(chain.get("model"), str) else None
            texts = (positive.text, _tags(loras), negative.text or "", model)
            second = _second_pass(walk, last, sampling, texts, (sid, schedule_type))
        if hires is not None and second is not None:
            extra.update(hires)
            extra.update(second)
            if image_size is not None and upscale.final is not None and tuple(image_size) != upscale.final:
                guessed = f"; {upscale.guessed}" if upscale.guessed else ""
                walk.notes["image_size"] = (
                    f"the image is {image_size[0]}x{image_size[1]} where the graph's second pass makes "
                    f"{upscale.final[0]}x{upscale.final[1]}{guessed}"
                )
        else:  # a size or second pass sdcore cannot work out: the graph is said as before
            walk.notes[last] = f"{walk.type(last)} (a second pass sdcore cannot read as its hires fix{why})"
    if refiner is not None:
        refined = _sampling(walk, last)
        found: dict[str, Any] = {}
        _chain(walk, refined.model, "model", {}, found)
        walk.used.update(n for n in _ancestors(walk, last) if n not in _ancestors(walk, sampler_node))
        walk.notes.pop(last, None)
        base = chain.get("model")
        start = walk.value(last, "start_at_step", 0)
        refine = "--model the refiner --init-image"
        if isinstance(start, int) and isinstance(refined.steps, int) and 0 <= start < refined.steps:
            # its last steps - start steps: sdcore's img2img of `steps` at the strength running them
            strength = _number(a1111_strength(refined.steps, refined.steps - start))
            refine += (
                f" --steps {refined.steps} --denoising-strength {strength}: its last {refined.steps - start} steps"
            )
        walk.notes[last] = (
            f"refiner {walk.type(last)} {last} (checkpoint {found.get('model')}, steps from {start} of "
            f"{refined.steps}): sdcore has no refiner switch in one run; the base {walk.type(sampler_node)} "
            f"{sampler_node} (checkpoint {base}, the --model taken) runs all {steps} steps (refine the image "
            f"afterwards: {refine})"
        )
    parameters = GenerationParameters(
        prompt=prompt,
        negative_prompt=negative.text or "",
        steps=steps,
        sampler=sid,
        cfg=sampling.cfg,
        seed=sampling.seed if isinstance(sampling.seed, int) else None,
        size=size,
        model_name=chain.get("model"),
        extra=extra,
    )
    recalled = recall_parameters(parameters, sampler_given=sampler_given)
    if positive.text is None:  # the prompt comes from a node sdcore cannot read: PROMPT is needed
        recalled.values.pop("prompt")
    if isinstance(chain.get("model"), str):
        recalled.values["model"] = chain["model"]
    _loader_values(walk, chain, recalled)
    flow.size, flow.steps = size, steps  # an img2img's: the int(steps / denoise)-step schedule ComfyUI cuts
    if upscale is not None and "hires" in recalled.values:
        flow.hires, flow.hires_fix = upscale.final, recalled.parameters.hires_fix()
    recalled.flow_schedule = flow.check
    if isinstance(batch, int):
        recalled.values["batch"] = batch
    ignored = list(walk.notes.values())
    for node in _ancestors(walk, output_path[0] if output_path else sampler_node):
        if node not in walk.used and node not in walk.notes:  # met, not followed: its type (and its text)
            said = walk.inputs(node).get("text")
            ignored.append(
                walk.type(node) + (f" {json.dumps(said, ensure_ascii=False)}" if isinstance(said, str) else "")
            )
    if isinstance(batch, int) and batch > 1:
        ignored.append(
            f"batch_size {batch} noise (ComfyUI draws the batch from one seed, sdcore image i from seed+i: the "
            "first image matches)"
        )
    recalled.ignored = list(dict.fromkeys(ignored)) + recalled.ignored
    return recalled


__all__ = [
    "COMFY_PROMPT_KEY",
    "COMFY_WEBP_PROMPT_TAG",
    "SAMPLER_NAMES",
    "SCHEDULE_TYPES",
    "a1111_strength",
    "parse_comfy_graph",
    "read_comfy_prompt",
    "recall_comfy",
]
