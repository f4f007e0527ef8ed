"""The dropouts of the family: LyCORIS' rank-dropout mask, PEFT's input dropout and kohya's neuron and
rank dropout of the LoRA hidden state."""

from __future__ import annotations

import torch


def rank_dropout_mask(size: int, p: float, rescale: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """LyCORIS' rank-dropout mask: ``size`` entries kept with probability ``1 - p`` (one draw of
    ``torch.rand(size)``), and with ``rescale`` (LyCORIS ``rank_dropout_scale``) divided by their
    mean (``drop /= drop.mean()``), so the kept entries make up for the dropped ones in this very
    draw (not by the expected ``1/(1-p)``). A draw that drops everything stays all zero (LyCORIS
    would divide 0 by 0)."""
    mask = (torch.rand(size, device=device) > p).float()
    if rescale:
        mask = mask / mask.mean().clamp(min=1.0 / size)
    return mask


def lora_input(x: torch.Tensor, training: bool, p: float | None) -> torch.Tensor:
    """The LoRA branch's input: ``x`` after PEFT's ``lora_dropout`` while training (``--lora-input-dropout``).

    PEFT computes ``lora_B(lora_A(dropout(x))) * scaling`` (``peft.tuners.lora.layer.Linear.forward``): the
    dropout (``nn.Dropout``: zero with probability p, the rest divided by ``1 - p``, a fresh mask per forward
    from torch's global generator) is on the input features the LoRA reads, the base layer seeing ``x`` as it is.
    kohya's ``--dropout`` drops the down projection's output instead (:func:`scaled_hidden`)."""
    if training and p:
        return torch.nn.functional.dropout(x, p=p)
    return x


def scaled_hidden(
    hidden: torch.Tensor,
    scale: float | torch.Tensor,
    training: bool,
    dropout: float | None,
    rank_dropout: float | None,
) -> torch.Tensor:
    """kohya's LoRA hidden state ``down(x)`` after neuron and rank dropout (training only), times
    ``scale`` (multiplier · alpha/rank; rank dropout divides it by ``1 - p``). Scaling the rank-sized
    hidden state is cheaper than scaling the output. ``scale`` may be a tensor broadcasting over
    ``hidden`` (per-sample strengths, :meth:`Adapter.sample_factor`)."""
    if training and dropout:
        hidden = torch.nn.functional.dropout(hidden, p=dropout)
    if training and rank_dropout:
        rank = hidden.shape[1] if hidden.dim() == 4 else hidden.shape[-1]
        mask = (torch.rand(hidden.shape[0], rank, device=hidden.device) > rank_dropout).to(hidden.dtype)
        if hidden.dim() == 4:
            mask = mask[:, :, None, None]
        elif hidden.dim() == 3:
            mask = mask[:, None, :]
        hidden = hidden * mask
        scale = scale / (1.0 - rank_dropout)
    return hidden * scale
