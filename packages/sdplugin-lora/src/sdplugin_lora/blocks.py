"""kohya's block-wise options: block index of a module, per-block dims/alphas and learning-rate weights.

Torch-free. The rules are those of sd-scripts' ``networks/lora.py`` (``get_block_index``,
``get_block_dims_and_alphas``, ``get_block_lr_weight``), so the same ``--network_args`` strings
give the same network:

* SD1/SD2: 25 blocks. 0 = IN00 (``conv_in``, never adapted), 1-11 = ``down_blocks_i_{resnets,
  attentions}_j`` at ``1 + 3i + j`` and ``down_blocks_i_downsamplers`` at ``1 + 3i + 2``,
  12 = ``mid_block``, 13-24 = ``up_blocks`` at ``13 + 3i + j`` (upsamplers ``13 + 3i + 2``).
  ``down_lr_weight``/``up_lr_weight`` have 12 values, ``mid_lr_weight`` 1.
* SDXL (SGM names): 23 blocks. 0 = time/label embedding, 1-9 = ``input_blocks_N`` (``1 + N``),
  10-12 = ``middle_block_N``, 13-21 = ``output_blocks_N``, 22 = ``out``. 9, 3 and 9 lr values.

``*_lr_weight`` also take kohya's presets ``sine``, ``cosine``, ``linear``, ``reverse_linear``,
``zeros`` with an optional ``+offset``; lists shorter than a side are filled with 1, longer ones
cut; weights not above ``block_lr_zero_threshold`` become 0, and a block with weight 0 gets no
modules (its dims are set to 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sdcore.errors import ConfigError

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


def _sdxl(family: str) -> bool:
    return family.startswith("sdxl")


def sides(family: str) -> tuple[int, int]:
    """(values per down/up side, mid values) of the lr-weight lists."""
    return (9, 3) if _sdxl(family) else (12, 1)


def block_count(family: str) -> int:
    """How many values ``block_dims`` & co. take: 25 (SD1/SD2) or 23 (SDXL)."""
    side, mid = sides(family)
    return side * 2 + mid + (2 if _sdxl(family) else 0)


def block_index(name: str, family: str) -> int:
    """kohya's block of a module name (``-1`` for text-encoder and unknown modules)."""
    if name.startswith("oft_unet_"):  # kohya networks.oft names the same modules
        name = "lora_unet_" + name[len("oft_unet_") :]
    if not name.startswith("lora_unet_"):
        return -1
    if not _sdxl(family):
        found = _RE_UPDOWN.search(name)
        if found:
            side, i, kind, j = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
            index = 3 * i + 2 if kind in ("upsamplers", "downsamplers") else 3 * i + j
            return 1 + index if side == "down" else 13 + index
        return 12 if "mid_block_" in name else -1
    rest = name[len("lora_unet_") :]
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(prefix):
            return base + int(rest[len(prefix) :].split("_")[0])
    return 22 if rest.startswith("out_") else -1


