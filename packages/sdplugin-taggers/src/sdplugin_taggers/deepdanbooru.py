"""DeepDanbooru ``resnet_custom_v3`` in torch, loading TorchDeepDanbooru / A1111 ``.pt`` files.

Layout facts (from the ONNX-derived TorchDeepDanbooru port; the code here is our own): 179 convs
named ``n_Conv_0`` .. ``n_Conv_178`` with batch-norm folded into their biases, a 7x7/2 stem and a
3x3/2 max-pool, six bottleneck stages of (256 x 3, 512 x 8, 1024 x 20, 1024 x 20, 2048 x 3,
4096 x 3) blocks, a bias-free 1x1 conv to the tags, global average pool and sigmoid. TF "SAME"
padding is reproduced with explicit pads. Conv numbering follows the export order: the projection
shortcut of a stage's first block comes *before* its main convs, except in the fourth stage where
it comes after. The input is NHWC RGB in [0, 1] at 512x512. The file is a state dict plus a
``tags`` list of tag names in output order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdcore.errors import ModelFormatError

from .images import fit_edge_pad
from .runner import BatchTagger, default_workers
from .tags import TagFormat

#: (output channels, blocks) per stage of resnet_custom_v3.
STAGES_V3: tuple[tuple[int, int], ...] = ((256, 3), (512, 8), (1024, 20), (1024, 20), (2048, 3), (4096, 3))
STEM_CHANNELS = 64
INPUT_SIZE = 512
N_TAGS_V3 = 9176
_SHORTCUT_AFTER_STAGE = 3  # the export put this stage's projection conv after the main path


def conv_layout(
    width_div: int = 1, n_tags: int = N_TAGS_V3
) -> tuple[list[tuple[str, int, int, int, int]], list[list[int]]]:
    """The convs and how they group into bottleneck blocks.

    Returns ``(plan, blocks)``: ``plan[i]`` is ``(role, in, out, kernel, stride)`` for
    ``n_Conv_i`` (roles ``stem``, ``short`` = projection shortcut, ``a``/``b``/``c`` = the 1x1,
    3x3, 1x1 of a bottleneck, ``head``); ``blocks`` lists the conv indices of each block.
    ``width_div`` shrinks every width (tests build tiny models with the same layout).
    """
    plan: list[tuple[str, int, int, int, int]] = [("stem", 3, STEM_CHANNELS // width_div, 7, 2)]
    blocks: list[list[int]] = []
    channels = STEM_CHANNELS // width_div
    for stage, (out_full, count) in enumerate(STAGES_V3):
        out = out_full // width_div
        mid = out // 4
        for block in range(count):
            stride = 2 if (block == 0 and stage > 0) else 1
            convs = [("a", channels, mid, 1, 1), ("b", mid, mid, 3, stride), ("c", mid, out, 1, 1)]
            if block == 0:
                short = ("short", channels, out, 1, stride)
                convs = [*convs, short] if stage == _SHORTCUT_AFTER_STAGE else [short, *convs]
            blocks.append(list(range(len(plan), len(plan) + len(convs))))
            plan.extend(convs)
            channels = out
    plan.append(("head", channels, n_tags, 1, 1))
    return plan, blocks


def build_model(width_div: int = 1, n_tags: int = N_TAGS_V3) -> Any:
    """The torch module (created lazily so importing this file does not import torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    plan, blocks = conv_layout(width_div, n_tags)

    class DeepDanbooruNet(nn.Module):
        """resnet_custom_v3 with TorchDeepDanbooru's parameter names."""

        def __init__(self) -> None:
            super().__init__()
            self.plan = plan
            self.blocks = blocks
            for i, (role, cin, cout, k, s) in enumerate(plan):
                self.add_module(f"n_Conv_{i}", nn.Conv2d(cin, cout, k, stride=s, bias=role != "head"))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            convs = [getattr(self, f"n_Conv_{i}") for i in range(len(self.plan))]
            x = x.permute(0, 3, 1, 2)
            x = F.relu(convs[0](F.pad(x, [2, 3, 2, 3])))
            x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), 3, 2)
            for block in self.blocks:
                shortcut = out = x
                for i in block:
                    role, stride = self.plan[i][0], self.plan[i][4]
                    if role == "short":
                        shortcut = convs[i](x)
                    elif role == "a":
                        out = F.relu(convs[i](x))
                    elif role == "b":
                        out = F.relu(convs[i](F.pad(out, [1, 1, 1, 1] if stride == 1 else [0, 1, 0, 1])))
                    else:  # "c": no relu before the residual add
                        out = convs[i](out)
                x = F.relu(out + shortcut)
            logits = convs[-1](x).mean(dim=(2, 3))
            return torch.sigmoid(logits)

    return DeepDanbooruNet()


