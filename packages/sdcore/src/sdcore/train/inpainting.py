"""Training inpainting models: SD1.5/SD2/SDXL inpainting UNets (9 input channels) and FLUX.1 Fill [dev].

An inpainting model denoises its latents *given* a mask and the image with the masked area blanked out; a
training sample therefore carries that conditioning beside its latents. OneTrainer is the peer that trains
these models (model types ``STABLE_DIFFUSION_15_INPAINTING``, ``..._20_INPAINTING``, ``..._XL_10_BASE_INPAINTING``,
``FLUX_FILL_DEV_1``); sdcore builds the conditioning by its rules (its data loader and mgds modules):

- the mask: the sample's dataset mask when it has one (OneTrainer's ``-masklabel.png`` with
  ``masked_training``; kohya's ``alpha_mask`` / ``--masked-loss`` mask images read the same way here), else a
  full mask (OneTrainer's ``GenerateImageLike`` of 255: the whole image is the hole, no random masks). The
  mask follows its image's resize, crop and flip (:func:`sdcore.train.data.load_mask`). 1 (white) = repaint.
  With ``--inpainting-masks random`` (kohya's ``--train_inpainting``) it is instead a procedural mask drawn anew
  for each sample every step (:mod:`sdcore.train.random_masks`: kohya's clouds, polygons and shapes, seeded by
  ``--seed`` and the sample's draw) at the sample's pixel size; dataset masks then only weigh the loss, as
  kohya's ``alpha_mask`` / ``--masked_loss`` do beside its random masks. The masked image changes every step,
  so latents are not cached (kohya refuses ``--cache_latents`` with ``--train_inpainting``). kohya shrinks its
  mask with nearest-neighbour interpolation and encodes the masked image with a posterior *sample*; sdcore keeps
  one conditioning for both sources (the bilinear shrink and the posterior mean below).
- the masked image: ``image * (1 - mask) + 0.5 * mask`` on 0..1 pixels (mgds' ``GenerateMaskedConditioningImage``),
  which in the [-1, 1] range the VAE takes is ``pixels * (1 - mask)``: the hole is 0, mid grey, as diffusers'
  ``StableDiffusionInpaintPipeline`` (``image * (mask < 0.5)``) and ``FluxFillPipeline`` (``image * (1 - mask)``)
  make it at generation time. It is made from the colour-augmented pixels (OneTrainer's order).
- its latents: the VAE posterior's *mean* (OneTrainer's ``SampleVAEDistribution(mode='mean')``), then the
  family's shift and scale as every latent; cached beside the latents (:class:`sdcore.train.cache.LatentCache`).
- the mask at latent size: SD's UNet takes one channel, the pixel mask shrunk by OneTrainer's ``ScaleImage(0.125)``
  (torchvision's bilinear resize with antialias); FLUX.1 Fill takes 64, each 8x8 pixel block laid out as
  channels (``ShuffleFluxFillMaskChannels``, the same view/permute as ``FluxFillPipeline.prepare_mask_latents``).
- a custom conditioning image (``--inpainting-conditioning-images``, OneTrainer's ``custom_conditioning_image``):
  the ``<stem>-condlabel.png`` beside an image *is* its masked image, as it is (no hole blanked: e.g. the scene
  with the object removed, to teach object removal), given the image's resize, crop, flip and colour
  augmentation (OneTrainer lists it with the image in ``ScaleCropImage``, ``RandomFlip`` and the colour
  modules); an image without one gets the masked image above (mgds' ``SelectFirstInput``). The mask still comes
  from the dataset (or is full). The ``-condlabel`` files are not training images.
- ``unmasked_probability`` (``--inpainting-unmasked-probability``): per sample draw, the mask becomes a full
  one and the masked-image latents those of an all-zero (grey) image (mgds' ``RandomLatentMaskRemove``; the
  latent mode of a zero image); the dataset mask then no longer weighs that sample's loss either (OneTrainer's
  loss reads the same replaced mask).
- the denoiser input: SD ``[noisy, mask, masked latents]`` on the channels (OneTrainer's
  ``BaseStableDiffusionSetup.predict``, diffusers' inpaint pipelines' ``latent_model_input``); FLUX.1 Fill
  ``[noisy, masked latents, mask]`` on the channels before packing, which is diffusers' packed
  ``cat(latents, masked_image_latents, mask)`` (``BaseFluxSetup.predict``): the adapters' ``predict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.dataset import CONDITIONING_SUFFIX

if TYPE_CHECKING:
    import torch

    from ..data.buckets import BucketAssignment
    from ..data.dataset import DatasetIndex, ImageEntry
    from ..models.bundle import ModelBundle
    from ..models.layout import ModelLayout
    from .options import TrainOptions
    from .sample_prompts import SamplePrompt

#: FLUX.1 Fill's ``img_in`` input width (64 noisy + 64 masked-image + 256 mask channels, packed 2x2)
FILL_INPUT = 384
#: the pre-flight's line for kohya-style (and ai-toolkit) sample prompts without an image on FLUX.1 Fill
#: (``{count}`` of ``{total}``, the first one ``{first}``)
FILL_SAMPLES = (
    "--sample-prompts: a FLUX.1 Fill sample in kohya's prompt format needs an image to inpaint, --i IMAGE (a "
    "wobbly ellipse mask is drawn from the seed; kohya trains no Fill model, so it has no rendering without one to "
    "follow); {count} of {total} prompt(s) have none (the first: {first!r}): give them --i or leave them out"
)
#: the pre-flight's line for ``--l`` on FLUX.1 Fill samples (as ``sdcore generate`` refuses --true-cfg-scale there)
FILL_TRUE_CFG_SAMPLES = (
    "--sample-prompts: --l is true CFG, which FLUX.1 Fill does not take (it runs on its distilled guidance: --g, "
    "default 30); drop --l"
)
#: the pre-flight's line for ``--ci``/``--ctrl_img`` on FLUX.1 Fill samples (Kontext's reference; Fill takes none)
FILL_REFERENCE_SAMPLES = (
    "--sample-prompts: --ctrl_img/--ci is FLUX.1 Kontext's reference image; FLUX.1 Fill takes none (its sample "
    "renders from the --i image and its mask): drop --ci"
)
#: the pre-flight's line for random masks with cached latents (the kohya importers' refusal says the same)
RANDOM_CACHE = (
    "--inpainting-masks random draws a new mask every step, so the masked image is encoded every step and "
    "latents cannot be cached (kohya refuses --cache_latents with --train_inpainting too): pass --no-cache-latents"
)
#: the VAE's downscale: FLUX.1 Fill's mask channels are the 8x8 pixel blocks of each latent position
VAE_SCALE = 8


def bundle_kind(bundle: ModelBundle | None) -> str | None:
    """``"unet"`` for an SD inpainting UNet (9 input channels), ``"fill"`` for FLUX.1 Fill, else None (also
    without a model: ``sdcore train --debug-dataset`` walks the batches without opening one)."""
    if bundle is None:
        return None
    if getattr(bundle, "inpainting", False) and getattr(bundle, "unet", None) is not None:
        return "unet"
    transformer = getattr(bundle, "transformer", None)
    if transformer is not None and getattr(bundle, "family", None) == "flux":
        return "fill" if int(transformer.config.in_channels) == FILL_INPUT else None
    return None


def layout_kind(layout: ModelLayout) -> str | None:
    """:func:`bundle_kind` from a model's header (the pre-flight, before anything loads)."""
    if layout.inpainting:
        return "unet"
    config = layout.configs.get("transformer") or {}
    if layout.family == "flux" and int(config.get("in_channels", 64)) == FILL_INPUT:
        return "fill"
    return None


