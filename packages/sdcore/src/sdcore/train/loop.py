"""The training loop every method trains through: it composes the runtime's parts.

``train(method)`` trains with ``method.options`` (the one source of truth). The parts, each in its
own module and tested alone:

==================  ===========================================================================
``preflight``       every check before anything loads (options, model header, folders, dataset,
                    resume shapes, disk) and the memory plan (``memory``)
``data``/``cache``  dataset index, buckets, epoch plans, per-sample seeds; latent/text caches
``batches``         sample references -> batches (caches, prefetching, loss masks)
``placement``       the accelerator, devices/dtypes, gradient checkpointing, ``accelerator.prepare``
``step``            noise, timesteps, prediction, loss terms, one optimizer step
``checkpoints``     result paths, results, resumable states, resume, retention
``sampling``        sample images during training
``progress``        messages, the step bar, trackers
``events``          the read-only context lifecycle hooks receive
==================  ===========================================================================

Decisions worth knowing:

- Length: ``--max-steps`` and ``--epochs`` may both be given (training stops at whichever comes
  first); with neither, one epoch is trained.
- Gradient accumulation: an optimizer step consumes ``gradient_accumulation`` micro-batches (the
  last step of an epoch may consume fewer) and each micro-batch loss is divided by the number of
  micro-batches in its step, so batch 2 x 1 and batch 1 x 2 give the same update.
- Multi-process (``accelerate launch``): each process takes every N-th micro-batch of the epoch
  plan; what trains goes through ``accelerator.prepare`` (DDP averages the gradients during the
  backward of the last micro-batch of each step; see :mod:`.placement`).
- ``--ema`` (:mod:`.ema`): after each optimizer step that stepped, the average of the trained
  tensors moves; results, samples and the validation loss use it, the raw weights keep training.
- A text-encoder stop (:mod:`.te_stop`) is checked before each optimizer step from the position
  alone, so a resumed run freezes where the uninterrupted one did; the method freezes its own parameters.
- Noise, timesteps, flips and caption variants are seeded per sample (see :mod:`.data`), so
  resuming, batching and the process count never change what a sample sees.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, SdcoreError, debug_enabled
from ..options import keep_records
from .checkpoints import intermediate_path, output_paths
from .data import steps_text, total_steps_for
from .events import HookCaller, TrainEventContext
from .memory_watch import MemoryWatch, TrainingOutOfMemoryError, is_out_of_memory, release_failed_step
from .method import Batch, ProcessInfo, RunFacts, TrainingMethod
from .options import TrainOptions, apply_model_defaults
from .preflight import validate_options
from .save_fallback import (
    SaveTargetError,
    guard,
    guarded,
    mixed_message,
    mixed_step,
    reason,
    rescue,
    save_alone,
)

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle
    from .data import SampleRef
    from .ema import WeightEMA
    from .fused import StepInBackward
    from .preflight import PreflightReport
    from .state import TrainPosition
    from .step import StepOutcome
    from .te_stop import TextEncoderStop
    from .token_routing import TokenRouting

log = logging.getLogger("sdcore.train")

__all__ = [
    "StopFlag",
    "TrainResult",
    "TrainSession",
    "TrainingDivergedError",
    "TrainingStopped",
    "intermediate_path",
    "output_paths",
    "total_steps_for",
    "train",
    "validate_options",
]


class TrainingDivergedError(SdcoreError):
    """The loss became NaN or infinite; the last good state was kept."""


class StopFlag(Protocol):
    """What ``train(..., stop=...)`` polls: a :class:`threading.Event` (or anything with ``is_set()``)."""

    def is_set(self) -> bool: ...


#: why nothing more is saved after a Ctrl-C: another one came while saving (the user wants to quit now)
AGAIN = "interrupted again"


class TrainingStopped(SdcoreError):
    """The run was stopped through ``train(..., stop=flag)``: an application's cancel button, set from
    another thread. As on Ctrl-C, the weights trained so far are kept in a resumable state.

    ``step`` is the number of optimizer steps done; ``state`` the state folder written (``None`` when no
    step had finished or ``save_state`` is off); the same options with ``resume=str(state)`` (or
    ``"latest"``) continue the run. ``weights`` is the file of the weights after that step, written where
    ``save_every`` puts a step's result (``NAME-stepNNNNNNNN``), ready to load; ``None`` when no step had
    finished or writing it failed.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"training stopped on request after {step} steps")
        self.step = step
        self.state: Path | None = None
        self.weights: Path | None = None


@dataclass
class TrainResult:
    output: Path
    steps: int
    epochs: int
    losses: list[float] = field(default_factory=list)
    state_dir: Path = Path()
    last_state: Path | None = None
    #: False on the other processes of a multi-process run (only the main one prints and saves)
    main_process: bool = True
    #: ``(step, "step" | "epoch", loss)`` of every validation (``--validation-split``)
    validation_losses: list[tuple[int, str, float]] = field(default_factory=list)


def load_bundle(options: TrainOptions, plugin_manager: Any = None) -> ModelBundle:
    """Load ``options.model`` (any source ``load_model`` reads; ``tiny:<family>`` for tests and demos)
    with the parts given separately (``--clip-l``, ``--t5xxl``, ``--vae``...: what the file lacks) and
    ``--prediction-type`` (auto: what the model declares)."""
    from ..models.load import load_model, override_prediction_type
    from ..models.parts import given_parts

    pm = plugin_manager if hasattr(plugin_manager, "registrations") else None
    chosen = None if options.prediction_type == "auto" else options.prediction_type
    bundle = load_model(options.model, pm=pm, prediction_type=chosen, **given_parts(options))
    # a format plugin or a flow family's reader may not take the choice: the bundle says it either way
    return override_prediction_type(bundle, chosen)


#: the phase (:meth:`TrainSession._during`) of the work after a step's update: ``on_step_end``, the EMA update
_FINISHING = "finishing"


