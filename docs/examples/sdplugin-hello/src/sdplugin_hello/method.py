"""The heavy part: imported only when the method runs."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sdcore.io import atomic_save
from sdcore.models.bundle import ModelBundle
from sdcore.options import option
from sdcore.train.method import SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions


@dataclass
class HelloOptions(TrainOptions):
    bias_scale: float = option(1.0, "Multiply the learned bias by this when saving.", group="hello")


class HelloMethod(TrainingMethod[HelloOptions]):
    name = "hello"
    options_class = HelloOptions

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        for module in bundle.components().values():
            module.requires_grad_(False)
        self.bias: torch.nn.Parameter = bundle.unet.conv_out.bias
        self.bias.requires_grad_(True)
        return [{"params": [self.bias], "name": "conv_out.bias"}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {"conv_out.bias": self.bias.detach().clone()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.bias.copy_(state["conv_out.bias"])

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        tensors = {"conv_out.bias": (self.bias.detach().float().cpu() * self.options.bias_scale).contiguous()}
        return atomic_save(info.path, lambda tmp: save_file(tensors, str(tmp)))

    def load_result(self, bundle: ModelBundle, path: Path) -> None:
        with torch.no_grad():
            bundle.unet.conv_out.bias.copy_(load_file(str(path))["conv_out.bias"])
