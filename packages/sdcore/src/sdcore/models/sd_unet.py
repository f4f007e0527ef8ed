"""The family adapter of the UNet families (SD1, SD2, SDXL, the SDXL refiner).

They share one ldm/SGM single-file reader, one tiny-model factory and one A1111/kohya-style prompt
encoder; what differs per family (which text-encoder keys a file has, SDXL's pooled embedding
and size conditioning) is read from the family name here, in one place.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..train.method import Batch, Conditioning
    from .bundle import ModelBundle

#: the SDXL refiner's default aesthetic-score conditioning (diffusers' pipeline default)
REFINER_AESTHETIC_SCORE = 6.0


class SdUnetAdapter:
    """:class:`~sdcore.models.family.FamilyAdapter` for one of the UNet families."""

    #: no guidance input; ``--guidance-scale`` (a flow-matching option) is ignored without a note, as before
    guidance_input = None

    def __init__(self, family: str) -> None:
        self.family = family

    def __repr__(self) -> str:
        return f"SdUnetAdapter({self.family!r})"

    # --- model I/O ---------------------------------------------------------------------------
    def part_slots(self, path: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """A UNet model takes one separate part, a VAE that replaces its own (kohya's ``--vae``); it lacks none."""
        return ("vae",), ()

    def detect_single_file(self, keys: Collection[str]) -> bool:
        from .detect import is_unet_family_file

        return is_unet_family_file(keys, self.family)

    def load_single_file(self, path: Any, **options: Any) -> ModelBundle:
        from .load import read_single_file

        options.pop("family", None)
        return read_single_file(path, family=self.family, **options)

    def create_tiny(self, **options: Any) -> ModelBundle:
        from .tiny import create_tiny_bundle

        if self.family == "sdxl-refiner":
            raise ConfigError("there is no tiny sdxl-refiner model; use sd1, sd2 or sdxl")
        return create_tiny_bundle(self.family, **options)

    # --- conditioning and prediction -----------------------------------------------------------
    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], **options: Any) -> Conditioning:
        """kohya/A1111 chunked CLIP encoding (see :mod:`sdcore.models.text`); options: ``clip_skip``,
        ``max_chunks``, ``chunks``."""
        from .text import encode_prompts

        return encode_prompts(bundle, prompts, **options)

    def predict(
        self,
        bundle: ModelBundle,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        *,
        batch: Batch | None = None,
        inpainting: tuple[torch.Tensor, torch.Tensor] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """The UNet's output; SDXL gets its pooled embedding and size conditioning (from ``batch``,
        or the latent size with no crop when there is no batch). ``inpainting``: an inpainting UNet's
        ``(mask [B, 1, h, w], masked-image latents [B, 4, h, w])``, joined on the channels after the noisy
        latents as ``[noisy, mask, masked latents]`` (diffusers' inpaint pipelines, OneTrainer's training)."""
        import torch

        in_channels = int(bundle.unet.config.in_channels)
        if inpainting is not None:
            mask, masked = inpainting
            noisy_latents = torch.cat([noisy_latents, mask.to(noisy_latents), masked.to(noisy_latents)], dim=1)
        if noisy_latents.shape[1] != in_channels:
            raise ConfigError(
                f"{bundle.source or 'this model'}: the UNet takes {in_channels} input channels, given "
                f"{noisy_latents.shape[1]}"
                + (" (an inpainting UNet needs its mask and masked image)" if bundle.inpainting else "")
            )
        kwargs: dict[str, Any] = {}
        if self.family.startswith("sdxl"):
            pooled = conditioning.pooled
            if pooled is None:
                raise ConfigError("SDXL conditioning without pooled text embeddings")
            time_ids = self.time_ids(noisy_latents, batch)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(noisy_latents.device), "time_ids": time_ids}
        hidden = conditioning.hidden_states.to(noisy_latents.device)
        return bundle.unet(noisy_latents, timesteps, hidden, return_dict=False, **kwargs)[0]  # type: ignore[no-any-return]

    def time_ids(self, noisy_latents: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        """SDXL micro-conditioning for a batch: 6 values per sample (5 for the refiner, whose last
        one is the aesthetic score instead of the target size)."""
        from .text import sdxl_time_ids

        count = noisy_latents.shape[0]
        if batch is not None:
            original, crops, target = batch.original_sizes, batch.crop_coords, batch.target_sizes
        else:
            side = (noisy_latents.shape[-2] * 8, noisy_latents.shape[-1] * 8)
            original, crops, target = [side] * count, [(0, 0)] * count, [side] * count
        ids = sdxl_time_ids(original, crops, target, device=noisy_latents.device)
        if self.family == "sdxl-refiner":
            ids = ids[:, :5].clone()
            ids[:, 4] = REFINER_AESTHETIC_SCORE
        return ids


SD1_ADAPTER = SdUnetAdapter("sd1")
SD2_ADAPTER = SdUnetAdapter("sd2")
SDXL_ADAPTER = SdUnetAdapter("sdxl")
SDXL_REFINER_ADAPTER = SdUnetAdapter("sdxl-refiner")