class TrainSession:
    """One training run. ``train()`` is ``TrainSession(method).run()``; tests and the contract
    suite use the pieces (``setup``, ``make_batch``, ``fixed_loss``) directly."""

    def __init__(
        self,
        method: TrainingMethod[Any],
        *,
        bundle: ModelBundle | None = None,
        plugin_manager: Any = None,
        stop: StopFlag | None = None,
    ) -> None:
        self.method = method
        self.stop = stop
        self.options: TrainOptions = method.options
        self.bundle: Any = bundle  # None until setup() loads it, then always a ModelBundle
        self.hook = HookCaller(plugin_manager)
        self.plugin_manager = plugin_manager
        self.losses: list[float] = []
        self.validation_losses: list[tuple[int, str, float]] = []
        self.validation_groups: list[list[SampleRef]] = []
        self.validation_timesteps: tuple[int, ...] = ()
        self._setup_done = False
        self._restore_attention: Callable[[], None] = lambda: None
        self.fused: StepInBackward | None = None
        self.token_routing: TokenRouting | None = None  # --tread-route (sdcore.train.token_routing)
        self.ema: WeightEMA | None = None  # --ema: the average of self.params (sdcore.train.ema)
        self.te_stop: TextEncoderStop | None = None  # until the text encoder stops (sdcore.train.te_stop)
        self.preflight: PreflightReport | None = None
        self.memory_watch: MemoryWatch | None = None  # device memory peaks (sdcore.train.memory_watch)
        self._phase: str | None = None  # what runs between steps ("sampling"), for an out-of-memory message

    # -- setup: every part, in order -----------------------------------------------------------
    def setup(self) -> None:
        """Validate, load, prepare, build data, caches, optimizer; restore a state when resuming. A failure
        puts torch's attention setting back (process-wide: a caller that catches the error goes on with it)."""
        try:
            self._setup()
        except BaseException:
            self._restore_attention()
            self._restore_attention = lambda: None
            raise

    def _setup(self) -> None:
        import torch

        from .attention import restrict_attention_kernels
        from .batches import BatchMaker
        from .cache import build_caches
        from .checkpoints import Checkpoints
        from .memory_options import MemorySetup
        from .optim import OptimizerModes, create_optimizer, scheduler_for
        from .placement import (
            Placement,
            TrainedModules,
            allow_fp16_gradients,
            create_accelerator,
            enable_gradient_checkpointing,
            full_precision_dtype,
            place_model,
        )
        from .preflight import preflight_for_run
        from .progress import Progress, tracker_backend
        from .state import TrainPosition
        from .step import Objective

        o, method = self.options, self.method
        if self.bundle is None:  # --model NAME (and --vae NAME ...) with --models-dir: their files, before any read
            from .preflight import resolve_model_names

            resolve_model_names(o, self.plugin_manager, say=self.say)
        # --resolution 0: the model's native size, peeked from its header; where only loading tells,
        # the pre-flight plans with 512 and the size is set once the model is loaded
        native_known = apply_model_defaults(o, self.bundle)
        planned = o if native_known else keep_records(o, replace(o, resolution=512))
        # every check before any model loads, all problems at once; prints the disk and memory plans
        self.preflight = preflight_for_run(
            method, planned, bundle=self.bundle, plugin_manager=self.plugin_manager, say=self.say
        )
        if not native_known:
            self.bundle = load_bundle(o, self.plugin_manager)
            apply_model_defaults(o, self.bundle)
        elif self.bundle is not None:  # a bundle given by the caller: --prediction-type as a loaded one gets it
            from ..models.load import override_prediction_type

            override_prediction_type(self.bundle, o.prediction_type)
        self.caps = method.capabilities()
        backend = tracker_backend(o)
        self.accelerator = acc = create_accelerator(o, log_with=backend)
        self.device = acc.device
        plan = self.preflight.memory
        self.memory_watch = MemoryWatch(
            self.device,
            estimate=plan.estimate.total if plan is not None else None,
            say=self.say,
            relief=self._memory_relief,
        )
        self._restore_attention = restrict_attention_kernels(self.device, allow_cudnn=o.cudnn_attention)
        self.progress = Progress(o, acc, name=method.name)
        self.checkpoints = Checkpoints(method, o, acc, say=self.progress.say)

        self._build_data()
        if self.bundle is None:
            self.bundle = load_bundle(o, self.plugin_manager)
        bundle = self.bundle

        torch.manual_seed(o.seed)  # method weight init is seeded
        method.processes = ProcessInfo(num_processes=acc.num_processes, process_index=acc.process_index)
        groups = method.prepare(bundle)
        class_data = method.regularization_data()
        if class_data is not None and not o.reg_data:
            self._build_data(class_data)  # the method's class images (DreamBooth generates them in prepare)
        params = [p for g in groups for p in g["params"]]
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ConfigError(f"method {method.name!r} returned no trainable parameters")
        memory = MemorySetup.before_placement(bundle, o)  # --base-weights-dtype on the CPU, blocks to leave there
        place_model(
            bundle,
            self.params,
            self.caps,
            self.device,
            o.mixed_precision,
            stay_on_cpu=memory.swapped,
            trainable_dtype=full_precision_dtype(o),
        )
        from .token_routing import install_token_routing

        # --tread-route: installed before the block swap, which then wraps (and recomputes) the routed blocks
        self.token_routing = install_token_routing(bundle, o)
        memory.after_placement(bundle, self.device)  # --blocks-to-swap
        self._install_pos_embed(bundle)  # kohya's SD3 --enable_scaled_pos_embed / --pos_emb_random_crop_rate
        if o.cpu_offload_checkpointing:  # checkpointing with the block inputs in host memory
            from .offload_checkpointing import enable_offload_checkpointing

            enable_offload_checkpointing(bundle, self.device)
            enable_gradient_checkpointing(bundle, self.caps, denoiser=False)
        elif o.gradient_checkpointing:
            enable_gradient_checkpointing(bundle, self.caps)
        from .cache import partial_text_encoders

        self.latent_cache, self.text_cache = build_caches(
            bundle,
            method,
            o,
            self.data,
            acc,
            trains_text_encoder=self.caps.trains_text_encoder or not self.caps.cacheable_text,
            needs_pixels=self.caps.needs_pixels,
            progress=self.progress,
            partial=partial_text_encoders(o, self.caps, bundle.family, method),  # T5 cached while CLIP trains
        )
        self.batches = BatchMaker(
            self.data,
            method,
            self.caps,
            o,
            bundle,
            self.device,
            latent_cache=self.latent_cache,
            text_cache=self.text_cache,
            total_steps=self.total_steps,
        )
        self.objective = Objective(bundle, method, o)
        self.objective.token_routing = self.token_routing  # --tread-route: hands it each batch's loss masks
        self._plan_validation()

        optimizer = create_optimizer(o.optimizer, groups, lr=o.lr, args=o.optimizer_args, say=self.say)
        lr_lambda = method.lr_lambda()
        if lr_lambda is not None:  # the method's own schedule (TI's A1111 "rate:step" schedule)
            scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        else:
            scheduler = scheduler_for(o, optimizer, total_steps=self.total_steps)
        self.placement = Placement(acc)
        if o.full_fp16:
            allow_fp16_gradients(acc)
        self.placement.prepare(
            TrainedModules(bundle, self.params, self.objective.micro_batch_loss),
            optimizer,
            scheduler,
            place=not memory.swap_trained,  # placed above; accelerate would move the swapped trained weights
        )

        if o.ema:  # the average starts at the weights training starts from (or the resumed state's)
            from .ema import WeightEMA, sharded_engine

            engine = sharded_engine(acc.distributed_type)
            if engine:  # the pre-flight refuses it from the launcher's environment; a launcher may not set it
                raise ConfigError(f"--ema does not work with {engine} (each process holds a shard of the weights)")
            self.ema = WeightEMA.from_options(o, self.params)
        self.position = TrainPosition()
        if o.resume:
            self.position, self.losses = self.checkpoints.restore(
                o.resume,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                device=self.device,
                ema=self.ema,
                prediction_type=self.bundle.prediction_type,
            )
        self._apply_start(resumed=self.position if o.resume else None)
        from .te_stop import TextEncoderStop

        self.te_stop = TextEncoderStop.from_options(o)  # --stop-text-encoder-at/-after-epochs (.te_stop)
        # schedule-free optimizers: train mode while stepping, eval mode (the weights to keep) around
        # samples, saves and evaluations; a state saved in eval mode resumes through train()
        self.optimizer_modes = OptimizerModes(self.optimizer)
        self.optimizer_modes.train()
        from .fused import install, parameter_blocks, steps_in_backward

        if steps_in_backward(o):  # --fused-backward-pass and its group variants: steps in gradient hooks
            if acc.num_processes > 1:  # the pre-flight refuses it from WORLD_SIZE; a launcher may not set it
                raise ConfigError("stepping in backward does not work in a multi-process run")
            self.fused = install(self.optimizer, self.params, o, self.say, parameter_blocks(bundle))
        memory.install_stepper(self.fused)  # --blocks-to-swap on a full fine-tune: swapped weights step in backward
        if memory.swap_trained:
            self.say(
                f"block swap: the last {len(memory.swapped)} blocks' trained weights stay in host memory and step "
                "in backward on a device copy"
            )
        self.progress.start_trackers(backend)
        self._setup_done = True

    def _build_data(self, class_data: Path | None = None) -> None:
        """Index the dataset (plus the method's class images), shard it, count the steps."""
        from .data import build_train_data

        acc, options = self.accelerator, self.options
        if class_data is not None:
            options = replace(options, reg_data=str(class_data))
        self.data = build_train_data(
            options,
            balance_class=self.caps.balance_class,
            rank=acc.process_index,
            world_size=acc.num_processes,
            auxiliary=self.method.is_auxiliary_file,
        )
        self.total_steps, self.max_epochs = total_steps_for(options, self.data)
        if self.total_steps < 1:
            raise ConfigError("nothing to train: the run has 0 steps (check --max-steps/--epochs and the dataset)")
        from .checkpoints import epoch_save_interval

        per_epoch = self.data.steps_in_epoch(0, options.gradient_accumulation)
        self.save_every_epochs = epoch_save_interval(options, self.total_steps, per_epoch)
        if class_data is None:
            from .kontext_data import control_summary

            self.progress.plan(
                "\n".join(
                    [self.data.index.summary(), *control_summary(self.data.index, channels=self.caps.control_channels)]
                ),
                per_epoch=len(self.data.epoch_plan(0)),
                batch=self.data.batch_sizes_text,
                total_steps=self.total_steps,
                max_epochs=self.max_epochs,
                steps=steps_text(self.data, self.total_steps, self.max_epochs, options.gradient_accumulation),
            )

    def _apply_start(self, *, resumed: TrainPosition | None) -> None:
        """kohya's ``--initial-step``/``--initial-epoch``/``--skip-until-initial-step`` (:mod:`.initial`):
        move the position (and, when the counter restarts, bound the epochs as kohya does); the
        optimizer and the LR schedule stay as they are (fresh, or restored by ``--resume``)."""
        from .initial import start_point

        start = start_point(
            self.options, self.data, total_steps=self.total_steps, max_epochs=self.max_epochs, resumed=resumed
        )
        if start is None:
            return
        self.position = start.position
        self.max_epochs = start.max_epochs
        self.losses = self.losses[: start.position.step]  # the history up to the start (none when fresh)
        self.say(start.message)

    def _plan_validation(self) -> None:
        """The held-out batches and kohya's fixed timesteps (nothing without a validation split)."""
        from .validation import validation_batches, validation_timesteps

        o, data = self.options, self.data
        self.validation_groups = validation_batches(
            data.index, data.held_out, data.assignments, o.batch_size, o.max_validation_steps, data.sampler.group_of
        )
        training = self.objective.training
        steps = int(getattr(training, "num_timesteps", 1000))  # DDPM: the schedule's; flow matching: 1000
        self.validation_timesteps = validation_timesteps(steps, o.min_timestep, o.max_timestep)
        if data.held_out:
            images = [data.entries[i] for i in sorted(data.held_out)]
            self.progress.say(
                f"validation: {len(images)} images ({sum(e.repeats for e in images)} with repeats) held out, "
                f"{len(self.validation_groups)} batches x timesteps {', '.join(map(str, self.validation_timesteps))}"
            )

    def validate(self, kind: str = "step") -> float | None:
        """kohya's validation loss now (:mod:`.validation`): reported to the bar, the log and the
        trackers; ``None`` when nothing is held out. Changes no weight and no training draw."""
        from .validation import evaluation_mode

        if not self.validation_groups:
            return None
        o, acc = self.options, self.accelerator
        mine = self.validation_groups[acc.process_index :: acc.num_processes]
        seed = o.seed if o.validation_seed is None else o.validation_seed
        with self._during("validating"), self.result_weights(), evaluation_mode(self.bundle, self.method):
            total, count = self.objective.validation_loss(
                self.batches, acc, mine, self.validation_timesteps, seed=seed, step=self.position.step
            )
        if acc.num_processes > 1:
            import torch

            sums = acc.reduce(torch.tensor([total, float(count)], device=acc.device), reduction="sum")
            total, count = float(sums[0]), int(sums[1])
        loss = total / max(count, 1)
        self.validation_losses.append((self.position.step, kind, loss))
        self.progress.validation(self.position.step, kind, loss)
        return loss

    # -- views on the parts (for tests, the contract suite and methods' tools) -----------------
    @property
    def output(self) -> Path:
        return self.checkpoints.output

    @property
    def state_root(self) -> Path:
        return self.checkpoints.state_root

    @property
    def optimizer(self) -> Any:
        return self.placement.optimizer

    @property
    def scheduler(self) -> Any:
        return self.placement.scheduler

    @property
    def is_main(self) -> bool:
        acc = getattr(self, "accelerator", None)
        return True if acc is None else bool(acc.is_main_process)

    def say(self, message: str) -> None:
        progress = getattr(self, "progress", None)
        if progress is not None:
            progress.say(message)
        else:  # before the accelerator starts (the pre-flight's plans)
            log.debug(message)
            print(message, file=sys.stderr)

    def make_batch(self, refs: list[SampleRef], *, with_conditioning: bool = True, step: int = 0) -> Batch:
        return self.batches.make_batch(refs, with_conditioning=with_conditioning, step=step)

    def sample_loss(
        self,
        batch: Batch,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        step: int,
        input_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.objective.sample_loss(batch, noise, timesteps, step, input_noise)

    def fixed_loss(self, *, count: int = 4, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)) -> float:
        with self.evaluating():
            return self.objective.fixed_loss(self.batches, self.accelerator, count=count, timesteps=timesteps)

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        """Eval mode of a schedule-free optimizer (its evaluation weights) for the ``with`` block."""
        modes = getattr(self, "optimizer_modes", None)
        return contextlib.nullcontext() if modes is None else modes.evaluating()

    def ema_applied(self) -> contextlib.AbstractContextManager[None]:
        """The ``--ema`` average in place of the raw weights for the ``with`` block (nothing without ``--ema``)."""
        from .ema import applied

        return applied(self.ema)

    @contextlib.contextmanager
    def _during(self, phase: str) -> Iterator[None]:
        """Names what runs between steps (``"sampling"``) for the out-of-memory message: an allocator running
        out there did so after the last finished step, not in the next one. An error leaves the name set
        (the message is made after the block is left); each step clears it."""
        before, self._phase = self._phase, phase
        yield
        self._phase = before

    @contextlib.contextmanager
    def result_weights(self) -> Iterator[None]:
        """The weights a result holds, for saves, samples and validation: a schedule-free optimizer's
        evaluation weights, then the ``--ema`` average in their place; the raw ones back after."""
        with self.evaluating(), self.ema_applied():
            yield

    def run_facts(self) -> RunFacts:
        per_epoch = self.data.steps_in_epoch(0, self.options.gradient_accumulation)
        # kohya's num_train_epochs: ceil(max_train_steps / update steps per epoch); --epochs bounds it
        epochs = math.ceil(self.total_steps / per_epoch) if per_epoch else 0
        if self.max_epochs is not None:
            epochs = min(epochs, self.max_epochs) if epochs else self.max_epochs
        return RunFacts(
            total_steps=self.total_steps,
            started_at=self.checkpoints.started_at,
            entries=tuple(self.data.trained_entries),
            family=self.bundle.family,
            validation_images=sum(entry.repeats for entry in self.data.held_out_entries),
            batches_per_epoch=len(self.data.epoch_plan(0)),
            epochs=epochs,
        )

    def context(self) -> TrainEventContext:
        """A fresh read-only snapshot of the run for lifecycle hooks."""
        from .checkpoints import samples_dir

        acc = self.accelerator
        return TrainEventContext(
            method_name=self.method.name,
            options=replace(self.options),
            output=self.output,
            state_dir=self.state_root,
            total_steps=self.total_steps,
            step=self.position.step,
            epoch=self.position.epoch,
            family=self.bundle.family,
            samples_dir=samples_dir(self.state_root),
            process_index=acc.process_index,
            num_processes=acc.num_processes,
        )

    def _install_pos_embed(self, bundle: Any) -> None:
        """kohya's SD3 positional-embedding options on the MMDiT for this run (:mod:`sdcore.models.sd3.pos_embed`):
        the scaled tables are made for the datasets' resolutions (kohya: ``round(sqrt(w * h)) // 8``)."""
        o = self.options
        if not (o.enable_scaled_pos_embed or o.pos_emb_random_crop_rate > 0) or bundle.family != "sd3":
            return
        from ..data.buckets import resolution_area
        from ..models.sd3.pos_embed import install

        downscale = bundle.family_spec.latent.downscale

        def latent_side(subset: Any) -> int:  # kohya's round(sqrt(w * h)): a W,H pair's, not its floored side's
            area = resolution_area(subset.bucket_resolution) if subset.resolution else o.resolution**2
            return round(math.sqrt(area)) // downscale

        sizes = sorted({latent_side(entry.subset) for entry in self.data.entries})
        install(bundle.transformer, latent_sizes=sizes if o.enable_scaled_pos_embed else None)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if not self._setup_done:
            try:
                self.setup()
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise self._out_of_memory(exc) from (exc if debug_enabled() else None)
                raise
        self.checkpoints.started_at = time.time()
        restore_sigterm = _sigterm_as_interrupt()
        try:
            self.hook("sdcore_before_train", context=self.context())
            self._loop()
            result = self._finish()
        except KeyboardInterrupt as exc:
            self._save_on_error(exc, "interrupted")
            raise
        except TrainingStopped as exc:  # the caller asked for it: no message, the state saved as on Ctrl-C
            self._save_on_error(exc, "stopped", quiet=True)
            exc.state = getattr(exc, "sdcore_state", None)
            exc.weights = getattr(exc, "sdcore_weights", None)
            raise
        except TrainingDivergedError as exc:
            self._error_hook(exc)
            raise
        except SaveTargetError as exc:  # a save failed (permissions, disk full): rescue the result, one line
            self._error_hook(exc)
            raise rescue(self, exc) from exc
        except Exception as exc:
            if is_out_of_memory(exc):  # one line with the peak and what to change, the state saved first
                raise self._out_of_memory(exc) from (exc if debug_enabled() else None)
            self._save_on_error(exc, "error")
            raise
        finally:
            restore_sigterm()
            self._restore_attention()
            if self.bundle is not None and self.bundle.family == "sd3":
                from ..models.sd3.pos_embed import uninstall

                uninstall(self.bundle.transformer)  # the model's own positional embedding again
            if self.fused is not None:
                self.fused.remove()
            if self.token_routing is not None:  # off, not removed: a block swap installed later wraps it
                self.token_routing.enabled = False
            self.progress.end_trackers()
        self.hook("sdcore_after_train", context=self.context(), result=result)
        return result

    def _loop(self) -> None:
        from .step import optimizer_step

        o, pos, accum = self.options, self.position, self.options.gradient_accumulation
        if o.save_n_epoch_ratio:
            self.say(f"save_n_epoch_ratio {o.save_n_epoch_ratio}: saving every {self.save_every_epochs} epoch(s)")
        if o.sample_at_first:  # kohya's --sample_at_first: the model as it starts, before any update
            self.render_samples(f"step{pos.step:08d}", epoch=pos.epoch if pos.batch == 0 else None)
        self.progress.open_bar(total=self.total_steps, initial=pos.step)
        self.batches.start_prefetching()
        try:
            while pos.step < self.total_steps and (self.max_epochs is None or pos.epoch < self.max_epochs):
                if self._stop_requested():  # between optimizer steps: nothing half-done
                    raise TrainingStopped(pos.step)
                plan = self.data.epoch_plan(pos.epoch)
                if pos.batch >= len(plan):
                    if not plan:
                        raise ConfigError("an epoch has no batches (dataset empty for this process)")
                    self._end_epoch()
                    continue
                if self.te_stop is not None and self.te_stop.due(pos):  # also a resume past the stop point
                    self._stop_text_encoder()
                group = plan[pos.batch : pos.batch + accum]
                self._phase = None
                self.batches.prefetch(plan[pos.batch + len(group) : pos.batch + len(group) + accum])
                if self.token_routing is not None:  # --tread-route: the step's draws from (seed, step): resumable
                    self.token_routing.new_step(o.seed, pos.step, self.accelerator.process_index)
                outcome = optimizer_step(
                    group,
                    step=pos.step,
                    batches=self.batches,
                    objective=self.objective,
                    placement=self.placement,
                    max_grad_norm=o.max_grad_norm,
                    grad_clip_method=o.grad_clip_method,
                    on_bad=self._diverged,
                    fused=self.fused,
                    before_update=functools.partial(self.method.before_optimizer_step, self.bundle, pos.step + 1),
                )
                pos.step += 1
                pos.batch += len(group)
                self.losses.append(outcome.loss)
                with self._during(_FINISHING):  # an error here ends step pos.step, not one that never started
                    method_logs = self.method.on_step_end(self.bundle, pos.step)
                    if self.ema is not None and outcome.stepped:  # the weights as the step (and method) left them
                        self.ema.update(pos.step)
                lr = float(self.scheduler.get_last_lr()[0])
                logs = self.progress.step(pos.step, pos.epoch, outcome.loss, lr, extra=method_logs)
                if self.memory_watch is not None:
                    self.memory_watch.after_step(pos.step)
                if o.validate_every_n_steps and pos.step % o.validate_every_n_steps == 0:
                    self.validate("step")
                if pos.batch >= len(plan):
                    self._end_epoch()
                if o.save_every and pos.step % o.save_every == 0 and pos.step < self.total_steps:
                    self.save_checkpoint(step=pos.step)
                if o.sample_every and pos.step % o.sample_every == 0:
                    self.render_samples(f"step{pos.step:08d}")
                if self.validation_losses and self.validation_losses[-1][0] == pos.step:
                    logs["val_loss"] = self.validation_losses[-1][2]  # this step's (or its epoch's) validation
                # last, so an interrupt raised by a hook never skips this step's saves
                if self.plugin_manager is not None:
                    self.hook("sdcore_on_train_step", context=self.context(), step=pos.step, logs=logs)
        finally:
            self.progress.close_bar()
            self.batches.stop_prefetching()

    def _stop_requested(self) -> bool:
        """Whether ``stop`` is set, in any process: a multi-process run shares the flag (one small all-reduce
        per step, every process holding a flag as the same script gives each) so they all stop before the same
        step and save the state together; one process stopping alone would leave the others waiting in the next
        step's gradient all-reduce for a peer that has gone."""
        if self.stop is None:
            return False
        requested = bool(self.stop.is_set())
        acc = self.accelerator
        if acc.num_processes > 1:
            import torch

            flag = torch.tensor([1.0 if requested else 0.0], device=acc.device)
            requested = bool(acc.reduce(flag, reduction="sum").item() > 0)
        return requested

    def _stop_text_encoder(self) -> None:
        """The text-encoder stop is due (:mod:`.te_stop`): the method freezes its text-encoder parameters,
        once; the optimizer, the LR schedule and everything else go on as they were."""
        stop, pos = self.te_stop, self.position
        self.te_stop = None
        self.method.stop_text_encoder(self.bundle)
        if stop is not None:
            self.say(f"{stop.flag()}: text encoder frozen from step {pos.step + 1} (epoch {pos.epoch + 1}) on")

    def _end_epoch(self) -> None:
        from .validation import should_validate_epoch

        pos, o = self.position, self.options
        pos.epoch += 1
        pos.batch = 0
        last = pos.step >= self.total_steps or (self.max_epochs is not None and pos.epoch >= self.max_epochs)
        if self.validation_groups and should_validate_epoch(o, pos.epoch):
            self.validate("epoch")
        if self.save_every_epochs and pos.epoch % self.save_every_epochs == 0 and not last:
            self.save_checkpoint(epoch=pos.epoch)
        if o.sample_every_epochs and pos.epoch % o.sample_every_epochs == 0 and not last:
            self.render_samples(f"epoch{pos.epoch:06d}", epoch=pos.epoch)

    def _finish(self) -> TrainResult:
        from .validation import should_validate_epoch

        o = self.options
        # kohya validates the epoch --max-steps ended in too
        if self.position.batch > 0 and self.validation_groups and should_validate_epoch(o, self.position.epoch + 1):
            self.validate("epoch")
        with self.evaluating():  # kohya: a schedule-free optimizer ends in eval mode, the weights saved
            if o.sample_prompts and not (o.sample_every and self.position.step % o.sample_every == 0):
                # named by its epoch where the run samples by epochs, as kohya's last: its step loop only breaks
                # at max_train_steps and the epoch's end renders with the epoch it stopped in (train_network.py
                # :1605, :1707), so a run ending inside an epoch names that epoch (one more than those ended)
                pos = self.position
                by_epochs = bool(o.sample_every_epochs) and not o.sample_every
                epoch = pos.epoch + (1 if pos.batch > 0 else 0)
                self.render_samples("final", epoch=epoch if by_epochs else None)
            if o.save_state:
                self.save_state()
            with self.ema_applied(), self._during("saving"):  # --ema: the average is the result
                output = self.checkpoints.save_result(self.bundle, self.position, self.run_facts())
        log.info(f"saved {output}")  # the caller reports it (the CLI prints one "saved" line)
        peak = self.memory_watch.summary() if self.memory_watch is not None else None
        if peak is not None:
            self.say(peak)
        self.accelerator.wait_for_everyone()
        return TrainResult(
            main_process=self.is_main,
            output=output,
            steps=self.position.step,
            epochs=self.position.epoch,
            losses=list(self.losses),
            state_dir=self.state_root,
            last_state=self.checkpoints.last_state,
            validation_losses=list(self.validation_losses),
        )

    # -- checkpoints and samples ------------------------------------------------------------------
    @guarded
    def save_checkpoint(self, *, step: int | None = None, epoch: int | None = None) -> None:
        """An intermediate result plus (when enabled) a resumable state, with retention."""
        with self._during("saving"), self.evaluating():
            with self.ema_applied():  # --ema: the average is the result; the state keeps both apart
                self.checkpoints.save_intermediate(self.bundle, self.position, self.run_facts(), step=step, epoch=epoch)
            if self.options.save_state:
                self.save_state()

    def save_state(self) -> Path:
        # the trainable tensors and the optimizer state in the same mode
        with self._during("saving"), self.evaluating():
            return self.checkpoints.save_state(
                self.position,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                losses=self.losses,
                total_steps=self.total_steps,
                ema=self.ema,
                prediction_type=self.bundle.prediction_type,
            )

    def render_samples(self, tag: str, *, epoch: int | None = None) -> Path | None:
        """Render the sample prompts into ``<output stem>-samples/<tag>.png`` and, one PNG each, into kohya's
        ``sample/`` beside the result (main process); ``epoch``: kohya's, for the images' names
        (:func:`.sampling.kohya_sample_name`)."""
        from .checkpoints import samples_dir
        from .sampling import KOHYA_SAMPLE_FOLDER, render_samples

        with self._during("sampling"), self.result_weights():  # every process switches: the weights stay equal
            if not self.is_main:
                return None
            return render_samples(
                self.bundle,
                self.method,
                self.options,
                device=self.device,
                folder=samples_dir(self.state_root),
                tag=tag,
                step=self.position.step,
                say=self.say,
                conditioning=self.text_cache.sample_conditioning if self.text_cache is not None else None,
                parts=self.text_cache.sample_parts if self.text_cache is not None else None,
                epoch=epoch,
                images_folder=self.state_root.parent / KOHYA_SAMPLE_FOLDER,
                output_name=self.state_root.name[: -len("-state")],
            )

    # -- errors -----------------------------------------------------------------------------------
    def _diverged(self, outcome: StepOutcome) -> None:
        folder = None
        if self.position.step > 0 and not outcome.partly_stepped:
            with contextlib.suppress(Exception):
                folder = self.save_state()
        where = f"; the last good state (step {self.position.step}) is in {folder}" if folder else ""
        if outcome.partly_stepped:
            where = (
                "; some weights had already taken this step inside backward, so no state "
                "was saved from them: resume from the last saved state"
            )
        raise TrainingDivergedError(
            f"{outcome.bad_what} became {outcome.bad_value} at step {self.position.step + 1}{where}. Lower --lr, "
            "use --mixed-precision bf16 instead of fp16, or check the data"
        )

    def _memory_relief(self) -> list[str]:
        """The option changes that lower this run's memory need most (advice for a full or overflowing device)."""
        from .preflight import memory_relief

        report = self.preflight
        if report is None or report.layout is None or report.memory is None:
            return []
        return memory_relief(self.method, self.options, report.layout, report.memory.params, device=self.device.type)

    def _out_of_memory(self, exc: BaseException) -> TrainingOutOfMemoryError:
        """The one-line error for an allocator that ran out; the resumable state is saved first (after the
        failed step's tensors are let go, unless ``SDCORE_DEBUG`` keeps its traceback)."""
        from .memory_watch import out_of_memory_error

        if not debug_enabled():
            release_failed_step(exc)
        if not self._setup_done:
            where = "while loading the model and setting up"
        elif self._phase == _FINISHING:  # the method's step end or the --ema update of the step just taken
            where = f"while finishing step {self.position.step}"
        elif self._phase is not None:  # between steps: after the last finished one
            where = f"while {self._phase} " + (
                f"after step {self.position.step}" if self.position.step else "before the first step"
            )
        elif self.position.step < self.total_steps:
            where = f"in step {self.position.step + 1}"
        else:
            where = f"after the last step ({self.position.step}), while sampling or saving"
        if self._setup_done:
            self._save_on_error(exc, "out of memory", quiet=True)
        state = getattr(exc, "sdcore_state", None)
        if self.memory_watch is None:
            return out_of_memory_error(where=where, reading=None, estimate=None, changes=[], state=state)
        return self.memory_watch.out_of_memory(where=where, state=state)

    def _save_on_error(self, exc: BaseException, why: str, *, quiet: bool = False) -> None:
        where = mixed_step(self)  # stopped with some weights stepped and others not
        mixed = where is not None
        # Saving a state needs every process (it waits for them all). An error (not an interrupt, which every
        # process gets) may stop one process alone while the others sit in the step's gradient all-reduce
        # or have stopped: waiting for them would hang instead of reporting the error. Under DDP this
        # process holds the trained weights all the same and writes them alone (save_fallback.save_alone).
        # (a stop flag is shared before it is acted on: every process stops, as on an interrupt)
        alone = why not in ("interrupted", "stopped") and self._setup_done and self.accelerator.num_processes > 1
        if where is not None and not alone:
            self.say(mixed_message(why, where))
        if alone and self.position.step > 0:  # save_alone writes nothing from mixed weights, and says so
            message = save_alone(self, why)
            log.info(message)
            print(message, file=sys.stderr)  # this process's own line: say() prints on the main process only
        state_failed: str | None = None  # why the state could not be saved
        if self._setup_done and self.position.step > 0 and self.options.save_state and not mixed and not alone:
            try:
                from .state import state_name

                last = self.checkpoints.last_state
                # --save-every just wrote this step's state: rewriting it would leave a moment with no state, for
                # nothing (decided from the name alone, the same on every process: each waits in save_state)
                if last is not None and last.name == state_name(self.position.step):
                    folder = last
                else:
                    folder = self.save_state()
                message = f"{why}: resumable state saved in {folder} (continue with --resume latest)"
                # the CLI prints the interruption once, with this folder (KeyboardInterrupt carries it)
                if why == "interrupted" or quiet:
                    log.info(message)
                else:
                    self.say(message)
                with contextlib.suppress(AttributeError, TypeError):
                    exc.sdcore_state = folder  # type: ignore[attr-defined]
            except KeyboardInterrupt:  # a second Ctrl-C while it is written: stop saving, end with the first error
                state_failed = AGAIN
                log.error("could not save the training state: %s", AGAIN)
            except Exception as save_exc:  # never hide the original error
                state_failed = reason(save_exc)
                log.error("could not save the training state: %s", save_exc)
        if why in ("interrupted", "stopped"):
            self._keep_stopped_weights(exc, why, mixed=where, state_failed=state_failed)
        elif (
            self._setup_done
            and self.position.step > 0
            and not alone
            and not mixed
            and state_failed != AGAIN
            and getattr(exc, "sdcore_state", None) is None
            and self.is_main
            and self.position.step not in self._written_steps()
        ):  # no state holds the trained weights (--no-save-state, kohya without save_state): write them
            message = save_alone(self, why, alone=False)
            log.info(message)
            print(message, file=sys.stderr)
        self._error_hook(exc)

    def _written_steps(self) -> set[int]:
        """The steps whose weights are on disk already (this step's --save-every result, the final result)."""
        done = (self.checkpoints.last_step_result, self.checkpoints.final_result)
        return {entry[0] for entry in done if entry is not None}

    def _keep_stopped_weights(
        self, exc: BaseException, why: str, *, mixed: str | None, state_failed: str | None
    ) -> None:
        """On Ctrl-C, SIGTERM or a stop flag: write the weights after the last finished step where ``--save-every``
        puts that step's result (``NAME-stepNNNNNNNN``, as the method saves it there, ``--ema``'s average
        included), after the state, so the user has a file A1111/ComfyUI load at once, and with
        ``--no-save-state`` the steps trained are not lost. ``exc`` gets ``sdcore_weights`` (the file or
        ``None``) and ``sdcore_saved``, the one line of what was kept (the CLI prints it after "interrupted: ").

        Every process comes here (an interrupt reaches them all; a stop flag is shared before it is acted on);
        only the main one writes, and the others wait for it, as they do for a state, so a launcher that ends
        the job once one process has exited does not cut the file off. A failure here (a full disk, a second
        Ctrl-C) is logged and named in the line: it never replaces the interrupt, and the state is written first.
        A second Ctrl-C while the state was written (``state_failed`` :data:`AGAIN`) means "quit now": nothing
        more is written or waited for (a launcher ends the other processes once this one has exited).
        The file counts among the results ``--save-limit`` keeps: the state's sidecar names it
        (:meth:`.Checkpoints.record_stopped`), so the resumed run prunes it in turn; nothing is deleted here.
        A stop after this step's ``--save-every`` result or the final result names that file instead of writing
        the same weights again under a step name.
        """
        from .checkpoints import intermediate_path
        from .save_fallback import write_result

        step = self.position.step
        state: Path | None = getattr(exc, "sdcore_state", None)
        weights: Path | None = None
        failure: str | None = None
        if self._setup_done and step > 0 and mixed is None and state_failed != AGAIN:
            try:
                if self.is_main:
                    done = self.checkpoints.last_step_result  # --save-every wrote this step's result just now
                    final = self.checkpoints.final_result  # a stop after the final result: no copy under a step name
                    if final is not None and final[0] == step:
                        weights = final[1]
                    elif done is not None and done[0] == step:
                        weights = done[1]
                    else:
                        with guard(), self._during("saving"):
                            weights = write_result(self, intermediate_path(self.output, step=step), final=False)
                        # --save-limit counts it, in a resumed run too: named beside the state written before it
                        self.checkpoints.record_stopped(weights, state, step)
                    log.info(f"{why}: the weights after step {step} are in {weights}")
            except (Exception, KeyboardInterrupt) as write_exc:  # the first interrupt is what ends the run
                failure = AGAIN if isinstance(write_exc, KeyboardInterrupt) else reason(write_exc)
                log.error("could not write the weights after step %d: %s", step, failure)
            if self.accelerator.num_processes > 1:
                # a Ctrl-C while this process waits for the main one's file ends the wait, not the first interrupt
                with contextlib.suppress(Exception, KeyboardInterrupt):
                    self.accelerator.wait_for_everyone()
        parts: list[str] = []
        if weights is not None:
            parts.append(f"the weights after step {step} are in {weights}")
        elif failure is not None:
            parts.append(f"the weights after step {step} could not be written ({failure})")
        if state is not None:
            parts.append(f"resumable state saved in {state} (continue with the same command plus --resume latest)")
        elif step == 0 or not self._setup_done:
            parts.append("no step had finished, so nothing was saved")
        elif mixed is not None:
            parts.append(f"stopped {mixed}, so nothing was saved")
        elif state_failed == AGAIN:
            parts.append(f"{AGAIN} while the resumable state was written, so nothing was saved")
        elif state_failed is not None:
            parts.append(f"the resumable state could not be saved ({state_failed})")
        elif not self.options.save_state:
            again = getattr(self.method, "start_from_result", None)
            start = f"; a new run can start from them with {again} {weights}" if again and weights else ""
            parts.append(f"no resumable state (--no-save-state), so the run cannot continue where it stopped{start}")
        with contextlib.suppress(AttributeError, TypeError):
            exc.sdcore_weights = weights  # type: ignore[attr-defined]
            exc.sdcore_saved = "; ".join(parts)  # type: ignore[attr-defined]
            exc.sdcore_main = self.is_main  # type: ignore[attr-defined]

    def _error_hook(self, exc: BaseException) -> None:
        if not self._setup_done:
            return
        try:
            self.hook("sdcore_on_train_error", context=self.context(), error=exc)
        except Exception as hook_exc:  # the original error is what the user must see
            log.error("%s", hook_exc)


