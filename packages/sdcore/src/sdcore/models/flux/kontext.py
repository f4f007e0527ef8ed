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


__all__ = ["REFERENCE_INDEX", "join_reference", "reference_ids"]
