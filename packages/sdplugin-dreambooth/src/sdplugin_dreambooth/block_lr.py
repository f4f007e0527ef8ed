"""kohya's ``--block_lr`` (sdxl_train.py): one learning rate per SDXL U-Net block in a full fine-tune.

kohya numbers the U-Net's parameters by their SGM (ldm) names, 23 blocks:

- 0: ``time_embed.*`` and ``label_emb.*`` (the timestep and size/crop embeddings);
- 1-9: ``input_blocks.0`` .. ``input_blocks.8`` (``conv_in`` is ``input_blocks.0``);
- 10-12: ``middle_block.0`` .. ``middle_block.2``;
- 13-21: ``output_blocks.0`` .. ``output_blocks.8``;
- 22: ``out.*`` (the final norm and ``conv_out``).

sdcore's U-Net is diffusers', so each parameter's name goes through sdcore's own diffusers -> ldm
key map (:func:`sdcore.models.convert.unet.unet_key_map`) first. Each block becomes one optimizer
group at its rate, in block order (kohya's order, which its ``--fused_optimizer_groups`` split
follows); a block at 0 is not optimised, as in kohya. kohya leaves such a block requiring gradients
(so with ``--max_grad_norm`` its never-cleared gradients count in the clipping norm); sdcore freezes
it instead, which saves its gradients' memory and clips over the trained blocks' gradients only.
"""

from __future__ import annotations

import math
from typing import Any

#: kohya's UNET_NUM_BLOCKS_FOR_BLOCK_LR
BLOCK_COUNT = 23


def parse_block_lr(text: str) -> list[float]:
    """``"1e-6,2e-6,..."`` (23 comma-separated rates, kohya's format) -> the rates; ``ValueError``
    with the reason when the count or a value is wrong."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        rates = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"--block-lr needs {BLOCK_COUNT} comma-separated numbers, got {text!r}") from None
    if len(rates) != BLOCK_COUNT:
        raise ValueError(f"--block-lr needs {BLOCK_COUNT} values (kohya's SDXL U-Net blocks), got {len(rates)}")
    bad = [r for r in rates if not math.isfinite(r) or r < 0]
    if bad:
        raise ValueError(f"--block-lr rates must be 0 (frozen) or positive, got {bad[0]}")
    return rates


def block_of(ldm_name: str) -> int:
    """kohya's block number (0-22) of a U-Net parameter's ldm name (without ``model.diffusion_model.``)."""
    head, _, rest = ldm_name.partition(".")
    if head in ("time_embed", "label_emb"):
        return 0
    if head == "input_blocks":
        return 1 + int(rest.split(".")[0])
    if head == "middle_block":
        return 10 + int(rest.split(".")[0])
    if head == "output_blocks":
        return 13 + int(rest.split(".")[0])
    if head == "out":
        return 22
    raise ValueError(f"unexpected U-Net parameter {ldm_name!r} for --block-lr")


def block_param_groups(unet: Any, rates: list[float]) -> list[dict[str, Any]]:
    """One optimizer group per block with a positive rate (``name`` ``unet_block_NN``), in block
    order; the parameters of blocks at 0 get ``requires_grad`` off. ``unet`` is a diffusers U-Net."""
    from sdcore.models.convert.unet import PREFIX, unet_key_map

    named = dict(unet.named_parameters())
    ldm = unet_key_map(list(named), unet.config)
    blocks: list[list[Any]] = [[] for _ in range(BLOCK_COUNT)]
    for name, param in named.items():
        blocks[block_of(ldm[name][len(PREFIX) :])].append(param)
    groups: list[dict[str, Any]] = []
    for index, (params, rate) in enumerate(zip(blocks, rates, strict=True)):
        if rate == 0:
            for param in params:
                param.requires_grad_(False)
        elif params:
            groups.append({"params": params, "lr": rate, "name": f"unet_block_{index:02d}"})
    return groups


__all__ = ["BLOCK_COUNT", "block_of", "block_param_groups", "parse_block_lr"]
