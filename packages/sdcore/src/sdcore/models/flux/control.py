"""FLUX.1 Depth and Canny [dev]: a control image's latents enter the transformer on the channels.

Depth and Canny [dev] are dev with ``img_in`` 128 wide (:mod:`sdcore.models.flux.variants`: ``control``); what
they take, as diffusers' ``FluxControlPipeline`` (and ``FluxControlImg2ImgPipeline``) gives it, which is what
``sdcore generate --control-image`` runs over the bundle's modules:

- the control image is the *preprocessed* one: a depth map for Depth, canny edges for Canny, made beforehand
  (BFL's ``cli_control`` runs Depth Anything or OpenCV's Canny itself, ComfyUI and Forge users run a
  preprocessor node or extension; sdcore ships no depth estimator or edge detector);
- it is stretched to the output size (the pipeline's ``VaeImageProcessor.preprocess``: Lanczos, then [-1, 1]),
  VAE-encoded as a *sample* of the posterior drawn from each image's seeded generator (before the start noise),
  shifted and scaled as every Flux latent, packed 2x2 and joined to the noisy latents on the channels at every
  step (64 + 64 = 128 inputs); the transformer's output is dev's 64-wide velocity;
- guidance is the distilled guidance dev embeds, much higher than dev's 3.5: BFL's ``cli_control`` uses 10 for
  Depth and 30 for Canny (diffusers' examples the same), which :func:`default_guidance` picks from the model's
  name (Depth and Canny have the same shapes); there is no true CFG (the pipeline has none).

BFL's control LoRAs (``flux1-depth-dev-lora``, ``flux1-canny-dev-lora``) make FLUX.1 dev a Depth/Canny model for as
long as they are applied: :func:`widen_img_in` widens dev's ``img_in`` exactly as diffusers' ``load_lora_weights``
does, and a network handler that applies such a file calls it and undoes it with the rest of the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..bundle import ModelBundle

#: the distilled guidance BFL's ``cli_control`` defaults to (``flux-dev-depth``: 10, ``flux-dev-canny``: 30)
DEPTH_GUIDANCE = 10.0
CANNY_GUIDANCE = 30.0
#: the infotext field of a controlled image: the control image's file name (A1111's ControlNet extension writes
#: its own "ControlNet 0" field of a ControlNet unit; FLUX.1 Depth/Canny are no ControlNet), which ``--from-png``
#: reads back as a warning when no ``--control-image`` is given
CONTROL_FIELD = "Control image"
#: why FLUX.1 Depth/Canny take no true CFG (diffusers' FluxControlPipeline has none)
CONTROL_TRUE_CFG = "FLUX.1 Depth/Canny run on their distilled guidance (--cfg, default 10 or 30); drop --true-cfg-scale"


def default_guidance(source: Any) -> float:
    """BFL's default guidance for a Depth/Canny model: 30 when its file or folder name says ``canny``, else 10
    (Depth's); the shapes cannot tell the two apart."""
    return CANNY_GUIDANCE if "canny" in Path(str(source or "")).name.lower() else DEPTH_GUIDANCE


def open_control(path: Any) -> Any:
    """The control image at ``path`` (or a PIL image) as RGB, read as a reference image is
    (:func:`~sdcore.models.flux.kontext.open_reference`: EXIF orientation, ``convert("RGB")``); a missing or
    unreadable file is one :class:`~sdcore.errors.ConfigError` line."""
    from .kontext import open_reference

    return open_reference(path, "control image")


def control_size(image: Any) -> tuple[int, int]:
    """The output size when none is given: the control image's sides floored to 16 (ComfyUI's Depth/Canny
    workflows make the latent at the control image's size); a side under 16 pixels is one line."""
    from ...errors import ConfigError
    from .kontext import SIDE_UNIT

    width, height = image.width - image.width % SIDE_UNIT, image.height - image.height % SIDE_UNIT
    if width < SIDE_UNIT or height < SIDE_UNIT:
        raise ConfigError(
            f"the control image is {image.width}x{image.height}: Flux needs at least {SIDE_UNIT} pixels a side"
        )
    return width, height


def join_control(packed: Any, control_latents: Any) -> Any:
    """The noisy latents' tokens ``packed`` [B, N, 64] with the control images' latents [B or 1, 16, h, w] packed
    alike and joined on the channels: [B, N, 128], what a 128-wide ``img_in`` takes.

    ``FluxControlPipeline`` joins the packed tensors (``torch.cat([latents, control_image], dim=2)``); diffusers'
    ``train_control_lora_flux.py`` joins the 16-channel latents before packing them; both give this tensor, since
    packing keeps each channel's 2x2 values together. The control latents are clean (no noise), scaled and
    shifted as the noisy ones."""
    import torch

    from ...errors import ConfigError
    from .adapter import pack_latents

    batch = packed.shape[0]
    if control_latents.ndim != 4 or control_latents.shape[0] not in (1, batch):
        raise ConfigError(
            f"control latents must be [B, C, H, W] with B = 1 or {batch}, got {tuple(control_latents.shape)}"
        )
    control = pack_latents(control_latents).to(device=packed.device, dtype=packed.dtype)
    if control.shape[1:] != packed.shape[1:]:
        raise ConfigError(
            f"the control latents ({tuple(control_latents.shape[1:])}) do not match the noisy latents' size and "
            "channels; a control image is resized to its training image's bucket"
        )
    return torch.cat([packed, control.expand(batch, -1, -1)], dim=2)


#: the transformer attribute naming what widened its ``img_in`` while it is widened (:func:`widen_img_in`), so a
#: refusal can say the 128-wide model is dev with that file rather than a Depth/Canny download
WIDENED_BY = "_sdcore_widened_by"
#: the ``by`` of :func:`widen_img_in` when a training run widens ``img_in`` to train a control LoRA
#: (``sdcore train lora --control-lora``): every step then gives the control latents, so the model counts as a
#: Depth/Canny one with its control image (:func:`sdcore.models.flux.variants.require_supported`)
TRAINING_WIDENER = "--control-lora"


def widened_by(bundle: ModelBundle) -> str | None:
    """What widened the bundle's ``img_in`` (a file's label), ``None`` when nothing did."""
    return getattr(bundle.transformer, WIDENED_BY, None) if bundle.transformer is not None else None


def widen_img_in(bundle: ModelBundle, width: int, by: str) -> Callable[[], None]:
    """Make the bundle's Flux transformer take ``width`` inputs for a while; returns the undo.

    As diffusers' ``FluxLoraLoaderMixin._maybe_expand_transformer_param_shape_or_error_`` does for a control LoRA:
    a new ``x_embedder`` Linear ``width`` wide whose first columns are the old weight and the new ones zeros, the
    same bias, and ``config.in_channels`` set to ``width`` (what ``FluxControlPipeline`` reads to size the latents).
    The old module is kept aside untouched (the new one holds copies), so the undo puts the very same module and
    ``in_channels`` back and the bundle is bit for bit what it was. ``by`` names the file for refusals
    (:func:`widened_by`). A ``width`` at or below the current one is refused: nothing narrows ``img_in``."""
    import torch

    from ...errors import NetworkMismatchError

    transformer = bundle.transformer
    old = transformer.x_embedder
    current = int(old.weight.shape[1])
    if width <= current:
        raise NetworkMismatchError(f"{by}: img_in takes {current} inputs already; it cannot be widened to {width}")
    new = torch.nn.Linear(width, int(old.weight.shape[0]), bias=old.bias is not None,
                          device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :current].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    config = transformer.config
    before = config.in_channels
    transformer.x_embedder = new
    config.in_channels = width  # diffusers sets the attribute the same way
    setattr(transformer, WIDENED_BY, by)

    def undo() -> None:
        transformer.x_embedder = old
        config.in_channels = before
        if WIDENED_BY in transformer.__dict__:
            delattr(transformer, WIDENED_BY)

    return undo


__all__ = [
    "CANNY_GUIDANCE",
    "CONTROL_FIELD",
    "CONTROL_TRUE_CFG",
    "DEPTH_GUIDANCE",
    "TRAINING_WIDENER",
    "WIDENED_BY",
    "control_size",
    "default_guidance",
    "join_control",
    "open_control",
    "widen_img_in",
    "widened_by",
]
