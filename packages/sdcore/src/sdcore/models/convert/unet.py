"""diffusers ``UNet2DConditionModel`` key <-> ldm/SGM ``model.diffusion_model.*`` key.

ldm numbers its blocks flatly: ``input_blocks.0`` is ``conv_in``, then one entry per resnet (with
its attention at ``.1``) and one per downsampler; ``output_blocks`` has ``layers + 1`` entries per
up block with the upsampler in the last one (at ``.1`` without attention, ``.2`` with). The indices
are computed from ``layers_per_block`` and the block types rather than hard-coded for SD's four
blocks (the official diffusers script does that and corrupts other layouts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import ModelFormatError

PREFIX = "model.diffusion_model."

_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


@dataclass(frozen=True)
class UNetLayout:
    """Flat ldm indices of every diffusers block, derived from a UNet config."""

    down_resnets: tuple[tuple[int, ...], ...]  # [block][layer] -> input_blocks index
    down_samplers: tuple[int | None, ...]
    up_resnets: tuple[tuple[int, ...], ...]  # [block][layer] -> output_blocks index
    up_samplers: tuple[tuple[int, int] | None, ...]  # (output_blocks index, position)
    mid_has_attention: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        down_types = list(config["down_block_types"])
        up_types = list(config["up_block_types"])
        n = len(down_types)
        layers = config.get("layers_per_block", 2)
        per_block = [int(layers)] * n if isinstance(layers, int) else [int(x) for x in layers]
        down_res: list[tuple[int, ...]] = []
        down_smp: list[int | None] = []
        index = 1
        for i in range(n):
            down_res.append(tuple(range(index, index + per_block[i])))
            index += per_block[i]
            if i < n - 1:
                down_smp.append(index)
                index += 1
            else:
                down_smp.append(None)
        up_res: list[tuple[int, ...]] = []
        up_smp: list[tuple[int, int] | None] = []
        reversed_layers = list(reversed(per_block))
        index = 0
        for i, block_type in enumerate(up_types):
            count = reversed_layers[i] + 1
            up_res.append(tuple(range(index, index + count)))
            index += count
            if i < n - 1:
                up_smp.append((index - 1, 2 if "CrossAttn" in block_type else 1))
            else:
                up_smp.append(None)
        mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        return cls(tuple(down_res), tuple(down_smp), tuple(up_res), tuple(up_smp), "CrossAttn" in mid_type)


def _resnet(rest: list[str]) -> str:
    head = rest[0]
    if head not in _RESNET:
        raise KeyError(head)
    return ".".join([_RESNET[head], *rest[1:]])


def unet_key_to_ldm(key: str, layout: UNetLayout) -> str:
    """The ldm name (without ``model.diffusion_model.``) of diffusers UNet key ``key``."""
    parts = key.split(".")
    try:
        for name, target in _TOP.items():
            if key.startswith(name + "."):
                return target + key[len(name) :]
        if parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "resnets":
                return f"input_blocks.{layout.down_resnets[i][int(parts[3])]}.0.{_resnet(parts[4:])}"
            if kind == "attentions":
                return f"input_blocks.{layout.down_resnets[i][int(parts[3])]}.1.{'.'.join(parts[4:])}"
            if kind == "downsamplers" and parts[4] == "conv":
                return f"input_blocks.{layout.down_samplers[i]}.0.op.{'.'.join(parts[5:])}"
        if parts[0] == "mid_block":
            kind, j = parts[1], int(parts[2])
            if kind == "resnets":
                position = j * 2 if layout.mid_has_attention else j
                return f"middle_block.{position}.{_resnet(parts[3:])}"
            if kind == "attentions" and j == 0:
                return f"middle_block.1.{'.'.join(parts[3:])}"
        if parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "resnets":
                return f"output_blocks.{layout.up_resnets[i][int(parts[3])]}.0.{_resnet(parts[4:])}"
            if kind == "attentions":
                return f"output_blocks.{layout.up_resnets[i][int(parts[3])]}.1.{'.'.join(parts[4:])}"
            if kind == "upsamplers" and parts[4] == "conv":
                sampler = layout.up_samplers[i]
                if sampler is not None:
                    return f"output_blocks.{sampler[0]}.{sampler[1]}.conv.{'.'.join(parts[5:])}"
    except (KeyError, IndexError, ValueError, TypeError):
        pass
    raise ModelFormatError(f"UNet key {key!r} has no ldm equivalent (unsupported UNet layout)")


def unet_key_map(keys: list[str], config: Mapping[str, Any]) -> dict[str, str]:
    """``{diffusers key: full ldm key}`` for every key of a UNet built from ``config``."""
    layout = UNetLayout.from_config(config)
    mapping = {key: PREFIX + unet_key_to_ldm(key, layout) for key in keys}
    if len(set(mapping.values())) != len(mapping):
        raise ModelFormatError("UNet layout maps two diffusers keys to one ldm key (unsupported UNet layout)")
    return mapping
