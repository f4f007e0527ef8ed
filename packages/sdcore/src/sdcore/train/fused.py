"""Optimizer steps inside backward: ``--fused-backward-pass`` (kohya's ``--fused_backward_pass``).

Why: a full fine-tune (DreamBooth) normally holds a gradient for every trained weight until the
optimizer steps, as much memory again as the fp32 weights (SDXL's UNet: 10 GB). Stepping each tensor
in its own ``register_post_accumulate_grad_hook`` (torch's "optimizer step in backward") and freeing
its gradient at once leaves at most a few gradients alive (the memory plan counts the largest).

What it means, from kohya's ``sdxl_train.py``/``sd3_train.py``/``flux_train.py`` (facts, own code):

- **Which optimizers.** kohya allows only Adafactor (``train_util.get_optimizer`` asserts it). The
  per-tensor step is exactly the ordinary step for any optimizer whose update of a tensor reads only
  that tensor, its gradient, its own state and its group's hyper-parameters, and writes nothing to the
  group: transformers' Adafactor (relative_step / scale_parameter included: the step count and RMS are
  per tensor), torch's AdamW (its per-tensor step count; the fused kernel is elementwise) and SGD with
  or without (Nesterov) momentum. Those are :data:`FUSED_OPTIMIZERS`. D-Adaptation/Prodigy (a step size
  estimated over all tensors), schedule-free optimizers (a step counter in the group), LAMB-like and
  8-bit ones (not verified here) and class paths are refused.
- **Clipping.** kohya clips each tensor's gradient to ``max_grad_norm`` by its own L2 norm
  (``accelerator.clip_grad_norm_(tensor, ...)``) instead of the global norm over all tensors: with
  ``--max-grad-norm`` above 0 the result differs from an ordinary run's (by design, as in kohya);
  with 0 the weights are the same.
- **The schedule** steps once after backward, as in the ordinary step: every tensor of step k uses the
  rate of step k.
- **bf16 weights and Adafactor** (``--full-bf16``): kohya's fused Adafactor computes the update in fp32
  and rounds it into the bf16 weight stochastically (random low 16 bits added, then truncated). sdcore
  does the same with random bits from a generator keyed by (seed, step, tensor index), so a resumed
  or re-run training rounds the same way.
- **Families** (``--fused-clip``). kohya steps in backward in ``sdxl_train.py``, ``sd3_train.py`` and
  ``flux_train.py``; its SD1/SD2 scripts accept the flag and train as usual, with global clipping. With
  ``--fused-clip kohya`` (the default: kohya command lines and TOMLs) sdcore steps in backward on
  SD1/SD2 too when ``--max-grad-norm 0`` (the weights are then kohya's) and refuses the flag there
  with clipping on. OneTrainer (``GenericTrainer.__apply_fused_back_pass``) steps in backward on every
  family with each tensor clipped by its own norm: ``--fused-clip per-tensor``, which a OneTrainer
  config sets with every fused back pass.
- **Gradient accumulation** (OneTrainer's rule; kohya's ``train_util.get_optimizer`` asserts it away for
  ``--fused_backward_pass``, and the note on a kohya-style run says so): the gradients accumulate over
  the micro-batches as usual (the hooks do nothing) and the tensors step in the backward of an update's
  last micro-batch, each on its whole accumulated gradient (clipped by its own norm), so the weights
  are those of the ordinary accumulated step with per-tensor clipping (without clipping: the same).
  Every gradient lives until then, so it saves no gradient memory (OneTrainer warns so too; the plan
  counts them all). A tensor with a gradient from an earlier micro-batch only steps at the end of that
  backward. Not with ``--blocks-to-swap`` on trained weights (a swapped weight's gradient would have to
  wait on the CPU).
- **Restrictions** (pre-flight, all at once): no fp16 mixed precision (the grad scaler needs every
  gradient before it may skip a step; OneTrainer's per-parameter scaler is not reproduced), no
  multi-process run (the hooks would step on this process's gradient before DDP averages it), and only
  methods that declare ``steps_in_backward`` (kohya offers it in its full fine-tune scripts; its
  ``train_network.py`` accepts the flag and ignores it, keeping global clipping).
- **Optimizer groups** (``--fused-optimizer-groups N``, kohya's ``sdxl_train.py`` only; its SD3/Flux
  scripts ignore it): kohya splits the tensors, in optimizer order, into groups of ``ceil(count / N)``
  (a new group where the rate changes), gives each group its own optimizer and steps it when the
  group's last gradient arrives, clipping per tensor as above. With a per-tensor optimizer the weights
  are exactly the fused pass's (one optimizer or N changes nothing); only the memory differs: a group's
  gradients live until it steps. sdcore steps each group's tensors when its last gradient arrives (and
  any group left incomplete, because a tensor got no gradient, at the end of backward), with the plain
  optimizer step (no stochastic rounding, as kohya's groups). For D-Adaptation/Prodigy-like optimizers
  N optimizers differ from one, which sdcore does not reproduce: refused.
- **Blockwise** (``--blockwise-fused-optimizers``, kohya's ``sd3_train.py``/``flux_train.py``): one
  group per transformer block (SD3's joint blocks; Flux's double and single blocks), one for the rest
  of the transformer, one per trained text encoder; each steps when its last gradient arrives. The
  same weights again for a per-tensor optimizer; kohya's ``flux_train.py`` asserts that only the
  transformer trains, sdcore steps trained text encoders as their own groups (as ``sd3_train.py``).
  UNet families have no such blocks: refused there.
- **Non-finite values.** A NaN/inf loss is found before backward: nothing steps and the last good
  state stays good, as in an ordinary run. A non-finite gradient norm (checked with ``--max-grad-norm``)
  is only known after backward, when tensors before it have stepped: the run stops without saving the
  half-stepped weights; resume from the last saved state.

Import-light: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..models.family import DEFAULT_BLOCK_LISTS

if TYPE_CHECKING:
    import torch

    from .method import TrainingMethod
    from .options import TrainOptions

#: optimizers whose per-tensor step in backward gives exactly the ordinary step's weights
FUSED_OPTIMIZERS = ("adafactor", "adamw", "sgd", "sgdnesterov")
#: ``--fused-clip``: where per-tensor clipping in backward is accepted (kohya's families, or every one as OneTrainer)
FUSED_CLIPS = ("kohya", "per-tensor")


def _flag(o: TrainOptions) -> str:
    if getattr(o, "blockwise_fused_optimizers", False):
        return "--blockwise-fused-optimizers"
    return "--fused-optimizer-groups" if getattr(o, "fused_optimizer_groups", 0) else "--fused-backward-pass"


def steps_in_backward(options: TrainOptions) -> bool:
    """Whether the run steps its tensors inside backward (any of the three options)."""
    return bool(
        getattr(options, "fused_backward_pass", False)
        or getattr(options, "fused_optimizer_groups", 0)
        or getattr(options, "blockwise_fused_optimizers", False)
    )


def fused_problems(options: TrainOptions, method: TrainingMethod[Any] | None = None) -> list[str]:
    """What stepping in backward (``--fused-backward-pass``, ``--fused-optimizer-groups``,
    ``--blockwise-fused-optimizers``) cannot do with these options and method (empty when off)."""
    import os

    from .optim import normalize_optimizer

    o = options
    groups = getattr(o, "fused_optimizer_groups", 0)
    problems: list[str] = []
    if groups < 0:
        problems.append(f"--fused-optimizer-groups must be 0 (off) or more, got {groups}")
    if not steps_in_backward(o):
        return problems
    flag = _flag(o)
    given = [o.fused_backward_pass, bool(groups), bool(getattr(o, "blockwise_fused_optimizers", False))]
    if sum(given) > 1:
        problems.append(
            "give one of --fused-backward-pass, --fused-optimizer-groups, --blockwise-fused-optimizers "
            "(kohya uses the first)"
        )
    plain = flag == "--fused-backward-pass"
    name = normalize_optimizer(o.optimizer)
    if name not in FUSED_OPTIMIZERS:
        why = (
            "kohya allows only adafactor"
            if plain
            else "kohya builds one optimizer per group, which sdcore reproduces only where that equals one optimizer"
        )
        problems.append(
            f"{flag} needs an optimizer whose step is per tensor ({', '.join(FUSED_OPTIMIZERS)}; {why}), "
            f"not {o.optimizer}"
        )
    clip = getattr(o, "fused_clip", "kohya")
    if clip not in FUSED_CLIPS:
        problems.append(f"--fused-clip {clip!r}: choose one of {', '.join(FUSED_CLIPS)}")
    if o.mixed_precision == "fp16":
        problems.append(
            f"{flag} does not work with --mixed-precision fp16: the grad scaler must see every gradient before a "
            "step; use bf16"
        )
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        problems.append(
            f"{flag} does not work in a multi-process run ({world} processes): a tensor would step on its own "
            "process's gradient before the processes average them"
        )
    if method is not None and not method.capabilities().steps_in_backward:
        problems.append(
            f"{flag}: method {method.name!r} does not step in backward (kohya offers it for full fine-tuning; its "
            "train_network.py ignores the flag): drop it"
        )
    return problems


#: the families whose kohya full fine-tune scripts step in backward (sdxl_train.py, sd3_train.py,
#: flux_train.py); train_db.py/fine_tune.py (SD1/SD2) accept the flag and train as usual
KOHYA_FAMILIES = ("sdxl", "sd3", "flux")
#: --fused_optimizer_groups: sdxl_train.py only (sd3/flux_train.py accept it and ignore it)
KOHYA_GROUP_FAMILIES = ("sdxl",)
#: --blockwise_fused_optimizers: sd3_train.py and flux_train.py (transformer blocks)
KOHYA_BLOCKWISE_FAMILIES = ("sd3", "flux")
#: the repeated transformer blocks of the diffusers SD3/Flux transformers (SD3's and Flux's joint
#: blocks are ``transformer_blocks``, Flux's single blocks ``single_transformer_blocks``): the families'
#: default ``ModelFamily.block_lists``, the table block swap and the memory plan read
BLOCK_LISTS = tuple(block.attribute for block in DEFAULT_BLOCK_LISTS)


def block_key(component: str, name: str | None) -> str:
    """The blockwise group of a trained tensor: ``transformer_blocks.3`` for a parameter ``name`` in
    the denoiser's block 3, the component (``transformer``, ``text_encoder_2``) otherwise."""
    parts = (name or "").split(".")
    if len(parts) > 2 and parts[0] in BLOCK_LISTS:
        return f"{parts[0]}.{parts[1]}"
    return component


