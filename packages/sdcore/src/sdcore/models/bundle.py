"""``ModelBundle``: one loaded Stable Diffusion model, whatever file it came from.

Every reader returns one and every method plugin works on one, so plugins never care whether
the user gave a diffusers folder, a single ``.safetensors`` or a ``.ckpt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch

Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]
PredictionType = Literal["epsilon", "v_prediction"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sdxl-refiner")


@dataclass
class ModelBundle:
    """The components of a Stable Diffusion model plus what we know about it.

    ``text_encoders``/``tokenizers`` hold one entry for SD1/SD2 and two for SDXL (CLIP-L, then
    OpenCLIP bigG with projection); the refiner has only the second. ``noise_scheduler`` is the
    DDPM training scheduler with the model's prediction type.
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
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def family_label(self) -> str:
        """The family as users read it: ``sd2-v`` for v-prediction SD2, ``+inpainting`` when so."""
        label = self.family
        if self.family == "sd2" and self.is_v_prediction:
            label = "sd2-v"
        if self.inpainting:
            label += "-inpainting"
        return label

    def components(self) -> dict[str, Any]:
        """Named torch modules, in diffusers' component names."""
        parts: dict[str, Any] = {"unet": self.unet, "vae": self.vae}
        names = ["text_encoder", "text_encoder_2"]
        if self.family == "sdxl-refiner":
            names = ["text_encoder_2"]
        for name, module in zip(names, self.text_encoders, strict=False):
            parts[name] = module
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
