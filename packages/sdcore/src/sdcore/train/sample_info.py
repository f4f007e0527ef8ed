"""A1111 infotext for the sample images rendered during training (the same ``parameters`` PNG
chunk ``sdcore generate`` writes, from :mod:`sdcore.generate.pnginfo`), so an image browser,
A1111's "PNG Info" tab or Civitai shows the prompt, seed and settings of each sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import TrainOptions
    from .sample_prompts import SamplePrompt

#: a PNG text chunk holding every sample's infotext (JSON list) when a grid holds several prompts;
#: the ``parameters`` chunk holds the first one, as A1111 does for its grids
ALL_PARAMETERS_KEY = "sdcore-sample-parameters"


def sample_infotexts(
    options: TrainOptions,
    step: int,
    calls: list[tuple[list[SamplePrompt], int]],
    images: list[Any],
    extra: dict[str, Any],
) -> list[str]:
    """One infotext per rendered image, from the generation ``calls`` that rendered them
    (:func:`~sdcore.train.sample_prompts.generation_calls`): prompt, negative prompt, steps,
    sampler, CFG and size as each prompt line set them (the run's defaults otherwise), seed (A1111's
    ``seed + i`` batch rule, as :func:`~sdcore.generate.pipeline.generate_images` uses), model name,
    clip skip, and the training step."""
    from .. import __version__
    from ..generate.pnginfo import format_parameters

    try:
        format_parameters("", sampler="euler_a")  # needs the generation pipeline's sampler table
    except ImportError:  # a partial install (or a test's stand-in pipeline): samples without infotext
        return []
    o = options
    model = str(o.model)
    model_name = model if model.startswith("tiny:") else Path(model).stem
    per_image = [(prompt, first + index) for group, first in calls for index, prompt in enumerate(group)]
    texts = []
    for (prompt, seed), image in zip(per_image, images, strict=False):
        fields: dict[str, Any] = {}
        if o.clip_skip > 1:
            fields["Clip skip"] = o.clip_skip
        fields["Training step"] = step
        fields["Version"] = f"sdcore {__version__}"
        cfg = prompt.cfg if prompt.cfg is not None else float(extra.get("cfg", 7.0))
        texts.append(
            format_parameters(
                prompt.prompt,
                prompt.negative,
                prompt.steps or o.sample_steps,
                prompt.sampler or o.sample_sampler,
                cfg,
                seed,
                image.size,
                None,
                model_name,
                fields,
            )
        )
    return texts


def grid_pnginfo(texts: list[str]) -> Any:
    """The PNG text chunks of a sample grid: ``parameters`` (the first image's) and, for several
    images, :data:`ALL_PARAMETERS_KEY` with all of them."""
    from PIL.PngImagePlugin import PngInfo

    from ..generate.pnginfo import PARAMETERS_KEY

    info = PngInfo()
    if texts:
        add = info.add_text if texts[0].isascii() else info.add_itxt
        add(PARAMETERS_KEY, texts[0])
    if len(texts) > 1:
        info.add_itxt(ALL_PARAMETERS_KEY, json.dumps(texts, ensure_ascii=False))
    return info


__all__ = ["ALL_PARAMETERS_KEY", "grid_pnginfo", "sample_infotexts"]
