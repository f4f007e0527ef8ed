"""Gradient checkpointing for Chroma's transformer that keeps the attention mask in every block.

diffusers 0.42's ``ChromaTransformer2DModel`` calls its single blocks through the checkpointing function
without ``attention_mask`` (its plain call passes it), so with ``--gradient-checkpointing`` T5's padding
would be hidden in the double blocks only: the same weights would train on another function than the
one a run without checkpointing (and every sampler) computes. Here the transformer's forward records
the mask it was given, and the checkpointing function hands it to a single block whose call lacks it.
A diffusers that passes the mask itself is left alone (the call then has it).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

#: what the single blocks' checkpointed call passes without the mask: hidden states, temb, rotary embedding
_SINGLE_CALL_ARGS = 3


def enable_masked_checkpointing(transformer: nn.Module) -> None:
    """diffusers' gradient checkpointing on ``transformer``, its single blocks given the forward's mask."""
    if getattr(transformer, "_sdcore_masked_checkpointing", False):
        transformer.enable_gradient_checkpointing()  # type: ignore[operator]
        return
    singles = {id(block) for block in getattr(transformer, "single_transformer_blocks", ())}
    seen: dict[str, Any] = {"mask": None}

    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["mask"] = kwargs.get("attention_mask")

    def checkpointed(block: nn.Module, *args: Any) -> Any:
        call: Any = block
        if id(block) in singles and len(args) == _SINGLE_CALL_ARGS and seen["mask"] is not None:
            call = functools.partial(block, attention_mask=seen["mask"])
        return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=False)

    transformer.register_forward_pre_hook(remember, with_kwargs=True)
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)  # type: ignore[operator]
    transformer._sdcore_masked_checkpointing = True  # type: ignore[assignment]