def pixel_mask(entry: ImageEntry, assignment: BucketAssignment, *, flip: bool, crop: tuple[int, int] | None) -> Any:
    """The sample's inpainting mask at pixel size (float32 ``[H, W]``, 1 = repaint): its dataset mask, or a full
    mask when it has none (OneTrainer's default mask)."""
    import numpy as np

    from .data import has_dataset_mask, load_mask

    augmented = assignment.augment is not None  # OneTrainer's mask augmentation: its shrunk, rotated, cropped mask
    mask = load_mask(entry, assignment, flip=flip, crop=crop) if augmented or has_dataset_mask(entry) else None
    if mask is None:
        w, h = assignment.bucket
        return np.ones((h, w), dtype=np.float32)
    return np.asarray(mask, dtype=np.float32)


def random_pixel_mask(assignment: BucketAssignment, seed: int) -> Any:
    """``--inpainting-masks random``: kohya's random training mask number ``seed`` (float32 ``[H, W]``, 1 =
    repaint) at the sample's bucket size (kohya draws it after crop and flip, at the pixels' size)."""
    from .random_masks import random_mask

    w, h = assignment.bucket
    return random_mask(int(w), int(h), seed)


def masked_pixels(pixels: Any, mask: Any) -> Any:
    """The masked image: ``pixels`` (CHW in [-1, 1]) with the hole blanked to 0 (grey), softly where the mask
    is grey (``GenerateMaskedConditioningImage`` rewritten for the [-1, 1] range)."""
    import torch

    image = torch.as_tensor(pixels, dtype=torch.float32)
    m = torch.as_tensor(mask, dtype=torch.float32)
    return image * (1.0 - m)