def parameter_blocks(bundle: Any) -> dict[int, str]:
    """Every parameter's :func:`block_key` by ``id`` (the denoiser's by block, others by component)."""
    denoiser = bundle.denoiser  # the module itself: any bundle-like object has it, not every one a family
    keys: dict[int, str] = {}
    for component, module in bundle.components().items():
        for name, p in module.named_parameters():
            keys[id(p)] = block_key(component, name if module is denoiser else None)
    return keys


def fused_family_problems(options: TrainOptions, family: str) -> list[str]:
    """Stepping in backward on a family kohya does not step in backward for: the same result only
    without clipping (kohya clips all gradients together there), so it needs ``--max-grad-norm 0``."""
    if getattr(options, "blockwise_fused_optimizers", False) and family not in KOHYA_BLOCKWISE_FAMILIES:
        return [
            f"--blockwise-fused-optimizers groups transformer blocks (kohya's sd3/flux_train.py); {family} has none: "
            "use --fused-backward-pass or --fused-optimizer-groups"
        ]
    if not steps_in_backward(options) or options.max_grad_norm == 0:
        return []
    if getattr(options, "fused_clip", "kohya") == "per-tensor":
        return []  # OneTrainer's rule: every family steps in backward, each tensor clipped by its own norm
    groups = bool(getattr(options, "fused_optimizer_groups", 0))
    if family in (KOHYA_GROUP_FAMILIES if groups else KOHYA_FAMILIES):
        return []
    return [
        f"{_flag(options)} on {family}: kohya's {family} scripts ignore the flag and clip all gradients "
        f"together, while stepping in backward clips each tensor alone; add --max-grad-norm 0 (then the weights "
        "are the same), --fused-clip per-tensor (OneTrainer's rule) or drop the flag"
    ]


