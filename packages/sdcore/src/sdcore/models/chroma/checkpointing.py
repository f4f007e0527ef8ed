"""Gradient checkpointing for Chroma's transformer that keeps the attention mask in every block.

diffusers 0.42's ``ChromaTransformer2DModel`` calls its single blocks through the checkpointing function
without ``attention_mask`` (its plain call passes it), so with ``--gradient-checkpointing`` T5's padding
would be hidden in the double blocks only: the same weights would train on another function than the
one a run without checkpointing (and every sampler) computes. Here the transformer's forward records
the mask it was given, and the checkpointing function hands it to a single block whose call lacks it.
A diffusers that passes the mask itself is left alone (the call then has it).

``gradient_checkpointing_func`` (``--cpu-offload-checkpointing``'s :class:`~sdcore.train.offload_checkpointing.
ActivationOffload`) replaces the plain ``torch.utils.checkpoint`` call: it gets the mask as a keyword.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: what the single blocks' checkpointed call passes without the mask: hidden states, temb, rotary embedding
_SINGLE_CALL_ARGS = 3


def _plain(block: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)


def enable_masked_checkpointing(transformer: nn.Module, gradient_checkpointing_func: Any = None) -> None:
    """diffusers' gradient checkpointing on ``transformer``, its single blocks given the forward's mask;
    ``gradient_checkpointing_func(block, *args, **kwargs)`` checkpoints each call (default: torch's)."""
    transformer._sdcore_checkpoint_inner = gradient_checkpointing_func or _plain  # type: ignore[assignment]
    if getattr(transformer, "_sdcore_masked_checkpointing", False):
        transformer.enable_gradient_checkpointing(  # type: ignore[operator]
            gradient_checkpointing_func=transformer._sdcore_checkpointed
        )
        return
    singles = {id(block) for block in getattr(transformer, "single_transformer_blocks", ())}
    seen: dict[str, Any] = {"mask": None}

    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["mask"] = kwargs.get("attention_mask")

    def checkpointed(block: nn.Module, *args: Any) -> Any:
        inner: Any = getattr(transformer, "_sdcore_checkpoint_inner", _plain)
        if id(block) in singles and len(args) == _SINGLE_CALL_ARGS and seen["mask"] is not None:
            return inner(block, *args, attention_mask=seen["mask"])
        return inner(block, *args)

    transformer.register_forward_pre_hook(remember, with_kwargs=True)
    transformer._sdcore_checkpointed = checkpointed  # type: ignore[assignment]
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)  # type: ignore[operator]
    transformer._sdcore_masked_checkpointing = True  # type: ignore[assignment]