def conditioning_image_path(entry: ImageEntry) -> Path | None:
    """The custom conditioning image beside ``entry`` (``<stem>-condlabel.png``) when its subset reads them
    (``--inpainting-conditioning-images``) and the file is there; None otherwise."""
    suffix = getattr(entry.subset, "conditioning_suffix", None)
    if suffix is None:
        return None
    beside = entry.path.with_name(entry.path.stem + suffix)
    return beside if beside.is_file() else None


def load_conditioning_pixels(
    entry: ImageEntry, assignment: BucketAssignment, *, flip: bool, crop: tuple[int, int] | None = None,
    color: Any = None,
) -> Any:  # fmt: skip
    """``entry``'s custom conditioning image as float32 CHW in [-1, 1] with the image's own resize, crop, flip and
    colour augmentation (a file of another size is stretched to the image's first, as OneTrainer's
    ``ScaleCropImage`` scales both to one size), or None when it has none."""
    import numpy as np

    from ..data.augment import apply_color_aug
    from ..data.images import open_image_rgb
    from ..data.loading import fit_to_bucket

    path = conditioning_image_path(entry)
    if path is None:
        return None
    image = open_image_rgb(path)
    if image.size != entry.size:  # the image's size after its EXIF rotation
        image = image.resize(entry.size)
    interpolation = getattr(entry.subset, "resize_interpolation", None)
    image, _ = fit_to_bucket(image, assignment, flip=flip, crop=crop, interpolation=interpolation)
    array = np.asarray(image, dtype=np.uint8)
    values = apply_color_aug(array, color).astype(np.float32) if color is not None else array.astype(np.float32)
    return np.ascontiguousarray(values.transpose(2, 0, 1) / 127.5 - 1.0, dtype=np.float32)


def conditioning_pixels(entry: ImageEntry, assignment: BucketAssignment, pixels: Any, mask: Any, *, flip: bool,
                        crop: tuple[int, int] | None = None, color: Any = None) -> Any:  # fmt: skip
    """The masked image (a CHW tensor in [-1, 1]) an inpainting sample is conditioned on: its custom conditioning
    image when it has one, else :func:`masked_pixels` of its (augmented) ``pixels`` and ``mask``."""
    import torch

    custom = load_conditioning_pixels(entry, assignment, flip=flip, crop=crop, color=color)
    return masked_pixels(pixels, mask) if custom is None else torch.from_numpy(custom)


def conditioning_identity(entry: ImageEntry) -> tuple[str, int, int] | None:
    """``entry``'s custom conditioning image as a latent cache key part (None without one)."""
    from ..data.images import file_identity

    return file_identity(conditioning_image_path(entry))


def latent_mask(mask: Any, latent_size: tuple[int, int], kind: str) -> Any:
    """The pixel mask ``[H, W]`` as the denoiser's mask input: ``[1, h, w]`` for an SD UNet (bilinear with
    antialias, OneTrainer's ``ScaleImage``), ``[64, h, w]`` for FLUX.1 Fill (8x8 blocks as channels)."""
    import torch

    from .data import mask_to_latent

    if kind == "unet":
        return mask_to_latent(mask, latent_size, "bilinear")
    m = torch.as_tensor(mask, dtype=torch.float32)
    h, w = latent_size
    blocks = m.reshape(h, VAE_SCALE, w, VAE_SCALE).permute(1, 3, 0, 2)  # 8, 8, h, w
    return blocks.reshape(VAE_SCALE * VAE_SCALE, h, w).contiguous()


def encode_mean(bundle: ModelBundle, pixels: Any) -> torch.Tensor:
    """Unscaled VAE posterior means ``[B, C, h, w]`` (float32, CPU) of pixel batch ``[B, 3, H, W]``."""
    import torch

    vae = bundle.vae
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(torch.as_tensor(pixels).to(device=param.device, dtype=param.dtype)).latent_dist
        return dist.mean.float().cpu().contiguous()


