"""Did a model learn to read an image input? Loss with each sample's own input against another's.

The learning checks of methods whose denoiser takes an image beside the noisy latents (a Kontext reference, an
inpainting model's masked image, a FLUX.1 control image) share one measurement: the same batch, noise and
timesteps, once with each sample's own input and once with the inputs rolled by one sample. A model that reads
the input has a lower loss with its own; one that ignores it has equal losses.
"""

from __future__ import annotations

from typing import Any

#: the late timesteps where the input matters most (the noisy latents say little there)
CHECK_TIMESTEPS = (800, 950)


def own_and_shuffled_loss(session: Any, count: int, field: str) -> tuple[float, float]:
    """Mean loss of the first ``count`` samples of ``session`` (a set-up :class:`~sdcore.train.loop.TrainSession`)
    with the batch's own ``field`` (``"reference_latents"``, ``"masked_latents"``) and with it rolled by one
    sample; fixed per-sample noise at :data:`CHECK_TIMESTEPS`, no gradients."""
    import torch

    from ..train.data import SampleRef
    from ..train.noise import sample_noise

    batch = session.make_batch([SampleRef(i, 0, -1) for i in range(count)])
    own = getattr(batch, field)
    if own is None:
        raise ValueError(f"the batch has no {field}")
    out = []
    for order in (list(range(count)), [(i + 1) % count for i in range(count)]):
        setattr(batch, field, own[order])
        total = 0.0
        with torch.no_grad():
            for t in CHECK_TIMESTEPS:
                noise = sample_noise([i * 1000 + t for i in range(count)], batch.latents.shape[1:])[0]
                total += float(session.objective.sample_loss(batch, noise, torch.full((count,), t), 0).mean())
        out.append(total / len(CHECK_TIMESTEPS))
    setattr(batch, field, own)
    return out[0], out[1]


__all__ = ["CHECK_TIMESTEPS", "own_and_shuffled_loss"]
