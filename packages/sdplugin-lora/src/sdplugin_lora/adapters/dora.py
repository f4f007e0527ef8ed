"""DoRA's weight decomposition, ``W' = magnitude · (W + ΔW) / ‖W + ΔW‖``, on top of any variant."""

from __future__ import annotations

import torch


class Dora:
    """DoRA's weight decomposition: ``W' = magnitude · (W + ΔW) / ‖W + ΔW‖``.

    We write the magnitude per *input* channel (``dora_scale`` shaped ``[1, in]`` / ``[1, in, 1, 1]``,
    the norm taken over the output and kernel axes; LyCORIS ``wd_on_out=False``), because that is
    the layout A1111 and ComfyUI compute correctly (see the package README). Files with the
    LyCORIS ``wd_on_out=True`` layout (``[out, 1, ...]``) are read with their own axis.
    A multiplier ``m`` applies to the resulting change: ``W + m · (W' - W)``, as the UIs do.
    """

    @staticmethod
    def magnitude(weight: torch.Tensor) -> torch.Tensor:
        """The initial ``dora_scale`` (``‖W‖`` per input channel), so training starts at identity."""
        w = weight.detach().float()
        return Dora.norm(w, per_output=False)

    @staticmethod
    def norm(weight: torch.Tensor, *, per_output: bool) -> torch.Tensor:
        """``‖W‖`` per output row (``[out, 1, ...]``) or per input channel (``[1, in, ...]``)."""
        rest = [1] * (weight.dim() - 2)
        if per_output:
            return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], 1, *rest)
        return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *rest)

    @staticmethod
    def per_output(magnitude: torch.Tensor, weight_shape: tuple[int, ...]) -> bool:
        """Which axis a stored magnitude belongs to, from its shape."""
        out = weight_shape[0]
        if magnitude.dim() == 1:
            return magnitude.shape[0] == out
        # [1, 1] is per output row for a layer of one output and several inputs (PEFT's magnitudes, read as [out, 1])
        return magnitude.shape[0] == out and magnitude.shape[1] == 1 and (out != 1 or weight_shape[1] != 1)

    @staticmethod
    def apply(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """``W'`` in fp32 from the base weight, the scaled ``ΔW`` and the stored magnitude."""
        merged = base.float() + delta
        per_output = Dora.per_output(magnitude, tuple(base.shape))
        norm = Dora.norm(merged, per_output=per_output)
        return merged * (magnitude.float().reshape(norm.shape) / norm)