def unmasked_draw(seed: int, probability: float) -> bool:
    """Whether a sample trains with the full mask and a blank masked image (``unmasked_probability``), drawn from
    the sample's own generator (so a resumed or cached run draws the same)."""
    from .data import seeded_draw

    return seeded_draw(seed, probability)


def mask_identity(entry: ImageEntry) -> tuple[str, int, int] | None:
    """The sample's mask file as part of an inpainting latent cache key (an edited mask re-encodes the masked
    image); None without a mask file."""
    from ..data.images import file_identity
    from .data import mask_image_path

    return file_identity(mask_image_path(entry))


def _sample_prompts(options: TrainOptions) -> list[SamplePrompt]:
    """The sample prompts (none when a prompt file cannot be read: that is reported elsewhere)."""
    if not options.sample_prompts:
        return []
    from ..errors import SdcoreError
    from .sample_prompts import read_sample_prompts

    try:
        return read_sample_prompts(options.sample_prompts)
    except SdcoreError:
        return []


def renders_on_blank(prompt: SamplePrompt, kind: str | None) -> bool:
    """Whether ``prompt`` renders on a ``kind`` model (:func:`bundle_kind`) on a blank image under a full mask
    (:func:`sdcore.generate.inpaint.blank_conditioning`): a OneTrainer sample without ``sample_inpainting`` on
    FLUX.1 Fill, as OneTrainer's FluxSampler ``__sample_inpainting`` renders it (OneTrainer 23df383
    modules/modelSampler/FluxSampler.py:271-287: a zero image's latent mode and a mask of ones)."""
    from .sample_prompts import ONETRAINER

    return kind == "fill" and prompt.inpaint_image is None and prompt.source == ONETRAINER


def fill_sample_problem(prompts: list[SamplePrompt]) -> str | None:
    """The one line for FLUX.1 Fill sample prompts without an image (:data:`FILL_SAMPLES`), or None: those of
    kohya's prompt format (and ai-toolkit's), which sdcore renders only with ``--i``. kohya trains no Fill model
    (sd-scripts 48d368f library/flux_utils.py:142 loads a checkpoint into its FLUX.1 model, whose ``img_in`` takes
    64 channels: Fill's 384-wide one is a size mismatch there), so there is no kohya rendering of such a line to
    follow, and refusing it before the run beats a guess. OneTrainer's samples without ``sample_inpainting``
    render as OneTrainer renders them (:func:`renders_on_blank`); a prompt with kohya's ``--i`` or OneTrainer's
    ``sample_inpainting`` renders on its image conditioning (:class:`sdcore.generate.inpaint.ImageConditioning`)."""
    bare = [p for p in prompts if p.inpaint_image is None and not renders_on_blank(p, "fill")]
    if not bare:
        return None
    first = bare[0].prompt if len(bare[0].prompt) <= 40 else bare[0].prompt[:37] + "..."
    return FILL_SAMPLES.format(count=len(bare), total=len(prompts), first=first)


def _conditioning_image_problems(index: DatasetIndex) -> list[str]:
    """``--inpainting-conditioning-images`` without any ``-condlabel.png`` (a misnamed set), and the damaged
    ones (mgds' ``LoadImage`` raises on them), listed before loading rather than at the step that first reads one."""
    from ..data.images import ImageError, probe_image
    from .data import _listed

    found = [path for path in dict.fromkeys(conditioning_image_path(e) for e in index.entries) if path is not None]
    if not found:
        return [
            f"--inpainting-conditioning-images: no image of the dataset has a <name>{CONDITIONING_SUFFIX} beside it "
            "(OneTrainer's name for a custom conditioning image)"
        ]
    unreadable: list[str] = []
    for path in found:
        try:
            probe_image(path)
        except ImageError as exc:
            unreadable.append(str(exc))
    if not unreadable:
        return []
    return [
        f"--inpainting-conditioning-images: {len(unreadable)} -condlabel image(s) unreadable: {_listed(unreadable)}"
    ]


