"""The step: noise and timesteps, the prediction, the loss terms, and one optimizer step.

- :class:`Objective` turns a batch into a per-sample loss: the family's training objective
  (:mod:`.objectives`: DDPM epsilon/v-prediction or flow matching) noises it at the sampled
  timesteps and gives the target and its weights (min-SNR); the conditioning comes from the cache or
  the method; the family adapter calls the denoiser (SDXL size conditioning included); the loss is
  ``--loss-type``'s (MSE by default; :mod:`.loss`) to the target unless the method computes its own,
  with loss masks (kohya's, or OneTrainer's clamped and normalised ones) and per-sample
  (prior-preservation) weights, then kohya's SNR weights.
- :func:`optimizer_step` runs one optimizer step over an accumulation group of micro-batches:
  each micro-batch loss is divided by the group size, backward runs through the prepared model
  (DDP all-reduces on the last micro-batch only), every process agrees on whether a loss was
  NaN/inf before anything is applied, gradients are clipped, then optimizer and schedule step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .method import Batch, Conditioning, StepContext, TrainingMethod
from .options import TrainOptions

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle
    from .batches import BatchMaker
    from .data import SampleRef
    from .fused import StepInBackward
    from .objectives import TrainingObjective
    from .placement import Placement
    from .token_routing import TokenRouting


class Objective:
    """The loss of one run: the family's training objective, the family adapter's prediction, and
    the method's loss when it has its own."""

    def __init__(self, bundle: ModelBundle, method: TrainingMethod[Any], options: TrainOptions) -> None:
        from ..models.family import family_adapter

        self.bundle = bundle
        self.method = method
        self.options = options
        self.adapter = family_adapter(bundle.family)
        #: ``--tread-route``'s routing on the denoiser (the session sets it): each prediction hands it the batch's
        #: force-keep mask (:data:`sdcore.train.token_routing.KEEP_MASK`)
        self.token_routing: TokenRouting | None = None

    @property
    def training(self) -> TrainingObjective:
        """The family's training objective with the current options (cheap; built per use so an
        option changed after setup, as tests do, is honoured)."""
        from .objectives import objective_for

        return objective_for(self.bundle, self.options)

    def strength_scope(self, batch: Batch) -> contextlib.AbstractContextManager[Any]:
        """The method's per-sample strengths for ``batch`` (kohya's per-dataset ``network_multiplier``)
        in the ``with`` block; nothing when every sample's strength is 1."""
        if batch.network_strength is None:
            return contextlib.nullcontext()
        return self.method.network_strength(batch.network_strength)

    def conditioning_for(self, batch: Batch) -> Conditioning:
        """The batch's conditioning (cached; partly cached and completed by the training encoders; else encoded
        by the method), with the text encoders that its samples drew to drop zeroed (SD3's per-encoder caption
        dropout, :mod:`.encoder_dropout`)."""
        from .encoder_dropout import DROPPED_KEY

        if batch.conditioning is not None:
            cond = batch.conditioning
        elif batch.cached_text is not None:  # T5's outputs cached, CLIP trains (:func:`.cache.partial_text_encoders`)
            cond = self.method.encode_partial(self.bundle, batch.captions, batch.cached_text)
        else:
            cond = self.method.encode(self.bundle, batch.captions)
        dropped = batch.extra.get(DROPPED_KEY)
        if dropped and any(dropped):
            drop = getattr(self.adapter, "drop_text_encoders", None)
            if drop is None:  # the pre-flight refuses the options for such a family
                from ..errors import ConfigError

                raise ConfigError(f"{self.bundle.family}: its text encoders' outputs cannot be dropped per encoder")
            cond = drop(self.bundle, cond, dropped)
        return cond

    def _settings(self, batch: Batch, count: int) -> Any:
        """The run's noise settings, plus a hook for what the family draws per sample after the sample's
        other draws (its adapter's ``sample_draws``: SD3's per-encoder caption dropout and positional-embedding
        crop, recorded in ``batch.extra``). No such draw: the settings as they are, so runs stay unchanged."""
        from dataclasses import replace

        from .noise import NoiseSettings

        settings = NoiseSettings.from_options(self.options)
        sample_draws = getattr(self.adapter, "sample_draws", None)
        hooks = sample_draws(self.bundle, self.options, batch, count) if sample_draws is not None else []
        if not hooks:
            return settings

        def after_draws(index: int, gen: Any) -> None:
            for hook in hooks:
                hook(index, gen)

        return replace(settings, after_draws=after_draws)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, batch: Batch) -> torch.Tensor:
        """The denoiser's output, called the family's way (SDXL adds its size conditioning from ``batch``;
        Flux its training guidance, or none with ``--bypass-guidance-embedding``)."""
        # FLUX.1 Kontext's reference latents, only to the adapter of a batch that has them (pre-flight: Flux)
        reference: dict[str, Any] = {}
        if batch.reference_latents is not None:
            reference["reference_latents"] = batch.reference_latents
        if batch.inpainting_mask is not None:  # an inpainting model's mask and masked image (:mod:`.inpainting`)
            reference["inpainting"] = (batch.inpainting_mask, batch.masked_latents)
        from .objectives import training_guidance

        guidance = training_guidance(self.options, control=self.method.capabilities().control_channels)
        routing: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.token_routing is not None:  # the tokens inside the batch's loss masks are never dropped
            from .token_routing import KEEP_MASK

            routing = self.token_routing.keeping(batch.extra.get(KEEP_MASK))
        with routing:
            return self.adapter.predict(self.bundle, noisy, timesteps, cond, batch=batch, guidance=guidance,
                                        bypass_guidance_embedding=self.options.bypass_guidance_embedding,
                                        **reference)  # fmt: skip

    def sample_loss(
        self,
        batch: Batch,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        step: int,
        input_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample weighted loss ``[B]`` for given noise and timesteps (``input_noise``: the
        perturbed noise the noisy input is made with, input perturbation only)."""
        from .loss import apply_loss_weights, step_loss

        latents = batch.latents.float()
        noise = noise.to(latents.device)
        timesteps = timesteps.to(latents.device)
        objective = self.training
        if input_noise is not None:
            input_noise = input_noise.to(latents.device)
        noised = objective.noised(latents, noise, timesteps, input_noise)
        noisy, timesteps, target = noised.noisy, noised.timesteps, noised.target
        with self.strength_scope(batch):
            cond = self.conditioning_for(batch)

            def predict(conditioning: Conditioning) -> torch.Tensor:
                # as the objective reads the output (kohya's --model_prediction_type on SD3/Flux)
                return objective.model_output(self.predict(noisy, timesteps, conditioning, batch), noisy, timesteps)

            ctx = StepContext(
                bundle=self.bundle,
                batch=batch,
                noisy_latents=noisy,
                noise=noise,
                timesteps=timesteps,
                target=target,
                step=step,
                conditioning=cond,
                predict=predict,
            )
            loss = self.method.compute_loss(ctx)
            if loss is None:
                pred = predict(cond)
                loss = step_loss(self.options, objective, pred.float(), target.float(), timesteps)
                if batch.masks is not None:
                    from .data import weigh_by_mask

                    loss = weigh_by_mask(loss, batch.masks)  # --masked-loss-normalize: in the masks already
                loss = loss.mean(dim=tuple(range(1, loss.ndim)))
        loss = loss.float()
        if noised.weights is not None:
            loss = loss * noised.weights.to(loss.device)
        loss = loss * batch.loss_weights.to(loss.device)
        return apply_loss_weights(self.options, objective, loss, timesteps)  # kohya's order: after min-SNR

    def noise_for(self, refs: list[SampleRef], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded noise and timesteps for the samples ``refs`` (see :mod:`.data`)."""
        noise, timesteps, _ = self.draw_for(refs, batch)
        return noise, timesteps

    def draw_for(self, refs: list[SampleRef], batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`noise_for` plus the perturbed input noise (``--ip-noise-gamma``; else None)."""
        keys = [ref.seed(self.options.seed, "noise") for ref in refs]
        settings = self._settings(batch, len(keys))
        latents = batch.latents if settings.adaptive_noise_scale is not None else None
        return self.training.draw(keys, batch.latents.shape[1:], settings, latents)

    def micro_batch_loss(
        self,
        batch: Batch,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        step: int,
        input_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scalar loss of one micro-batch: the forward of the prepared model."""
        return self.sample_loss(batch, noise, timesteps, step, input_noise).mean()

    def fixed_loss(
        self,
        batches: BatchMaker,
        accelerator: Any,
        *,
        count: int = 4,
        timesteps: tuple[int, ...] = (100, 300, 500, 700, 900),
    ) -> float:
        """Mean loss over the first ``count`` images at fixed noise and timesteps (no flips, no
        caption randomness): the contract's measure of learning."""
        import random

        from .data import SampleRef
        from .noise import sample_noise

        entries = batches.data.entries

        def images() -> Iterator[Batch]:
            for entry in range(min(count, len(entries))):
                batch = batches.make_batch([SampleRef(entry, 0, -1)], with_conditioning=False)
                batch.captions = [self.method.caption_for(entries[entry].caption, is_class=False, rng=random.Random(0))]
                batch.conditioning = None
                yield batch

        def noise(batch: Batch, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            entry = batch.extra["refs"][0].entry
            return sample_noise([entry * 1000 + t], batch.latents.shape[1:])[0], None

        total, n = self.fixed_noise_losses(accelerator, images(), timesteps, noise, step=0)
        return total / max(n, 1)

    def fixed_noise_losses(
        self,
        accelerator: Any,
        batches: Iterable[Batch],
        timesteps: Sequence[int],
        noise: Callable[[Batch, int], tuple[torch.Tensor, torch.Tensor | None]],
        *,
        step: int,
    ) -> tuple[float, int]:
        """(sum, count) of the batch-mean losses of every batch at every timestep in ``timesteps``,
        with the noise ``noise(batch, t)`` gives (and its input-perturbed noise or None), under
        ``no_grad`` and the accelerator's autocast: the fixed-noise measure behind
        :meth:`fixed_loss` and the validation loss."""
        import torch

        total, n = 0.0, 0
        with torch.no_grad(), accelerator.autocast():
            for batch in batches:
                for t in timesteps:
                    sample_noise, input_noise = noise(batch, t)
                    steps = torch.full((batch.latents.shape[0],), int(t), dtype=torch.long)
                    loss = self.sample_loss(batch, sample_noise, steps, step, input_noise)
                    total += float(loss.mean())
                    n += 1
        return total, n

    def validation_loss(
        self,
        batches: BatchMaker,
        accelerator: Any,
        groups: Sequence[Sequence[SampleRef]],
        timesteps: Sequence[int],
        *,
        seed: int,
        step: int,
    ) -> tuple[float, int]:
        """(sum, count) of kohya's validation loss terms over ``groups`` (batches of held-out samples)
        at ``timesteps``: the run's noise options apply (as kohya's ``process_batch``), drawn from a
        generator per (``seed``, image, repeat, timestep), so every validation sees the same noise;
        the timestep drawn with it is replaced by the fixed one."""
        from .noise import NoiseSettings, sample_seed

        settings = NoiseSettings.from_options(self.options)

        def made() -> Iterator[Batch]:
            for refs in groups:
                yield batches.make_batch(list(refs))

        def noise(batch: Batch, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            keys = [sample_seed(seed, "validation", ref.entry, ref.occurrence, t) for ref in batch.extra["refs"]]
            latents = batch.latents if settings.adaptive_noise_scale is not None else None
            drawn, _, perturbed = self.training.draw(keys, batch.latents.shape[1:], self._settings(batch, len(keys)),
                                                     latents)  # fmt: skip
            return drawn, perturbed

        return self.fixed_noise_losses(accelerator, made(), timesteps, noise, step=step)


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step: the loss averaged over micro-batches and processes, or the
    non-finite value (loss or gradient norm) that stopped it."""

    loss: float
    bad_value: float | None = None
    bad_what: str = "loss"
    #: some weights already took this step (``--fused-backward-pass`` steps during backward): the
    #: weights are not the last good ones, so no state is saved from them
    partly_stepped: bool = False
    #: the optimizer applied the step (False when the fp16 grad scaler skipped it for inf/NaN gradients):
    #: what the EMA (:mod:`.ema`) averages after
    stepped: bool = True


def optimizer_step(
    group: list[list[SampleRef]],
    *,
    step: int,
    batches: BatchMaker,
    objective: Objective,
    placement: Placement,
    max_grad_norm: float,
    on_bad: Callable[[StepOutcome], None],
    fused: StepInBackward | None = None,
    before_update: Callable[[], None] | None = None,
    grad_clip_method: str = "norm",
) -> StepOutcome:
    """Accumulate ``group`` (micro-batches of sample refs) into one optimizer step.

    ``on_bad`` is called (every process, gradients cleared) when any process saw a non-finite
    loss, or the gradient norm is non-finite without a grad scaler; it is expected to raise.
    ``fused`` (``--fused-backward-pass``): the tensors step inside backward (:mod:`.fused`).
    ``before_update``: called with the final (clipped, unscaled) gradients right before the optimizer
    step (:meth:`sdcore.train.method.TrainingMethod.before_optimizer_step`; not with ``fused``).
    ``grad_clip_method`` ``value`` clamps each gradient element to ``±max_grad_norm`` (SimpleTuner's
    default) instead of scaling the global norm down; accelerate unscales the fp16 gradients first in
    both (the scaler has already recorded an inf, so it still skips such a step), and the gradients are
    already summed over processes. Clamping would turn an inf into a finite value, so without a scaler a
    non-finite gradient stops the run as a non-finite norm does.
    """
    import torch

    acc, model = placement.accelerator, placement.model
    if fused is not None:
        return _step_in_backward(group, step=step, batches=batches, objective=objective, placement=placement,
                                 fused=fused, on_bad=on_bad)  # fmt: skip
    step_loss, bad = 0.0, None
    for k, refs in enumerate(group):
        batch = batches.make_batch(refs, step=step)
        noise, timesteps, input_noise = objective.draw_for(refs, batch)
        # the strengths stay set through the backward: gradient checkpointing recomputes the forward there
        with objective.strength_scope(batch), placement.no_sync(sync=k == len(group) - 1), acc.autocast():
            loss = model(batch, noise, timesteps, step, input_noise)
            value = float(loss.detach())
            if not math.isfinite(value):
                bad = value  # still run backward: every process must join the gradient all-reduce
            if loss.requires_grad:  # a method's constant (NaN) loss has no graph
                acc.backward(loss / len(group))
        step_loss += value / len(group)
    step_loss, any_bad = _agree(acc, step_loss, bad is not None)
    if any_bad:
        placement.optimizer.zero_grad(set_to_none=True)
        on_bad(StepOutcome(step_loss, bad if bad is not None else float("nan")))
    if max_grad_norm > 0 and grad_clip_method == "value":
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if acc.scaler is None and grads:
            largest = float(torch.stack([g.detach().abs().amax().float() for g in grads]).amax())
            if not math.isfinite(largest):
                placement.optimizer.zero_grad(set_to_none=True)
                on_bad(StepOutcome(step_loss, largest, "largest gradient value"))
        acc.clip_grad_value_(model.parameters(), max_grad_norm)
    elif max_grad_norm > 0:
        norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm)
        if acc.scaler is None and norm is not None and not torch.isfinite(torch.as_tensor(norm)):
            placement.optimizer.zero_grad(set_to_none=True)
            on_bad(StepOutcome(step_loss, float(norm), "gradient norm"))
    elif acc.scaler is not None:
        acc.unscale_gradients()
    if before_update is not None:
        before_update()
    placement.in_optimizer_step = True  # an error inside (out of memory part-way) leaves it set: mixed weights
    placement.optimizer.step()
    placement.in_optimizer_step = False
    skipped = bool(getattr(placement.optimizer, "step_was_skipped", False))  # accelerate's, from the scaler
    placement.scheduler.step()
    placement.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(step_loss, stepped=not skipped)


def _step_in_backward(
    group: list[list[SampleRef]],
    *,
    step: int,
    batches: BatchMaker,
    objective: Objective,
    placement: Placement,
    fused: StepInBackward,
    on_bad: Callable[[StepOutcome], None],
) -> StepOutcome:
    """One optimizer step whose tensors step inside backward (one process: the pre-flight refuses more).
    With several micro-batches (OneTrainer's accumulation) the gradients accumulate as in
    :func:`optimizer_step` and the tensors step in the backward of the last one. A non-finite loss is
    seen before its backward, so nothing steps, as in :func:`optimizer_step`; a non-finite per-tensor
    gradient norm is known only after the last backward."""
    acc, model = placement.accelerator, placement.model
    step_loss, last = 0.0, len(group) - 1
    for k, refs in enumerate(group):
        batch = batches.make_batch(refs, step=step)
        noise, timesteps, input_noise = objective.draw_for(refs, batch)
        with objective.strength_scope(batch), placement.no_sync(sync=k == last), acc.autocast():
            loss = model(batch, noise, timesteps, step, input_noise)
            value = float(loss.detach())
            if not math.isfinite(value):  # before backward: no tensor has stepped
                placement.optimizer.zero_grad(set_to_none=True)
                on_bad(StepOutcome(value, value))
            fused.begin(step, update=k == last)
            if loss.requires_grad:
                acc.backward(loss / len(group))
            fused.end()
        step_loss += value / len(group)
    bad = fused.bad_norm()
    if bad is not None:
        placement.optimizer.zero_grad(set_to_none=True)
        on_bad(StepOutcome(step_loss, bad, "gradient norm", partly_stepped=True))
    placement.scheduler.step()  # after every tensor stepped at this step's rate (kohya's order)
    return StepOutcome(step_loss)


def _agree(acc: Any, loss: float, bad: bool) -> tuple[float, bool]:
    """Mean loss over processes and whether any process saw a non-finite loss."""
    if acc.num_processes <= 1:
        return loss, bad
    import torch

    stats = torch.tensor([0.0 if bad else loss, 1.0 if bad else 0.0], device=acc.device)
    stats = acc.reduce(stats, reduction="sum")
    return float(stats[0]) / acc.num_processes, bool(stats[1] > 0)