def load_deepdanbooru(path: str | os.PathLike[str], *, map_location: str = "cpu") -> tuple[Any, list[str]]:
    """Load a TorchDeepDanbooru ``.pt``: returns ``(model, tags)`` with the model in eval mode.

    Only ``torch.load(weights_only=True)`` is used: a pickle that asks to import or call anything
    outside torch's tensor allow-list raises :class:`UnsafeFileError` before any of it runs.
    """

    file = Path(path)
    if not file.is_file():
        raise ModelFormatError(f"{file}: DeepDanbooru model not found")
    from sdcore.models.safe_pickle import load_pickle

    state = load_pickle(file, mmap=False)
    if not isinstance(state, dict) or "n_Conv_0.weight" not in state:
        raise ModelFormatError(f"{file}: not a TorchDeepDanbooru state dict (no n_Conv_0.weight)")
    tags = state.pop("tags", None)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ModelFormatError(f"{file}: no 'tags' list of tag names in the state dict")
    stem_out = int(state["n_Conv_0.weight"].shape[0])
    if stem_out == 0 or STEM_CHANNELS % stem_out:
        raise ModelFormatError(f"{file}: unexpected stem width {stem_out}")
    width_div = STEM_CHANNELS // stem_out
    model = build_model(width_div, len(tags))
    expected = model.state_dict()
    wrong = sorted(set(expected) ^ set(state)) or [
        k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if wrong:
        raise ModelFormatError(
            f"{file}: not a resnet_custom_v3 layout with {len(tags)} tags (first mismatch: {wrong[0]})"
        )
    model.load_state_dict(state)
    model.eval()
    return model, tags


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class DeepDanbooruTagger(BatchTagger):
    """Tag images with DeepDanbooru: TF-style fit + edge padding to 512, threshold 0.5 (``>=``).

    ``rating:*`` outputs become the rating dict (prefix removed); the ``.pt`` has no categories,
    so every other tag counts as general.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        threshold: float = 0.5,
        fmt: TagFormat | None = None,
        batch_size: int = 4,
        workers: int | None = None,
        device: str = "auto",
        size: int = INPUT_SIZE,
    ) -> None:
        import torch

        self.messages = []
        self.fmt = fmt or TagFormat()
        self.threshold = threshold
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        self.size = size
        self.device = resolve_device(device)
        self.model, self.tag_names = load_deepdanbooru(model_path)
        self.model.to(self.device)
        self._dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model.to(self._dtype)
        self._rating = [(i, t.split(":", 1)[1]) for i, t in enumerate(self.tag_names) if t.startswith("rating:")]
        self._general = [(i, t) for i, t in enumerate(self.tag_names) if not t.startswith("rating:")]

    def _preprocess(self, source: Any) -> tuple[Any, tuple[int, int]]:
        return fit_edge_pad(source, self.size)

    def _predict(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self._dtype)
            return self.model(x).float().cpu().numpy()

    def _select(self, probs: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        row = probs.tolist()
        rating = {name: row[i] for i, name in self._rating}
        general = {name: row[i] for i, name in self._general if row[i] >= self.threshold}
        return rating, general, {}