def _sigterm_as_interrupt() -> Any:
    """Turn SIGTERM (a scheduler preempting the job, ``kill``) into KeyboardInterrupt while
    training, so it saves a resumable state too. Returns the function restoring the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def train(
    method: TrainingMethod[Any],
    *,
    bundle: ModelBundle | None = None,
    plugin_manager: Any = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """Train ``method`` with its options (``method.options``, the one source of truth) and return
    where the result is.

    ``bundle`` skips model loading (the method still prepares it). ``plugin_manager`` (a pluggy
    manager with sdcore's hookspecs, e.g. ``get_plugin_manager(extra=[my_hooks])``) receives the
    lifecycle hooks: ``sdcore_on_train_step`` is the per-step progress callback. ``stop`` (a
    :class:`threading.Event` another thread sets) is checked before each optimizer step; once set, the
    run saves a resumable state as on Ctrl-C and raises :class:`TrainingStopped` (in a multi-process run, give
    every process a flag: one set in any process stops them all before the same step).
    Raises :class:`ConfigError` before loading anything when the configuration is contradictory;
    Ctrl-C saves a resumable state and re-raises; a NaN/inf loss stops with :class:`TrainingDivergedError`.
    """
    if method.options.debug_dataset:
        raise ConfigError(
            "debug_dataset is set: it trains nothing (`sdcore train --debug-dataset`, or "
            "sdcore.train.debug_dataset.debug_dataset(method) from Python)"
        )
    return TrainSession(method, bundle=bundle, plugin_manager=plugin_manager, stop=stop).run()