def fused_notes(options: TrainOptions) -> list[str]:
    """What the user may not expect (printed with the plan)."""
    if not steps_in_backward(options):
        return []
    notes = []
    if options.max_grad_norm > 0:
        whose = "OneTrainer" if getattr(options, "fused_clip", "kohya") == "per-tensor" else "kohya"
        notes.append(
            f"{_flag(options)}: --max-grad-norm {options.max_grad_norm:g} clips each tensor by its own norm "
            f"({whose}), not all gradients together; a non-finite gradient stops the run after part of the weights "
            "took the step, and the run resumes from the last saved state"
        )
    if options.gradient_accumulation > 1:
        flag, count = _flag(options), options.gradient_accumulation
        if getattr(options, "fused_clip", "kohya") == "per-tensor":  # a OneTrainer run: its own rule
            rule = "OneTrainer's rule"
        elif flag == "--fused-backward-pass":  # kohya's flag, kohya's family rule: say that kohya would not run it
            rule = (
                "kohya refuses --fused_backward_pass with gradient_accumulation_steps above 1 (train_util."
                "get_optimizer asserts it); sdcore runs it with OneTrainer's rule"
            )
        else:
            rule = "OneTrainer's rule for its fused back pass"
        notes.append(
            f"{flag} with --gradient-accumulation {count}: the tensors step in the backward of each update's last "
            f"micro-batch ({rule}), so every gradient is held until then and the pass saves no gradient memory"
        )
    return notes