def _floats(flag: str, text: str) -> list[float]:
    try:
        return [float(part) if part.strip() else 0.0 for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{flag.replace('_', '-')} {text!r}: expected comma-separated numbers") from None


def _preset(flag: str, text: str, length: int) -> list[float]:
    name, _, offset_text = text.partition("+")
    try:
        offset = float(offset_text) if offset_text else 0.0
    except ValueError:
        raise ConfigError(f"--{flag.replace('_', '-')} {text!r}: the part after + must be a number") from None
    steps = [i / (length - 1) for i in range(length)]
    if name == "sine":
        values = [math.sin(math.pi * s / 2) for s in steps]
    elif name == "cosine":
        values = [math.sin(math.pi * s / 2) for s in reversed(steps)]
    elif name == "linear":
        values = steps
    elif name == "reverse_linear":
        values = list(reversed(steps))
    elif name == "zeros":
        values = [0.0] * length
    else:
        raise ConfigError(
            f"--{flag.replace('_', '-')} {text!r}: use comma-separated numbers or one of {', '.join(PRESETS)} (+offset)"
        )
    return [v + offset for v in values]


def _side(flag: str, text: str, length: int) -> list[float]:
    """A down/up list. kohya splits only text with a comma; anything else is a preset name, and a
    bare number (``"2"``) is an unknown preset that kohya logs and then ignores (all weights 1):
    refused here with the spelling that means the number (``"2,"`` would add a 0: kohya reads an
    empty part as 0)."""
    if "," not in text and _is_number(text):
        raise ConfigError(
            f"--{flag.replace('_', '-')} {text!r}: kohya reads a value without a comma as a preset name and ignores "
            f"this one; write the list, e.g. '{text},1' for the first block at {text} and the rest at 1"
        )
    values = _floats(flag, text) if "," in text else _preset(flag, text, length)
    return (values + [1.0] * length)[:length]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def block_lr_weights(
    family: str,
    down: str | None,
    mid: str | None,
    up: str | None,
    zero_threshold: float = 0.0,
) -> list[float] | None:
    """One lr weight per block (``None`` when no option is set), as kohya computes them."""
    if down is None and mid is None and up is None:
        return None
    side, mid_count = sides(family)
    down_w = _side("down_lr_weight", down, side) if down is not None else [1.0] * side
    mid_w = (_floats("mid_lr_weight", mid) + [1.0] * mid_count)[:mid_count] if mid is not None else [1.0] * mid_count
    up_w = _side("up_lr_weight", up, side) if up is not None else [1.0] * side

    def cut(values: list[float], given: str | None) -> list[float]:
        return [v if v > zero_threshold else 0.0 for v in values] if given is not None else values

    weights = cut(down_w, down) + cut(mid_w, mid) + cut(up_w, up)
    return [1.0, *weights, 1.0] if _sdxl(family) else weights


def _ints(flag: str, text: str, count: int) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{flag.replace('_', '-')} {text!r}: expected {count} comma-separated integers") from None
    if len(values) != count:
        raise ConfigError(f"--{flag.replace('_', '-')} has {len(values)} values; this model family needs {count}")
    return values


def _alphas(flag: str, text: str, count: int) -> list[float]:
    values = _floats(flag, text)
    if len(values) != count:
        raise ConfigError(f"--{flag.replace('_', '-')} has {len(values)} values; this model family needs {count}")
    return values


@dataclass
class BlockPlan:
    """Per-block dims/alphas (linear + 1x1 and kxk conv) and lr weights for one model family."""

    family: str
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weights: list[float] | None

    @classmethod
    def build(
        cls,
        family: str,
        *,
        rank: int,
        alpha: float,
        conv_rank: int | None,
        conv_alpha: float | None,
        block_dims: str | None = None,
        block_alphas: str | None = None,
        conv_block_dims: str | None = None,
        conv_block_alphas: str | None = None,
        down_lr_weight: str | None = None,
        mid_lr_weight: str | None = None,
        up_lr_weight: str | None = None,
        block_lr_zero_threshold: float = 0.0,
    ) -> BlockPlan | None:
        """``None`` unless a block option is set (kohya then behaves as without them)."""
        if family not in ("sd1", "sd2", "sdxl"):
            if any(v is not None for v in (block_dims, conv_block_dims, down_lr_weight, mid_lr_weight, up_lr_weight)):
                raise ConfigError(f"block-wise dims/learning rates are defined for sd1, sd2 and sdxl, not {family}")
            return None
        lr_weights = block_lr_weights(family, down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold)
        if block_dims is None and lr_weights is None and conv_block_dims is None:
            return None
        count = block_count(family)
        dims = _ints("block_dims", block_dims, count) if block_dims is not None else [rank] * count
        alphas = _alphas("block_alphas", block_alphas, count) if block_alphas is not None else [alpha] * count
        conv_dims: list[int] | None
        conv_alphas: list[float] | None
        if conv_block_dims is not None:
            conv_dims = _ints("conv_block_dims", conv_block_dims, count)
            conv_alphas = (
                _alphas("conv_block_alphas", conv_block_alphas, count)
                if conv_block_alphas is not None
                else [conv_alpha if conv_alpha is not None else 1.0] * count
            )
        elif conv_rank:
            conv_dims = [conv_rank] * count
            conv_alphas = [conv_alpha if conv_alpha is not None else 1.0] * count
        else:
            conv_dims = conv_alphas = None
        if lr_weights is not None:  # a block that does not learn gets no modules
            for i, weight in enumerate(lr_weights):
                if weight == 0:
                    dims[i] = 0
                    if conv_dims is not None:
                        conv_dims[i] = 0
        return cls(family, dims, alphas, conv_dims, conv_alphas, lr_weights)

    def block(self, name: str) -> int:
        return block_index(name, self.family)

    def rank_for(self, name: str, conv3x3: bool) -> tuple[int, float | None] | None:
        """(rank, alpha) of a UNet module (``None``: not a block module, keep the defaults)."""
        index = self.block(name)
        if index < 0:
            return None
        if conv3x3:
            if self.conv_dims is None or self.conv_alphas is None:
                return 0, None
            return self.conv_dims[index], self.conv_alphas[index]
        return self.dims[index], self.alphas[index]

    def lr_weight(self, name: str) -> float:
        index = self.block(name)
        if self.lr_weights is None or index < 0:
            return 1.0
        return self.lr_weights[index]


def check_block_options(
    *,
    block_dims: str | None,
    block_alphas: str | None,
    conv_block_dims: str | None,
    conv_block_alphas: str | None,
    down_lr_weight: str | None,
    mid_lr_weight: str | None,
    up_lr_weight: str | None,
) -> list[str]:
    """Syntax problems of the block options before any model is loaded (one message each)."""
    problems: list[str] = []
    counts = (block_count("sd1"), block_count("sdxl"))
    for flag, text in (("block_dims", block_dims), ("conv_block_dims", conv_block_dims)):
        if text is not None:
            try:
                values = [int(part) for part in text.split(",")]
                if len(values) not in counts:
                    problems.append(
                        f"--{flag.replace('_', '-')} needs {counts[0]} (SD1/SD2) or {counts[1]} (SDXL) values"
                    )
            except ValueError:
                problems.append(f"--{flag.replace('_', '-')} {text!r}: expected comma-separated integers")
    for flag, text in (("block_alphas", block_alphas), ("conv_block_alphas", conv_block_alphas)):
        if text is not None:
            try:
                _floats(flag, text)
            except ConfigError as exc:
                problems.append(str(exc))
    for flag, text in (("down_lr_weight", down_lr_weight), ("up_lr_weight", up_lr_weight)):
        if text is not None:
            try:
                _side(flag, text, 12)
            except ConfigError as exc:
                problems.append(str(exc))
    if mid_lr_weight is not None:
        try:
            _floats("mid_lr_weight", mid_lr_weight)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


__all__ = ["PRESETS", "BlockPlan", "block_count", "block_index", "block_lr_weights", "check_block_options", "sides"]
