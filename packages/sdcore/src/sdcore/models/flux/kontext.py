"""FLUX.1 Kontext: a reference image enters the transformer as extra tokens beside the latents.

Kontext [dev] has exactly dev's weights and shapes; what makes it an image editor is how it is called
(diffusers' ``FluxKontextPipeline``, ComfyUI's ``ReferenceLatent``, ai-toolkit's ``flux_kontext``):

- the reference image is VAE-encoded *clean* (the distribution's mode, then shift and scale as every
  Flux latent) and packed 2x2 like the latents;
- its tokens follow the noisy latents' tokens in the sequence; their position ids are the packed grid's
  (row, column) with the first id component set to 1 (the latents' is 0), which is how the model tells
  "the image being made" from "the image being edited";
- the transformer's output for the reference tokens is dropped: the velocity is the first
  ``len(latents)`` tokens' only, so training losses and samplers see the usual ``[B, 16, H, W]``.

The reference may have another size than the output (diffusers keeps the image's own, resized to one of the
resolutions Kontext was trained at); a plain dev or schnell model can be called this way too (ComfyUI does not
check), which only Kontext was trained to use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: the first position-id component of a reference image's tokens (the latents' is 0)
REFERENCE_INDEX = 1

#: The (width, height) resolutions FLUX.1 Kontext was trained at, about one megapixel each: a reference image
#: is resized to the one whose aspect ratio is nearest its own. The table is diffusers'
#: ``PREFERRED_KONTEXT_RESOLUTIONS`` (``pipelines/flux/pipeline_flux_kontext.py``); ComfyUI's
#: ``FluxKontextImageScale`` node (``comfy_extras/nodes_flux.py``) picks from the same list by the unfloored
#: ratio (:func:`reference_size`) and crops the centre to the new aspect ratio where diffusers, and so sdcore,
#: stretches the whole image.
PREFERRED_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
#: reference image sides are floored to this many pixels (the VAE's 8x, then 2x2 packing)
SIDE_UNIT = 16
#: how a reference image is sized (``sdcore generate --reference-image``, training samples' ``--ctrl_img``):
#: ``kontext`` to the preferred resolution nearest its aspect ratio (diffusers' default, ComfyUI's
#: FluxKontextImageScale), ``none`` its own size (diffusers' ``_auto_resize=False``, musubi-tuner's
#: ``--no_resize_control``), ``output`` stretched to the image being made with bilinear filtering (ai-toolkit's
#: sample renders during Kontext training)
REFERENCE_RESIZE_MODES = ("kontext", "none", "output")
#: infotext fields of a Kontext edit: the reference's file name (A1111 records no init image and Forge's Kontext
#: extension nothing; the name at least says the image is an edit, and of what), and the resize when it was not
#: Kontext's own (``--no-reference-resize``: "none"), which ``--from-png`` restores
REFERENCE_FIELD = "Reference image"
REFERENCE_RESIZE_FIELD = "Reference resize"


def reference_size(width: int, height: int, *, resize: bool = True) -> tuple[int, int]:
    """The (width, height) a ``width`` x ``height`` reference image is encoded at, as ``FluxKontextPipeline``
    sizes it: its sides floored to :data:`SIDE_UNIT` first (the pipeline's ``get_default_height_width``), then
    with ``resize`` the :data:`PREFERRED_RESOLUTIONS` entry whose aspect ratio is nearest *those* sides' (ties
    to the narrower one; BFL's and ComfyUI's ratio is the unfloored image's, which picks the next entry for
    some sizes near a boundary, e.g. 500x542), else the floored size. A side under :data:`SIDE_UNIT` floors to
    nothing (the pipeline divides by zero): one :class:`~sdcore.errors.ConfigError` line."""
    from ...errors import ConfigError

    floored = (width - width % SIDE_UNIT, height - height % SIDE_UNIT)
    if floored[0] < SIDE_UNIT or floored[1] < SIDE_UNIT:
        raise ConfigError(f"the reference image is {width}x{height}: Flux needs at least {SIDE_UNIT} pixels a side")
    if not resize:
        return floored
    aspect = floored[0] / floored[1]
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_RESOLUTIONS)
    return width // SIDE_UNIT * SIDE_UNIT, height // SIDE_UNIT * SIDE_UNIT


def open_reference(path: Any, what: str = "reference image") -> Any:
    """The reference image at ``path`` (or a PIL image) as RGB, read as diffusers' ``load_image`` reads it (the
    reader of its Kontext examples; ComfyUI's LoadImage does the same): turned upright by its EXIF orientation,
    then ``convert("RGB")`` (alpha dropped, not composited); a missing or unreadable file is one line naming it
    ``what`` (:func:`sdcore.data.images.open_upright`; FLUX.1 Depth/Canny's control image is read the same way)."""
    from ...data.images import open_upright

    return open_upright(path, what).convert("RGB")


def sized_reference(image: Any, mode: str = "kontext", output: tuple[int, int] | None = None) -> Any:
    """``image`` (PIL, RGB) at the size the transformer sees it, resized as the tool ``mode`` names does it
    (:data:`REFERENCE_RESIZE_MODES`): ``kontext``/``none`` with Lanczos to :func:`reference_size` (diffusers'
    ``VaeImageProcessor.resize``), ``output`` with bilinear to ``output`` (width, height) when its size
    differs (ai-toolkit's sample renders)."""
    from PIL import Image

    from ...errors import ConfigError

    if mode == "output":
        if output is None:
            raise ConfigError("a reference image sized to the output needs the output size")
        size = output
        resample = Image.Resampling.BILINEAR
    elif mode in ("kontext", "none"):
        size = reference_size(*image.size, resize=mode == "kontext")
        resample = Image.Resampling.LANCZOS
    else:
        raise ConfigError(f"unknown reference resize {mode!r}; choose one of: {', '.join(REFERENCE_RESIZE_MODES)}")
    if size[0] < SIDE_UNIT or size[1] < SIDE_UNIT:
        raise ConfigError(
            f"the reference image is {image.width}x{image.height}: Flux needs at least {SIDE_UNIT} pixels a side"
        )
    return image if image.size == size else image.resize(size, resample=resample)


def reference_ids(height: int, width: int, *, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] of a reference image's packed patches: (1, row, column)."""
    from .adapter import image_ids

    ids = image_ids(height, width, device=device, dtype=dtype)
    ids[:, 0] = REFERENCE_INDEX
    return ids


def join_reference(
    packed: torch.Tensor, ids: torch.Tensor, reference_latents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's ``hidden_states`` and ``img_ids`` with the reference's tokens after the latents'.

    ``packed`` [B, N, 64] and ``ids`` [N, 3] are the noisy latents'; ``reference_latents`` [B, 16, h, w]
    (or [1, 16, h, w], shared by the batch) are clean latents of the reference images, one per sample."""
    import torch

    from ...errors import ConfigError
    from .adapter import pack_latents

    batch = packed.shape[0]
    if reference_latents.ndim != 4 or reference_latents.shape[0] not in (1, batch):
        raise ConfigError(
            f"Kontext reference latents must be [B, C, H, W] with B = 1 or {batch}, got {tuple(reference_latents.shape)}"
        )
    reference = pack_latents(reference_latents).to(device=packed.device, dtype=packed.dtype)
    if reference.shape[-1] != packed.shape[-1]:
        raise ConfigError(
            f"Kontext reference latents have {reference_latents.shape[1]} channels; the latents have "
            f"{packed.shape[-1] // 4}"
        )
    reference = reference.expand(batch, -1, -1)
    height, width = reference_latents.shape[-2:]
    joined_ids = torch.cat([ids, reference_ids(height, width, device=ids.device, dtype=ids.dtype)], dim=0)
    return torch.cat([packed, reference], dim=1), joined_ids


__all__ = [
    "PREFERRED_RESOLUTIONS",
    "REFERENCE_FIELD",
    "REFERENCE_INDEX",
    "REFERENCE_RESIZE_FIELD",
    "REFERENCE_RESIZE_MODES",
    "SIDE_UNIT",
    "join_reference",
    "open_reference",
    "reference_ids",
    "reference_size",
    "sized_reference",
]
