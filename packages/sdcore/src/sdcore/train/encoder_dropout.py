"""kohya's per-encoder caption dropout of SD3 (``--clip_l_dropout_rate``, ``--clip_g_dropout_rate``,
``--t5_dropout_rate``; ``library/strategy_sd3.py`` at sd-scripts 48d368f).

What kohya drops: per sample, with each rate's probability, that encoder's *output* is replaced by
zeros (its part of the context's channels for the CLIP encoders, its part of the pooled vector,
T5's whole token sequence), not by the encoding of an empty caption. It draws once per sample and
encoder whose rate is above 0, CLIP-L then CLIP-G then T5, and drops when the draw is below the rate
(so 1.0 always drops). With cached text-encoder outputs kohya drops after the cache, at every step
(``drop_cached_text_encoder_outputs``); without a cache, while encoding; the result is the same, and
so here the dropout is applied to the conditioning whichever way it was made (cache or encoder).
kohya applies it to the validation batches too (with the validation seed), and so does sdcore.

Why the draws come from the sample's noise generator (:mod:`.noise`): the same sample in the same
epoch drops the same encoders whatever the batch size, accumulation, process count or resume point.
They are drawn after every existing draw of that generator (``NoiseSettings.after_draws``), and not
at all when every rate is 0, so runs without these options draw exactly what they drew before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: the text encoders that can be dropped, in kohya's draw order, with their option names
ENCODERS = (("clip_l", "clip_l_dropout_rate"), ("clip_g", "clip_g_dropout_rate"), ("t5", "t5_dropout_rate"))
#: ``Batch.extra`` key of the per-sample dropped encoders (a list of frozensets of :data:`ENCODERS` names)
DROPPED_KEY = "dropped_text_encoders"


@dataclass(frozen=True)
class EncoderDropout:
    """The rates of one run (each in [0, 1]; 0 draws nothing)."""

    clip_l: float = 0.0
    clip_g: float = 0.0
    t5: float = 0.0

    @classmethod
    def from_options(cls, options: Any) -> EncoderDropout | None:
        """The run's dropout, or None when every rate is 0 (nothing is drawn then)."""
        rates = {name: float(getattr(options, option, 0.0) or 0.0) for name, option in ENCODERS}
        if not any(rates.values()):
            return None
        return cls(**rates)

    def draw(self, gen: torch.Generator) -> frozenset[str]:
        """One sample's dropped encoders: one uniform draw per encoder with a rate above 0, in
        kohya's order, dropped when below the rate."""
        import torch

        dropped = []
        for name, _option in ENCODERS:
            rate = getattr(self, name)
            if rate > 0.0 and float(torch.rand((), generator=gen)) < rate:
                dropped.append(name)
        return frozenset(dropped)

    def recorder(self, count: int) -> tuple[list[frozenset[str]], Callable[[int, torch.Generator], None]]:
        """(the list the draws land in, one per sample, and the ``NoiseSettings.after_draws`` hook filling it)."""
        drops: list[frozenset[str]] = [frozenset()] * count

        def after_draws(index: int, gen: torch.Generator) -> None:
            drops[index] = self.draw(gen)

        return drops, after_draws


__all__ = ["DROPPED_KEY", "ENCODERS", "EncoderDropout"]
