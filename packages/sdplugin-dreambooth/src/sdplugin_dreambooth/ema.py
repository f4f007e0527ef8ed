"""An exponential moving average of trained parameters, kept in fp32 on the parameters' device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ParameterEMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` so early steps are not
    dominated by the initial weights (the schedule diffusers' EMAModel uses).
    """

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float = 0.999) -> None:
        self.parameters = list(parameters)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, self.parameters, strict=True):
            shadow.mul_(decay).add_(param.detach().float(), alpha=1 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights in for the duration of the block (for saving or sampling)."""
        backup = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.parameters, strict=True):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.parameters, strict=True):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{i}": t for i, t in enumerate(self.shadow)}
        state["ema.updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(state[f"ema.{i}"])
        self.updates = int(state["ema.updates"])