def inpainting_problems(options: TrainOptions, layout: ModelLayout | None, index: DatasetIndex | None) -> list[str]:
    """Pre-flight problems: ``--inpainting-unmasked-probability`` out of range or on a model without the mask
    input; ``--inpainting-masks random`` with cached latents or on a model without the mask input; control images
    (FLUX.1 Kontext) on an inpainting model; FLUX.1 Fill sample prompts without an image and a mask
    (:func:`fill_sample_problem`: kohya's ``--i`` and OneTrainer's ``sample_inpainting`` render), ``--l`` or a
    Kontext reference (``--ci``) on them. An SD
    inpainting UNet's samples render as A1111's txt2img on an inpainting model does (a blank image's
    conditioning under a full mask: :mod:`sdcore.generate.pipeline`), as OneTrainer's samples without
    ``sample_inpainting`` do; a kohya inpainting sample prompt (``--i``/``--img``) needs one of those UNets."""
    problems: list[str] = []
    p = options.inpainting_unmasked_probability
    if not 0.0 <= p <= 1.0:
        problems.append(f"--inpainting-unmasked-probability {p}: must be in [0, 1]")
    random_masks = options.inpainting_masks == "random"
    if random_masks and options.cache_latents:
        problems.append(RANDOM_CACHE)
    custom = options.inpainting_conditioning_images
    if custom and random_masks:
        problems.append(
            "--inpainting-conditioning-images: a -condlabel.png is the masked image of one mask (OneTrainer's dataset "
            "masks), not of kohya's random masks (--inpainting-masks random); use one of them"
        )
    if custom and index is not None:
        problems.extend(_conditioning_image_problems(index))
    if layout is None:
        return problems
    kind = layout_kind(layout)
    prompts = _sample_prompts(options)
    # kohya's --i only: OneTrainer renders its own inpainting samples from text on a model without the mask input
    if kind is None and any(p.inpaint_image is not None and p.inpaint_mask is None for p in prompts):
        problems.append(
            f"--sample-prompts: --i/--img (kohya's inpainting samples) inpaints through an SD inpainting model's "
            f"mask input; {layout.source} is a {layout.family} model without it (remove --i)"
        )
    if kind is None:
        if p > 0:
            problems.append(
                f"--inpainting-unmasked-probability {p} acts on inpainting models (an SD inpainting UNet or FLUX.1 "
                f"Fill); {layout.source} is a {layout.family} model without the mask input (leave it at 0)"
            )
        if custom:
            problems.append(
                f"--inpainting-conditioning-images gives an inpainting model its masked images; {layout.source} is a "
                f"{layout.family} model without the mask input"
            )
        if random_masks:
            problems.append(
                f"--inpainting-masks random (kohya's --train_inpainting) trains an inpainting model's mask input; "
                f"{layout.source} is a {layout.family} model without it: start from an inpainting checkpoint "
                "(kohya's LoRA needs one too; sdcore does not widen a plain UNet's conv_in to 9 channels)"
            )
        return problems
    if index is not None:
        from .data import is_segmentation
        from .kontext_data import has_control

        if any(is_segmentation(e) for e in index.entries):
            problems.append(
                "mask_kind segmentation: SimpleTuner's segmentation masks weigh the loss only, drawn per batch with "
                "--masked-loss-probability; an inpainting model takes its dataset masks as the mask input (white: "
                "repaint), which a segmentation mask does not say (give those images red masks: leave out mask_kind)"
            )

        if any(has_control(e) for e in index.entries):
            problems.append(
                "control images (--control-dir / control_directory) train FLUX.1 Kontext; this is an inpainting "
                "model, whose conditioning is the mask and the masked image (leave out the control images)"
            )
    if kind == "fill" and (line := fill_sample_problem(prompts)) is not None:
        problems.append(line)
    if kind == "fill" and any(p.cfg is not None and p.cfg > 1.0 for p in prompts):
        problems.append(FILL_TRUE_CFG_SAMPLES)
    if kind == "fill" and any(p.reference is not None for p in prompts):
        problems.append(FILL_REFERENCE_SAMPLES)
    return problems


__all__ = [
    "FILL_INPUT",
    "FILL_SAMPLES",
    "RANDOM_CACHE",
    "bundle_kind",
    "conditioning_identity",
    "conditioning_image_path",
    "conditioning_pixels",
    "encode_mean",
    "fill_sample_problem",
    "inpainting_problems",
    "latent_mask",
    "layout_kind",
    "load_conditioning_pixels",
    "mask_identity",
    "masked_pixels",
    "pixel_mask",
    "random_pixel_mask",
    "renders_on_blank",
    "unmasked_draw",
]
