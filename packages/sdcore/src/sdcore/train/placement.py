"""Model placement (imports torch; the loop imports it when a run starts): the accelerator, devices and dtypes, gradient checkpointing, and
``accelerator.prepare`` of what trains.

Distributed training is accelerate's: what a method trains is gathered into one module
(:class:`TrainedModules`) whose forward computes the micro-batch loss, and that module, the
optimizer and the LR schedule go through ``accelerator.prepare``. Under ``accelerate launch``
with DDP the gradients are therefore averaged by DDP's bucketed all-reduce *during* backward
(overlapping it), and skipped on the micro-batches before the last of an accumulation group
(:meth:`Placement.no_sync`). Whole modules that train entirely (DreamBooth's UNet and text
encoders) are registered as themselves, so a sharding engine (FSDP, DeepSpeed) sees the real
modules; the parameters a method adds elsewhere (LoRA factors, TI vectors, HN layers) are
registered as a parameter list.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..dtypes import torch_dtype
from ..errors import ConfigError
from .method import Capabilities
from .options import TrainOptions

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle


def create_accelerator(options: TrainOptions, *, log_with: str | None = None) -> Any:
    """An ``accelerate.Accelerator`` for this run (mixed precision, trackers, DDP settings and kohya's
    ``--ddp_*`` options: :mod:`.accelerate_options`).

    The LR schedule is stepped once per optimizer step of this run (``step_scheduler_with_optimizer``
    off): its length is already counted per process, so accelerate must not step it once per process.
    """
    from accelerate import Accelerator

    from .accelerate_options import kwargs_handlers

    with contextlib.suppress(Exception):  # a previous run in this process fixed another precision
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
    try:
        accelerator = Accelerator(
            mixed_precision=options.mixed_precision,
            log_with=log_with,
            project_dir=options.log_dir,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=kwargs_handlers(options),
        )
    except ValueError as exc:
        raise ConfigError(f"--mixed-precision {options.mixed_precision}: {exc}") from exc
    destroy_process_group_at_exit()
    return accelerator


_exit_handler_registered = False


def destroy_process_group_at_exit() -> None:
    """Under ``accelerate launch``/torchrun: destroy the process group when the interpreter exits.

    A process that ends with its Gloo group alive can abort in the interpreter's finalisation
    ("terminate called without an active exception", exit code 134) after a run that saved
    everything, which turns a finished run into a failed one for the launcher. The group is
    destroyed at exit, not after the run, so a script that trains twice in one process keeps it.
    """
    global _exit_handler_registered
    if _exit_handler_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import atexit

    def destroy() -> None:
        with contextlib.suppress(Exception):  # already destroyed by the script, or torch tearing down
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    atexit.register(destroy)
    _exit_handler_registered = True


def place_model(
    bundle: ModelBundle,
    params: list[torch.nn.Parameter],
    caps: Capabilities,
    device: Any,
    precision: str,
    *,
    stay_on_cpu: Collection[torch.nn.Module] = (),
    trainable_dtype: torch.dtype = torch.float32,
) -> None:
    """Every module to ``device``; trainable parameters in ``trainable_dtype`` (fp32, the master copy
    mixed precision updates; bf16/fp16 under ``--full-bf16``/``--full-fp16``), frozen ones in the
    compute dtype (under mixed precision, unless the method keeps them: ``cast_frozen_weights``).
    fp8-stored weights (``--fp8-base``) keep their dtype; modules in ``stay_on_cpu`` (blocks to swap)
    are cast where they are and never visit the device, so the device never holds the whole model."""

    weight_dtype = torch_dtype(precision)
    trainable = {id(p) for p in params}
    for name, module in bundle.components().items():
        module_trains = False
        # cast where the weights are loaded (the CPU), then move: the device never holds an fp32
        # copy of a module whose frozen weights train in bf16/fp16 (SDXL's UNet: 10 GB instead of 5)
        for p in module.parameters():
            if id(p) in trainable:
                module_trains = True
                if p.dtype != trainable_dtype:
                    p.data = p.data.to(trainable_dtype)
            elif not caps.cast_frozen_weights or p.element_size() == 1:
                continue
            elif p.dtype != weight_dtype and not (name == "vae" and weight_dtype == torch.float16):
                # the VAE stays fp32 under fp16: SD/SDXL VAEs overflow in fp16 (NaN latents)
                p.data = p.data.to(weight_dtype)
        _move(module, device, {id(m) for m in stay_on_cpu})
        module.train(module_trains)
    # method-owned parameters outside the bundle's modules (e.g. separate embeddings)
    swapped = {id(p) for m in stay_on_cpu for p in m.parameters()}
    for p in params:
        if p.device != device and id(p) not in swapped:  # a swapped block's trained weights stay (block swap)
            p.data = p.data.to(device)
        if trainable_dtype != torch.float32 and p.dtype != trainable_dtype:
            p.data = p.data.to(trainable_dtype)


def full_precision_dtype(options: TrainOptions) -> torch.dtype:
    """The dtype trainable parameters live in: fp32 (a master copy under mixed precision), or bf16/fp16
    with kohya's ``--full-bf16``/``--full-fp16`` (the weights, their gradients and the optimizer state
    in half precision: half the memory, no fp32 copy)."""
    if getattr(options, "full_bf16", False):
        return torch.bfloat16
    if getattr(options, "full_fp16", False):
        return torch.float16
    return torch.float32


def _move(module: torch.nn.Module, device: Any, skip: set[int]) -> None:
    """``module.to(device)`` except the subtrees whose ids are in ``skip``."""
    if not skip:
        module.to(device)
        return
    if id(module) in skip:
        return
    module._apply(lambda t: t.to(device), recurse=False)  # what module.to does, for this module's own tensors
    for child in module.children():
        _move(child, device, skip)


def enable_gradient_checkpointing(bundle: ModelBundle, caps: Capabilities, *, denoiser: bool = True) -> None:
    """Also when the denoiser is frozen: gradients still flow through it to LoRA/TI parameters. A family
    adapter with ``enable_gradient_checkpointing(bundle)`` does it its own way (Chroma: keeps its mask).
    ``denoiser`` False: the training text encoders only (``--cpu-offload-checkpointing`` set up the denoiser)."""
    from ..models.family import family_adapter

    own = getattr(family_adapter(bundle.family_spec), "enable_gradient_checkpointing", None)
    if not denoiser:
        pass
    elif own is not None:
        own(bundle)
    else:
        bundle.denoiser.enable_gradient_checkpointing()
    if caps.trains_text_encoder:
        for te in bundle.text_encoders:
            # transformers 5.x renamed it (the old name is a deprecated alias that prints a FutureWarning on
            # every training run); the old name stays for older transformers
            enable = getattr(te, "activation_checkpointing_enable", None) or getattr(
                te, "gradient_checkpointing_enable", None
            )
            if enable is not None:
                enable()


def allow_fp16_gradients(accelerator: Any) -> None:
    """``--full-fp16``: let the fp16 gradient scaler unscale fp16 gradients (torch's ``GradScaler``
    refuses them by default, expecting fp32 master weights); what kohya's
    ``patch_accelerator_for_fp16_training`` does. DeepSpeed manages its own scaling."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not hasattr(scaler, "_unscale_grads_"):
        return
    original = scaler._unscale_grads_

    def unscale(optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


class TrainedModules(torch.nn.Module):
    """What a method trains, gathered into one module whose forward computes the micro-batch loss.

    The module shares the parameters (no copies): the method keeps using its own modules. Bundle
    components whose every parameter trains (a full fine-tune) are registered whole (``whole``);
    the other trainable parameters are in ``extra``.
    """

    def __init__(self, bundle: ModelBundle, params: list[torch.nn.Parameter], loss: Callable[..., Any]) -> None:
        super().__init__()
        wanted = {id(p) for p in params}
        covered: set[int] = set()
        self.whole = torch.nn.ModuleDict()
        for name, module in bundle.components().items():
            own = list(module.parameters())
            if own and all(id(p) in wanted for p in own):
                self.whole[name] = module
                covered.update(id(p) for p in own)
        self.extra = torch.nn.ParameterList([p for p in params if id(p) not in covered])
        self._loss = loss

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._loss(*args, **kwargs)


class Placement:
    """The accelerator of one run and what went through ``accelerator.prepare``."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.model: Any = None  # the prepared TrainedModules (DDP-wrapped under accelerate launch)
        self.optimizer: Any = None
        self.scheduler: Any = None
        #: set by :func:`~sdcore.train.step.optimizer_step` while ``optimizer.step()`` runs and left set when it
        #: raises: some tensors may have taken the step and others not, so nothing may be saved from them
        self.in_optimizer_step = False

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def prepare(self, model: Any, optimizer: Any, scheduler: Any, *, place: bool = True) -> None:
        """``place`` False: accelerate leaves the model where :func:`place_model` put it (blocks swapped with
        their trained weights stay on the CPU)."""
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            model, optimizer, scheduler, device_placement=[place, None, None]
        )

    @contextlib.contextmanager
    def no_sync(self, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on micro-batches before the last of an accumulation group.

        Sets accelerate's ``sync_gradients`` flag as ``accelerator.accumulate`` would (DeepSpeed's
        engine steps inside ``backward`` only when it is set) and, under DDP, enters ``no_sync``.
        The loop decides the group size itself because the last step of an epoch may be shorter.
        """
        acc = self.accelerator
        acc.gradient_state._set_sync_gradients(sync)
        try:
            if sync or acc.num_processes <= 1:
                yield
            else:
                with acc.no_sync(self.model):
                    yield
        finally:
            acc.gradient_state._set_sync_gradients(True)
