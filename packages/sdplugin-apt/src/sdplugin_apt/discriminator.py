"""A ConvNeXt image classifier used as DreamArtist's optional "good image" scorer.

DreamArtist scores the decoded prediction with a timm ``convnext_tiny`` (3 classes) and trains
on ``1 - softmax(logits)[:, 1]``. This is a plain-torch ConvNeXt whose parameter names follow
timm's (``stem.0``, ``stages.N.downsample``, ``stages.N.blocks.M.conv_dw`` ...), so a timm
checkpoint loads directly; depths and widths are read from the checkpoint, which is how tests
use a tiny random one. No weights ship with sdcore: the user provides them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sdcore.errors import ModelFormatError
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, 4x MLP, layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return self.fc(x)


class ConvNeXtScorer(nn.Module):
    """ConvNeXt classifier; :meth:`score` is the probability of class ``good_class`` (1)."""

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        classes: int = 3,
        good_class: int = 1,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError("depths and dims must have the same length")
        self.good_class = good_class
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(
            *[Stage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0) for i in range(len(dims))]
        )
        self.head = Head(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def score(self, image: torch.Tensor, *, size: int = 384) -> torch.Tensor:
        """``[B]`` scores of images in [-1, 1]: to [0, 1], bicubic resize, ImageNet normalisation."""
        x = (image.float() + 1) / 2
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        logits = self((x - mean) / std)
        return logits.softmax(dim=-1)[:, self.good_class]


def architecture_of(state: dict[str, torch.Tensor]) -> tuple[list[int], list[int], int]:
    """(depths, dims, classes) read from a timm-style ConvNeXt state dict."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not blocks or "head.fc.weight" not in state:
        raise ModelFormatError("not a ConvNeXt classifier state dict (no stages.N.blocks.M.* or head.fc.weight)")
    stages = sorted(blocks)
    depths = [max(blocks[i]) + 1 for i in stages]
    dims = [int(state[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in stages]
    return depths, dims, int(state["head.fc.weight"].shape[0])


def load_discriminator(path: str | Path) -> ConvNeXtScorer:
    """Build a :class:`ConvNeXtScorer` from user weights (``.safetensors`` or a weights-only ``.pt``)."""
    path = Path(path)
    state: Any
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFormatError(f"{path}: not a readable safetensors file: {exc}") from exc
    else:
        from sdplugin_ti.formats import load_pickle

        state = load_pickle(path)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path}: expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        depths, dims, classes = architecture_of(state)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from exc
    model = ConvNeXtScorer(depths, dims, classes)
    missing, _unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ModelFormatError(f"{path}: classifier weights lack {len(missing)} tensors, e.g. {missing[0]}")
    return model
