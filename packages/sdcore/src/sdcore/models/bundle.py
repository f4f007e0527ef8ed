"""``ModelBundle``: one loaded Stable Diffusion model, whatever file it came from.

Every reader returns one and every method plugin works on one, so plugins never care whether
the user gave a diffusers folder, a single ``.safetensors`` or a ``.ckpt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .family import BUILTIN_FAMILIES

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch

    from .family import ModelFamily

Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]  # sdcore's own; plugins may declare more
PredictionType = Literal["epsilon", "v_prediction"]
#: the names of sdcore's own families (every known family: ``sdcore.models.family.families()``)
FAMILIES: tuple[str, ...] = tuple(family.name for family in BUILTIN_FAMILIES)


@dataclass
class ModelBundle:
    """The components of a Stable Diffusion model plus what we know about it.

    ``family`` is the family's name; :attr:`family_spec` is its declaration
    (:mod:`sdcore.models.family`). ``text_encoders``/``tokenizers`` hold one entry per declared
    :class:`~sdcore.models.family.TextEncoderSpec`, in order: one for SD1/SD2, two for SDXL (CLIP-L,
    then OpenCLIP bigG with projection); the refiner has only the second. The denoiser is ``unet``
    for the UNet families and ``transformer`` otherwise (:attr:`denoiser` is either).
    ``noise_scheduler`` is the training scheduler (DDPM with the model's prediction type for the
    UNet families).
    """

    family: str
    prediction_type: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    source: str | None = None
    source_format: str | None = None  # "diffusers", "single-file", "hub", "tiny"
    metadata: dict[str, str] = field(default_factory=dict)
    inpainting: bool = False
    transformer: Any = None  # the denoiser of transformer families (SD3, Flux); ``unet`` is None there

    @property
    def family_spec(self) -> ModelFamily:
        """The declared :class:`~sdcore.models.family.ModelFamily` of ``family`` (a name)."""
        from .family import get_family

        return get_family(self.family)

    @property
    def denoiser(self) -> Any:
        """The UNet or transformer: what predicts the noise / velocity, whatever the family.

        Code that works for every family reads this (and ``family_spec.denoiser`` for its
        diffusers component name) instead of ``unet``.
        """
        return self.transformer if self.transformer is not None else self.unet

    @property
    def is_sdxl(self) -> bool:
        return self.family.startswith("sdxl")

    @property
    def is_v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift_factor(self) -> float:
        """The VAE's latent shift (SD3/Flux); its config wins over the family's declared value."""
        value = self.vae.config.get("shift_factor") if hasattr(self.vae.config, "get") else None
        return float(value) if value is not None else self.family_spec.latent.shift_factor

    def normalize_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the denoiser's space: ``(raw - shift) * scale`` (the family's latent format
        with this VAE's constants)."""
        shift = self.latent_shift_factor
        return (raw - shift) * self.vae_scaling_factor if shift else raw * self.vae_scaling_factor

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents -> what the VAE decoder takes."""
        return latents / self.vae_scaling_factor + self.latent_shift_factor

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def family_label(self) -> str:
        """The family as users read it: ``sd2-v`` for v-prediction SD2, ``+inpainting`` when so."""
        label = self.family
        if self.family == "flux" and self.transformer is not None:  # dev, schnell, fill, control, kontext
            from .flux.variants import bundle_variant

            return f"flux-{bundle_variant(self)}"
        if self.family == "sd2" and self.is_v_prediction:
            label = "sd2-v"
        if self.inpainting:
            label += "-inpainting"
        return label

    def components(self) -> dict[str, Any]:
        """Named torch modules, in diffusers' component names."""
        spec = self.family_spec
        parts: dict[str, Any] = {spec.denoiser: self.denoiser}
        if self.vae is not None:  # a transformer-only Flux file loads without one (model info)
            parts["vae"] = self.vae
        for encoder, module in zip(spec.text_encoders, self.text_encoders, strict=False):
            parts[encoder.component] = module
        return parts

    def to(self, device: Any = None, dtype: Any = None) -> ModelBundle:
        for module in self.components().values():
            module.to(device=device, dtype=dtype)
        return self

    def save(
        self,
        path: str | Path,
        *,
        format: str | None = None,
        dtype: str | None = None,
        prune: bool = True,
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write the model as a single ldm/SGM ``.safetensors`` file or a diffusers folder.

        ``format`` defaults from the path: a name ending in ``.safetensors`` is a single file,
        anything else a diffusers folder.
        """
        from .save import save_bundle

        return save_bundle(self, path, format=format, dtype=dtype, prune=prune, metadata=metadata)
