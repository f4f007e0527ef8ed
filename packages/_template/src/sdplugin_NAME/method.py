"""The heavy part: imported only when the method runs."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sdcore.io import atomic_save
from sdcore.models.bundle import ModelBundle
from sdcore.models.family import get_family
from sdcore.options import option
from sdcore.train.method import SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions


@dataclass
class Options(TrainOptions):
    bias_scale: float = option(1.0, "Multiply the learned bias by this when saving.", group="NAME")


class Method(TrainingMethod[Options]):
    """Trains the UNet's output layer (``conv_out``): replace it with your method, keeping the contract tests."""

    name = "NAME"
    options_class = Options

    def family_problems(self, family: str) -> list[str]:
        # the pre-flight asks before any weight loads: a family this method cannot train is one line, not a traceback
        if get_family(family).denoiser != "unet":  # SD3, Flux: a transformer, which has no conv_out
            return [f"NAME trains a UNet's output layer; a {family} model has none"]
        return []

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        for module in bundle.components().values():
            module.requires_grad_(False)
        self.layer: torch.nn.Module = bundle.unet.conv_out
        self.layer.requires_grad_(True)
        return [{"params": list(self.layer.parameters()), "name": "conv_out"}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"conv_out.{k}": v.detach().clone() for k, v in self.layer.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.layer.load_state_dict({k.removeprefix("conv_out."): v for k, v in state.items()})

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        tensors = {k: v.float().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        tensors["conv_out.bias"] *= self.options.bias_scale
        return atomic_save(info.path, lambda tmp: save_file(tensors, str(tmp)))

    def load_result(self, bundle: ModelBundle, path: Path) -> None:
        state = load_file(str(path))
        bundle.unet.conv_out.load_state_dict({k.removeprefix("conv_out."): v for k, v in state.items()})