def kohya_groups(rates: Sequence[float | None], count: int) -> list[list[int]]:
    """kohya's ``--fused_optimizer_groups`` split of tensors (their rates, in optimizer order) into
    about ``count`` groups of indices: ``ceil(len / count)`` tensors each, a new group where the rate
    changes (so a group never mixes rates)."""
    size = max(1, math.ceil(len(rates) / max(count, 1)))
    groups: list[list[int]] = []
    current: list[int] = []
    rate: Any = object()  # no tensor's rate
    for index, value in enumerate(rates):
        if value != rate and current:
            groups.append(current)
            current = []
        rate = value
        current.append(index)
        if len(current) == size:
            groups.append(current)
            current = []
            rate = object()
    if current:
        groups.append(current)
    return groups


class StepInBackward:
    """Hooks that step ``optimizer`` (the plain torch optimizer, not accelerate's wrapper) for each of
    ``params`` as soon as its gradient is accumulated, then free the gradient; with ``groups``
    (indices into ``params``), each group once its last gradient arrived (or at :meth:`end`).

    ``begin(step)`` before each backward, ``end()`` after it; ``bad_norm()`` then tells a non-finite
    gradient norm; ``remove()`` takes the hooks off (the run's end, or an error). With gradient
    accumulation, ``begin(step, update=False)`` before the backward of every micro-batch but an update's
    last: the hooks then leave the gradients to accumulate.
    """

    def __init__(
        self,
        optimizer: Any,
        params: list[torch.nn.Parameter],
        *,
        max_grad_norm: float,
        seed: int,
        stochastic_bf16: bool,
        groups: list[list[int]] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.stochastic_bf16 = stochastic_bf16 and groups is None  # kohya's groups step plainly
        self.step = 0
        #: this backward steps (the last micro-batch of an update); False: gradients accumulate
        self.update = True
        #: between :meth:`begin` and :meth:`end` of an update: the weights are partly stepped
        self.in_backward = False
        self._lock = threading.Lock()  # autograd runs one thread per device: one group swap at a time
        self._bad: Any = None
        self._group: dict[int, dict[str, Any]] = {}
        self._index: dict[int, int] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._group[id(p)] = group
        self._member: dict[int, int] = {}
        self._sizes: list[int] = []
        self._pending: list[list[torch.Tensor]] = []
        for number, members in enumerate(groups or []):
            mine = [params[i] for i in members if id(params[i]) in self._group]
            for p in mine:
                self._member[id(p)] = number
            self._sizes.append(len(mine))
            self._pending.append([])
        self._handles: list[Any] = []
        self._hooked: list[torch.Tensor] = []
        self._fired: set[int] = set()
        for index, p in enumerate(params):
            if id(p) not in self._group:
                continue  # not the optimizer's (cannot happen with the runtime's groups)
            self._index[id(p)] = index
            self._hooked.append(p)
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def hooked(self) -> int:
        """How many tensors step in backward."""
        return len(self._handles)

    def begin(self, step: int, update: bool = True) -> None:
        """Start a backward of optimizer step ``step`` (0-based; keys the stochastic rounding); ``update``
        False: a micro-batch before the update's last, whose gradients only accumulate."""
        self.step = step
        self.update = update
        self._bad = None
        self.in_backward = update
        self._fired.clear()
        for pending in self._pending:
            pending.clear()

    def end(self) -> None:
        """Backward finished: step the tensors whose gradient came from an earlier micro-batch only, and
        the groups some tensor of which got no gradient; every tensor has now taken this step (an
        interrupt before this leaves them mixed). Nothing to do after a micro-batch that only accumulates."""
        import torch

        if not self.update:
            return
        for p in self._hooked:
            if p.grad is not None and id(p) not in self._fired:  # accumulated earlier, no gradient this time
                self._hook(p)
        with self._lock, torch.no_grad():
            for number, pending in enumerate(self._pending):
                if pending:
                    self._flush(number)
        self.in_backward = False

    def bad_norm(self) -> float | None:
        """NaN when a per-tensor gradient norm of this backward was not finite, else None (one device sync)."""
        if self._bad is None or float(self._bad) == 0.0:
            return None
        return float("nan")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the hook --------------------------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        import torch

        if p.grad is None or not self.update:  # accumulating: the gradient waits for the update's micro-batch
            return
        with self._lock, torch.no_grad():
            self._fired.add(id(p))
            if self.max_grad_norm > 0:
                # kohya: accelerator.clip_grad_norm_(tensor, max_grad_norm), i.e. this tensor's norm alone
                norm = torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
                bad = (~torch.isfinite(norm)).to(torch.int32)
                self._bad = bad if self._bad is None else self._bad + bad
            number = self._member.get(id(p))
            if number is not None:  # --fused-optimizer-groups: wait for the group's last gradient
                self._pending[number].append(p)
                if len(self._pending[number]) == self._sizes[number]:
                    self._flush(number)
                return
            if self.stochastic_bf16 and p.dtype == torch.bfloat16:
                self._step_rounded(p)
            else:
                self._step_one(p, p)
            p.grad = None

    def step_swapped(self, p: torch.nn.Parameter, copy: torch.Tensor, grad: torch.Tensor) -> None:
        """Step ``copy`` (the device copy of a swapped block's weight ``p``, whose master stays on the CPU:
        ``--blocks-to-swap`` on a full fine-tune) in place with ``grad``, exactly as :meth:`_hook` steps an
        unswapped ``p``: its own clipping, its group's rate, kohya's stochastic rounding for bf16 Adafactor.
        The optimizer state stays keyed by ``p`` and lives on the device (created like the gradient, as
        kohya's swapped Adafactor state is); a state loaded onto the CPU (a resume: torch puts it beside
        ``p``) moves to the device at its first step. The caller copies ``copy`` back into ``p``."""
        import torch

        if id(p) in self._member:
            raise RuntimeError("a swapped block's weight cannot step in an optimizer group")  # the pre-flight refuses
        opt = self.optimizer
        with self._lock, torch.no_grad():
            copy.grad = grad
            if self.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_([copy], self.max_grad_norm)
                bad = (~torch.isfinite(norm)).to(torch.int32)
                self._bad = bad if self._bad is None else self._bad + bad.to(self._bad.device)
            state = opt.state.pop(p, None)
            if state is not None:
                for key, value in state.items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.device != copy.device:
                        state[key] = value.to(copy.device)
                opt.state[copy] = state
            try:
                if self.stochastic_bf16 and copy.dtype == torch.bfloat16:
                    self._step_rounded(p, copy)
                else:
                    self._step_one(p, copy)
            finally:
                moved = opt.state.pop(copy, None)
                if moved is not None:
                    opt.state[p] = moved
                copy.grad = None

    def _flush(self, number: int) -> None:
        for q in self._pending[number]:
            self._step_one(q, q)
            q.grad = None
        self._pending[number].clear()

    def _step_one(self, p: torch.Tensor, stepped: torch.Tensor) -> None:
        """One optimizer step of ``stepped`` alone, with ``p``'s group (its current rate)."""
        opt = self.optimizer
        view = dict(self._group[id(p)])
        view["params"] = [stepped]
        saved = opt.param_groups
        opt.param_groups = [view]
        try:
            opt.step()
        finally:
            opt.param_groups = saved

    def _step_rounded(self, p: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """kohya's fused Adafactor for a bf16 weight: the step in fp32, then stochastic rounding.
        ``target``: the tensor holding ``p``'s values, gradient and state (``p`` itself, or its device copy)."""
        import torch

        target = p if target is None else target
        opt = self.optimizer
        grad = target.grad
        assert grad is not None
        shadow = target.detach().float()
        shadow.grad = grad.float()
        state = opt.state.pop(target, None)
        if state is not None:
            opt.state[shadow] = state
        try:
            self._step_one(p, shadow)
        finally:
            opt.state[target] = opt.state.pop(shadow, state if state is not None else {})
        from .noise import sample_seed

        gen = torch.Generator(device=target.device)
        gen.manual_seed(sample_seed(self.seed, "fused-rounding", self.step, self._index[id(p)]))
        target.copy_(stochastic_round_bf16(shadow, gen))


def stochastic_round_bf16(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``value`` (fp32) rounded to bf16 stochastically: a uniform random 16-bit integer is added to
    the fp32 bit pattern and the low 16 bits are dropped, so a value rounds up with probability equal
    to its distance from the lower bf16 neighbour (kohya's ``copy_stochastic_``)."""
    import torch

    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    bits = value.contiguous().view(torch.int32) + noise
    bits = bits & -65536  # keep the sign, exponent and the top 7 mantissa bits
    return bits.view(torch.float32).to(torch.bfloat16)


def install(
    session_optimizer: Any,
    params: list[torch.nn.Parameter],
    options: TrainOptions,
    say: Callable[[str], None],
    blocks: dict[int, str] | None = None,
) -> StepInBackward:
    """The hooks of one run (``session_optimizer``: accelerate's wrapper or the optimizer; ``blocks``:
    each parameter's :func:`block_key` by ``id``, for ``--blockwise-fused-optimizers``)."""
    from .optim import normalize_optimizer

    inner = getattr(session_optimizer, "optimizer", session_optimizer)
    stochastic = normalize_optimizer(options.optimizer) == "adafactor"
    groups = None
    count = getattr(options, "fused_optimizer_groups", 0)
    if count:
        index = {id(p): i for i, p in enumerate(params)}
        order = [(index[id(p)], g.get("lr")) for g in inner.param_groups for p in g["params"] if id(p) in index]
        groups = [[order[i][0] for i in members] for members in kohya_groups([lr for _, lr in order], count)]
    elif getattr(options, "blockwise_fused_optimizers", False):
        keyed: dict[str, list[int]] = {}
        for i, p in enumerate(params):
            keyed.setdefault((blocks or {}).get(id(p), "other"), []).append(i)
        groups = list(keyed.values())
    hooks = StepInBackward(
        inner, params, max_grad_norm=options.max_grad_norm, seed=options.seed, stochastic_bf16=stochastic, groups=groups
    )
    where = f"in {len(groups)} groups, each" if groups is not None else "each"
    say(f"fused backward pass: {hooks.hooked} tensors step during backward, {where} as its gradients are ready")
    return hooks
