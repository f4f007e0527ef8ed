"""Skip Layer Guidance (SLG) for SD3/SD3.5: Stability's recommendation for SD3.5 Medium (layers 7, 8, 9).

On some steps the transformer runs once more on the prompt alone with some of its joint blocks skipped, and the
guided prediction is pushed away from that weakened one. The rule is diffusers' ``StableDiffusion3Pipeline``
(``skip_guidance_layers``, ``skip_layer_guidance_scale`` 2.8, ``skip_layer_guidance_start`` 0.01,
``skip_layer_guidance_stop`` 0.2; ComfyUI's ``SkipLayerGuidanceSD3`` node adds the same term but defaults to
3.0/0.01/0.15 and picks steps by sigma, bounds included, and at CFG 1 too: docs/generation.md), facts rewritten here:

- only with CFG (diffusers applies it inside ``do_classifier_free_guidance``, i.e. CFG above 1); sdcore refuses
  SLG with a CFG of 1 or less instead of ignoring it in silence;
- evaluation ``i`` (counted from 0 in the pipeline's loop) of a pass of ``n`` gets it when
  ``n * start < i < n * end`` (both strict);
- the extra pass: the transformer on the un-doubled latents, the prompt's embeddings and pooled vectors, with
  ``skip_layers`` = the chosen block indices; then ``guided + (cond - skipped) * scale``, where ``guided`` is the
  CFG mix ``uncond + cfg * (cond - uncond)`` and ``cond`` the prompt's own prediction
  (:func:`skip_layer_guided`, the one place the formula lives).

diffusers' img2img and inpaint SD3 pipelines have no SLG; sdcore applies the same rule on every pass it runs on
SD3 (txt2img, img2img, inpainting, the hires fix's second pass) through one hook (:meth:`SkipLayerGuidance.installed`):
``n`` is the evaluations the pass actually runs (img2img: the steps its strength leaves; the hires pass: its own
steps) and ``i`` counts from its first, which is how diffusers' own img2img loop counts ``i`` and its
``num_inference_steps``. On txt2img with a one-evaluation sampler (``euler``, ``euler_a``, ``dpm++2m``, ``unipc``)
that is exactly diffusers' txt2img rule. Heun evaluates twice a step (``2 * steps - 1`` evaluations); there
sdcore counts evaluations on both sides of the rule so the fractions keep their meaning, where diffusers would
count Heun's evaluations against its step count (its window would end at about half of ``end``).

Infotext: ``Skip layer guidance: "7,8,9"``, ``SLG scale: 2.8``, ``SLG start: 0.01``, ``SLG end: 0.2`` (all four
whenever SLG is on), read back by ``--from-png``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle

#: diffusers' ``StableDiffusion3Pipeline`` defaults (also Stability's SD3.5 Medium recommendation)
DEFAULT_SCALE, DEFAULT_START, DEFAULT_END = 2.8, 0.01, 0.2
#: Stability's layers for SD3.5 Medium (the example in the help; there is no default)
MEDIUM_LAYERS = (7, 8, 9)
LAYERS_FIELD, SCALE_FIELD, START_FIELD, END_FIELD = "Skip layer guidance", "SLG scale", "SLG start", "SLG end"
FIELDS = (LAYERS_FIELD, SCALE_FIELD, START_FIELD, END_FIELD)
#: the only family whose transformer takes ``skip_layers``
FAMILY = "sd3"


def family_problem(label: str) -> str:
    """The line for SLG asked of a model of another family (``label``: its name)."""
    return f"skip layer guidance (--slg-layers) is for SD3/SD3.5 models; this is a {label} model"


def parse_layers(text: str) -> tuple[int, ...]:
    """``"7,8,9"`` (or ``"7 8 9"``) as block indices; a :class:`ValueError` naming what is wrong."""
    items = [item for item in text.replace(",", " ").split() if item]
    if not items:
        raise ValueError(f"--slg-layers {text!r}: give transformer block indices, e.g. 7,8,9")
    layers: list[int] = []
    for item in items:
        try:
            layer = int(item)
        except ValueError:
            raise ValueError(
                f"--slg-layers {text!r}: {item!r} is not a block index (whole numbers, e.g. 7,8,9)"
            ) from None
        if layer < 0:
            raise ValueError(f"--slg-layers {text!r}: block indices start at 0, got {layer}")
        if layer not in layers:
            layers.append(layer)
    return tuple(layers)


def skip_layer_guided(guided: Any, cond: Any, skipped: Any, scale: float) -> Any:
    """``guided + (cond - skipped) * scale``: diffusers' SLG step, in its order of operations (so a txt2img is
    bit for bit the pipeline's). ``guided``: the CFG mix; ``cond``: the prompt's prediction; ``skipped``: the
    prompt's prediction with the chosen blocks skipped."""
    return guided + (cond - skipped) * scale


