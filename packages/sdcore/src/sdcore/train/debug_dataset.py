"""``sdcore train <method> --debug-dataset``: what the model would be shown, without a model.

kohya's ``--debug_dataset`` loads the dataset, shows each batch's images and captions in a window
and trains nothing. Here the same idea suits a shell: the first ``--debug-dataset-steps`` optimizer
steps of the run are walked through the runtime's own parts (the epoch plans of
:class:`~sdcore.train.data.TrainData`, :meth:`BatchMaker.caption` and :meth:`BatchMaker.pixels`, the
loss-mask loader), so every bucket, repeat, flip, random/face crop, colour augmentation, caption
shuffle/dropout/wildcard/token warm-up and mask is drawn by the code a training run uses, from the same
per-sample generators: what is printed is what the same seed trains on. Each sample's augmented image
(and mask) is written as a PNG. No model is loaded or even opened, so it works before a model is
downloaded. Cached latents are a VAE encoding of exactly the pixels written here (the cache is
filled from the same loader, without random crops or colour, which need ``--no-cache-latents``).

Not shown: class images a method has yet to generate with the model (DreamBooth's ``--class-prompt``
fills ``--class-data`` before training; the images already there are shown), a method's own loss
maps (DreamArtist's attention maps) and OneTrainer's mask augmentations of images without a mask on an
inpainting model (only the model says it has a mask input; :attr:`TrainData.mask_input` stays off here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..data.augment import ColorAug
    from .method import TrainingMethod
    from .options import TrainOptions

#: the folder beside the output when ``--debug-dataset-dir`` is not given
DEFAULT_FOLDER = "debug_dataset"


@dataclass(frozen=True)
class DebugSample:
    """One sample of one micro-batch, as the trainer would build it."""

    step: int  # 1-based optimizer step
    epoch: int  # 1-based
    micro_batch: int  # index within the step (gradient accumulation)
    image: Path
    repeat: int  # which use of the image within the epoch (0 = first)
    is_class: bool
    bucket: tuple[int, int]  # (width, height) of the bucket
    original: tuple[int, int]  # (height, width) before resizing (SDXL's original_size)
    crop: tuple[int, int]  # (top, left) in the resized image (SDXL's crop_coords_top_left)
    flip: bool
    color: ColorAug | None
    caption: str
    loss_weight: float
    image_file: Path
    mask_file: Path | None

    def line(self) -> str:
        """One line for the terminal."""
        w, h = self.bucket
        parts = [
            f"step {self.step} (epoch {self.epoch}, micro-batch {self.micro_batch + 1} of the step)",
            f"{self.image}" + (f" #{self.repeat + 1}" if self.repeat else ""),
            "class image" if self.is_class else "",
            f"bucket {w}x{h}",
            f"original {self.original[1]}x{self.original[0]}",
            f"crop top,left {self.crop[0]},{self.crop[1]}",
            f"flip {'yes' if self.flip else 'no'}",
            f"color {self.color.kind} {self.color.value:.3g}" if self.color is not None else "",
            f"loss weight {self.loss_weight:g}",
            f'caption: "{self.caption}"',
        ]
        return ", ".join(p for p in parts if p)


def debug_folder(method: TrainingMethod[Any], options: TrainOptions) -> Path:
    """``--debug-dataset-dir``, else ``debug_dataset/`` beside the result."""
    if options.debug_dataset_dir:
        return Path(options.debug_dataset_dir).expanduser()
    from .checkpoints import output_paths

    output, _ = output_paths(method, options)
    return output.parent / DEFAULT_FOLDER


def debug_dataset(
    method: TrainingMethod[Any], *, say: Callable[[str], None] | None = None, steps: int | None = None
) -> list[DebugSample]:
    """Walk the first ``steps`` (default ``--debug-dataset-steps``) optimizer steps of ``method``'s run
    without a model, write each sample's image (and mask) as a PNG and return what each sample is.

    Raises :class:`~sdcore.train.preflight.PreflightError` for bad options (the model is not checked).
    """
    from .batches import BatchMaker
    from .cache import TextCache, uses_text_cache
    from .data import build_train_data, image_option_problems, total_steps_for
    from .options import apply_model_defaults
    from .preflight import PreflightError, option_problems

    o = method.options
    say = say or (lambda line: None)
    count = o.debug_dataset_steps if steps is None else steps
    problems = option_problems(o, method)
    if count < 1:
        problems.append(f"--debug-dataset-steps must be at least 1, got {count}")
    if problems:
        raise PreflightError(problems)
    from .preflight import resolve_model_names

    resolve_model_names(o, say=say)  # --model NAME with --models-dir: the header read below is its file's
    if not apply_model_defaults(o):  # only a model's header tells its native size
        raise ConfigError(
            "--debug-dataset loads no model, so the model's native size is unknown here: give --resolution"
        )
    caps = method.capabilities()
    class_data = method.regularization_data()  # DreamBooth's --class-data: the trainer adds it after prepare
    if class_data is not None and not o.reg_data and class_data.is_dir():
        import dataclasses

        say(f"class images: {class_data} as it is now (a method may add images generated with the model)")
        o = dataclasses.replace(o, reg_data=str(class_data))
    data = build_train_data(o, balance_class=caps.balance_class, auxiliary=method.is_auxiliary_file)
    problems = image_option_problems(o, data.index)
    if problems:
        raise PreflightError(problems)
    total, max_epochs = total_steps_for(o, data)
    no_model: Any = None  # nothing below reads the model: pixels and captions only
    text_cache = None
    from ..models.layout import peek_family
    from .cache import partial_text_encoders

    partial = partial_text_encoders(o, caps, peek_family(o.model) if o.model else None, method)
    if uses_text_cache(o, data, trains_text_encoder=caps.trains_text_encoder or not caps.cacheable_text,
                       partial=bool(partial)):  # fmt: skip
        # the variants are plain strings drawn without a model; only ``fill`` would encode them
        text_cache = TextCache(no_model, method, data.entries, seed=o.seed, variants=o.caption_variants)
    batches = BatchMaker(data, method, caps, o, no_model, "cpu", text_cache=text_cache, total_steps=total)
    folder = debug_folder(method, o)
    folder.mkdir(parents=True, exist_ok=True)
    say(data.index.summary())
    say(
        f"{len(data.epoch_plan(0))} micro-batches of {data.batch_sizes_text} per epoch, gradient accumulation "
        f"{o.gradient_accumulation}: {total} optimizer steps; showing the first {min(count, total)}"
    )
    samples: list[DebugSample] = []
    step = epoch = position = 0
    accum = o.gradient_accumulation
    while step < min(count, total) and (max_epochs is None or epoch < max_epochs):
        plan = data.epoch_plan(epoch)  # the loop's walk: accumulation groups, epochs end at the plan's end
        if position >= len(plan):
            if not plan:
                raise ConfigError("an epoch has no batches (dataset empty)")
            epoch, position = epoch + 1, 0
            continue
        group = plan[position : position + accum]
        for micro, refs in enumerate(group):
            for slot, ref in enumerate(refs):
                sample = _sample(batches, ref, step=step, micro=micro, slot=slot, folder=folder)
                samples.append(sample)
                say(sample.line())
        step += 1
        position += len(group)
        if position >= len(plan):
            epoch, position = epoch + 1, 0
    say(f"wrote {len(samples)} images to {folder}; no model was loaded and nothing was trained")
    return samples


def _sample(batches: Any, ref: Any, *, step: int, micro: int, slot: int, folder: Path) -> DebugSample:
    from .data import has_dataset_mask, load_mask, trained_pixel_mask

    data, options = batches.data, batches.options
    entry, assignment = data.entries[ref.entry], data.assignments[ref.entry]
    view = data.view_of(ref)
    array, original, crop = batches.pixels(ref.entry, view)
    caption = batches.caption(ref, step)
    stem = f"{step + 1:05d}_{micro}_{slot}_{entry.path.stem}"
    image_file = _write_png(folder / f"{stem}.png", (array.transpose(1, 2, 0) + 1.0) * 127.5)
    mask_file = None
    if has_dataset_mask(entry):
        mask = load_mask(entry, view.apply(assignment), flip=view.flip)  # the loss mask's own loader
        if mask is not None:  # with the values the loss gives it (a segmentation mask: binary)
            mask_file = _write_png(folder / f"{stem}_mask.png", trained_pixel_mask(entry, mask) * 255.0)
    return DebugSample(
        step=step + 1,
        epoch=ref.epoch + 1,
        micro_batch=micro,
        image=entry.path,
        repeat=ref.occurrence,
        is_class=entry.is_class,
        bucket=assignment.bucket,
        original=(int(original[0]), int(original[1])),
        crop=(int(crop[0]), int(crop[1])),
        flip=view.flip,
        color=view.color,
        caption=caption,
        loss_weight=(float(options.prior_loss_weight) if entry.is_class else 1.0)
        * float(getattr(entry.subset, "loss_weight", 1.0)),
        image_file=image_file,
        mask_file=mask_file,
    )


def _write_png(path: Path, values: Any) -> Path:
    import numpy as np
    from PIL import Image

    from ..io import atomic_path

    pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path
