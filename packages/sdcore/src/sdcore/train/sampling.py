"""Sample images during training: ``--sample-prompts`` rendered into a grid every ``--sample-every``
steps (and once at the end) as ``<result stem>-samples/<tag>.png``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .method import TrainingMethod
from .options import TrainOptions

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle

log = logging.getLogger("sdcore.train")


def sample_prompt_list(options: TrainOptions) -> list[str]:
    """``--sample-prompts``: a ``.txt`` file (one prompt a line, ``#`` comments) or one prompt."""
    text = options.sample_prompts or ""
    path = Path(text).expanduser()
    if text.endswith(".txt") or (len(text) < 4096 and path.is_file()):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--sample-prompts {text}: {exc.strerror or exc}") from exc
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [text]


def render_samples(
    bundle: ModelBundle, method: TrainingMethod[Any], options: TrainOptions, *, device: Any, folder: Path, tag: str
) -> Path | None:
    """Render the sample prompts with the model as it trains into ``folder/<tag>.png`` (a grid).

    Modules the caches moved off ``device`` (VAE, text encoders) come back for the render and go
    back to the CPU afterwards.
    """
    try:
        from ..generate.pipeline import generate_images
    except ImportError:
        log.warning("sample images need sdcore.generate.pipeline, which is not available")
        return None
    import torch

    prompts = sample_prompt_list(options)
    if not prompts:
        return None
    moved = []
    for module in [bundle.vae, *bundle.text_encoders]:
        if next(module.parameters()).device != device:
            module.to(device)
            moved.append(module)
    try:
        with torch.no_grad(), method.sampling(bundle) as extra:
            images = generate_images(
                bundle,
                prompts,
                steps=options.sample_steps,
                seed=options.seed,
                width=options.resolution,
                height=options.resolution,
                clip_skip=options.clip_skip,
                **extra,
            )
    finally:
        for module in moved:
            module.to("cpu")
    path = folder / f"{tag}.png"
    write_grid(images, path)
    return path


def write_grid(images: list[Any], path: Path) -> None:
    """Up to 4 images a row, written atomically as PNG."""
    from PIL import Image

    from ..io import atomic_path

    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