@dataclass(frozen=True)
class SkipLayerGuidance:
    """One SLG setting: the transformer blocks to skip, the scale and the window (fractions of the pass)."""

    layers: tuple[int, ...]
    scale: float = DEFAULT_SCALE
    start: float = DEFAULT_START
    end: float = DEFAULT_END

    def problems(self) -> list[str]:
        """What is wrong with the setting itself (the model's block count is :meth:`model_problem`'s)."""
        found = []
        if not self.layers:
            found.append("--slg-layers: give transformer block indices, e.g. 7,8,9")
        if not math.isfinite(self.scale):
            found.append(f"--slg-scale must be a number, got {self.scale}")
        if not 0.0 <= self.start < self.end <= 1.0:
            found.append(
                f"skip layer guidance runs from --slg-start to --slg-end, fractions of the steps with "
                f"0 <= start < end <= 1; got {self.start} and {self.end}"
            )
        return found

    @staticmethod
    def cfg_problem(cfg: float | None, option: str = "--cfg") -> str | None:
        """The line for a CFG scale that leaves no guided call to add SLG to (``None`` when it is above 1)."""
        if cfg is None or cfg > 1.0:
            return None
        return (
            f"skip layer guidance (--slg-layers) works on CFG's prompt prediction and needs {option} above 1 "
            f"(as diffusers'); got {cfg}"
        )

    def model_problem(self, bundle: ModelBundle) -> str | None:
        """The line for block indices the loaded model does not have (``None`` when all are there)."""
        if bundle.family != FAMILY:
            return family_problem(bundle.family_spec.label)
        count = len(bundle.transformer.transformer_blocks)
        missing = [layer for layer in self.layers if layer >= count]
        if not missing:
            return None
        return (
            f"--slg-layers {','.join(map(str, missing))}: this SD3 transformer has {count} blocks "
            f"(indices 0-{count - 1})"
        )

    def check(self, bundle: ModelBundle, *cfgs: tuple[float, str]) -> None:
        """Every problem of using this on ``bundle`` with ``cfgs`` (``(scale, option name)`` of each pass), on
        one line."""
        found = list(self.problems())
        if (trouble := self.model_problem(bundle)) is not None:
            found.append(trouble)
        found += [line for cfg, option in cfgs if (line := self.cfg_problem(cfg, option)) is not None]
        if found:
            raise ConfigError("; ".join(dict.fromkeys(found)))

    def applies(self, index: int, count: int) -> bool:
        """Whether evaluation ``index`` (from 0) of a pass of ``count`` evaluations gets SLG (diffusers' rule)."""
        return count * self.start < index < count * self.end

    def infotext_fields(self) -> dict[str, Any]:
        """The infotext fields (see the module doc; the numbers as the infotext writes floats)."""
        return {
            LAYERS_FIELD: ",".join(map(str, self.layers)),
            SCALE_FIELD: float(self.scale),
            START_FIELD: float(self.start),
            END_FIELD: float(self.end),
        }

    @classmethod
    def option_values(cls, fields: Mapping[str, str]) -> dict[str, Any]:
        """The ``generate`` options an infotext's SLG fields set (none without ``Skip layer guidance``); a bad
        value is a :class:`ValueError`."""
        if LAYERS_FIELD not in fields:
            return {}
        values: dict[str, Any] = {"slg_layers": ",".join(map(str, parse_layers(fields[LAYERS_FIELD])))}
        for name, key in (("slg_scale", SCALE_FIELD), ("slg_start", START_FIELD), ("slg_end", END_FIELD)):
            if key in fields:
                values[name] = float(fields[key])
        return values

    @contextlib.contextmanager
    def installed(self, pipe: Any) -> Iterator[None]:
        """While inside, ``pipe`` (an SD3 pipeline: txt2img or img2img) runs with SLG: a forward hook on its
        transformer runs the skip pass on the evaluations the rule picks, and ``pipe.scheduler.step`` steps
        with :func:`skip_layer_guided` of the guided output it is given. One pipeline call per block (its count
        of evaluations starts at 0). Calls the transformer makes inside another hook (``AND``'s extra parts)
        are not evaluations and are left alone."""
        from .step_conditioning import output_tensor

        transformer, scheduler = pipe.transformer, pipe.scheduler
        layers = list(self.layers)
        state: dict[str, Any] = {"depth": 0, "calls": 0, "pending": None}

        def before_call(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            state["depth"] += 1

        def after_call(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            state["depth"] -= 1
            if state["depth"]:  # a call made while another runs
                return
            index = state["calls"]
            state["calls"] += 1
            if not pipe.do_classifier_free_guidance or not self.applies(index, int(pipe.num_timesteps)):
                return
            out = output_tensor(output)
            batch = out.shape[0] // 2  # [uncond, cond]
            prompt_rows = {key: _prompt_half(value, batch) for key, value in kwargs.items()}
            prompt_rows.update(skip_layers=layers, return_dict=False)
            # forward itself: the hooks (this one, prompt editing's) count the pipeline's evaluations only
            skipped = module.forward(**prompt_rows)[0]
            state["pending"] = (out[batch:], skipped)

        step = scheduler.step
        own = vars(scheduler).get("step")  # another wrapper's, put back on leaving

        def guided_step(model_output: Any, *args: Any, **kwargs: Any) -> Any:
            if state["pending"] is not None:
                cond, skipped = state["pending"]
                state["pending"] = None
                model_output = skip_layer_guided(model_output, cond, skipped, self.scale)
            return step(model_output, *args, **kwargs)

        handles = [
            transformer.register_forward_pre_hook(before_call, with_kwargs=True),
            transformer.register_forward_hook(after_call, with_kwargs=True),
        ]
        scheduler.step = guided_step
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            if own is None:
                vars(scheduler).pop("step", None)
            else:
                scheduler.step = own


def _prompt_half(value: Any, batch: int) -> Any:
    """The prompt's rows of a guided call's argument ``[uncond, cond]`` (other arguments as they are)."""
    if getattr(value, "ndim", 0) > 0 and value.shape[0] == 2 * batch:
        return value[batch:]
    return value


__all__ = [
    "DEFAULT_END",
    "DEFAULT_SCALE",
    "DEFAULT_START",
    "FIELDS",
    "MEDIUM_LAYERS",
    "SkipLayerGuidance",
    "family_problem",
    "parse_layers",
    "skip_layer_guided",
]
