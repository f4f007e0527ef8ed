"""The memory plan: peak training memory estimated before any weight is loaded.

``estimated peak memory = weights + gradients + optimizer state + activations (+ EMA) (+ runtime
on the CPU)`` on the training device, for the chosen precision, batch, resolution, gradient checkpointing,
caches and method.

- **Weights**: every parameter of the components that stay on the device, at its dtype: frozen
  weights in the compute dtype under mixed precision (the VAE stays fp32 under fp16), trainable
  ones in fp32 (2 bytes with ``--full-bf16``/``--full-fp16``), plus the parameters a method adds
  (LoRA modules, TI vectors, hypernetworks). On a
  GPU the runtime moves the VAE (latents cached, no pixels needed) and the text encoders (outputs
  cached) back to the CPU after caching, so they do not count there; on the CPU everything stays. With
  partial caching (``partial_text_cache``: SD3/FLUX.1's T5-XXL cached while CLIP trains,
  :func:`sdcore.train.cache.partial_text_encoders`) only those encoders leave the device, and their
  activations are not counted with the training encoders'.
- **Gradients**: one per trainable parameter, in its dtype (fp32; bf16/fp16 with ``--full-*``, which
  also halves the float optimizer states).
- **Optimizer**: bytes per trainable parameter (:data:`OPTIMIZER_STATE_BYTES`: AdamW keeps two fp32
  moments = 8 bytes, 8-bit AdamW two 8-bit moments plus block statistics ~ 2 bytes, ...).
- **Activations**: what autograd keeps for the backward pass of the denoiser, from its config. With
  ``S_l`` the latent area at level ``l`` (``(resolution / 8)^2 / 4^l``), every ResNet block
  counts ``(c_in + c_out) * S_l`` elements, every transformer block ``c * S_l`` and, for its
  cross-attention keys and values, ``c * T`` (``T`` = 77 text tokens):

      A = batch * bytes * (K_RES * sum_resnets (c_in + c_out) S_l
                           + sum_transformers (K_TF * c S_l + K_CTX * c T))

  ``bytes`` is 2 under fp16/bf16 autocast, else 4. With gradient checkpointing only block inputs
  are kept, plus one block recomputed at a time:

      A_gc = batch * bytes * (sum_blocks c_in S_l + max_block (its full term above))

  Attention score maps (``S_l^2``) are not counted: diffusers runs ``scaled_dot_product_attention``,
  whose CPU flash and CUDA memory-efficient kernels keep only ``O(S_l)`` statistics. When a text
  encoder trains (DreamBooth/LoRA with ``--train-text-encoder``, TI and APT's vectors), its
  activations add ``K_TE * batch * bytes * tokens * width * layers``.

  The constants (:data:`ACTIVATION_CONSTANTS`) were calibrated once by measuring the bytes autograd
  saves (``torch.autograd.graph.saved_tensors_hooks``, unique storages) for the tiny, mid and
  SD1.5-sized UNets of ``benchmarks/bench_memory.py`` at two resolutions, for adapter training (a
  LoRA on a frozen UNet) and full training; ``python -m benchmarks memory -- --calibrate`` repeats
  the measurement. The benchmark then checks the whole estimate against the measured peak
  (RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU).

  A transformer denoiser (SD3, Flux: ``family.denoiser == "transformer"``) is counted per block
  instead (its blocks counted from the config keys the family's ``block_lists`` name, the lists block swap
  swaps): with ``D`` its hidden width, ``N`` the image tokens (latent cells per patch, packing
  included) and ``T`` the family's ``context_tokens``,
  ``A = batch * bytes * blocks * D * (K_IMG * N + K_TXT * T)`` (:data:`TRANSFORMER_ACTIVATION_CONSTANTS`),
  and with gradient checkpointing the blocks' inputs ``D (N + T)`` plus one block. Flux's
  double-stream and single-stream blocks have their own constants per token, image and text alike
  (:data:`FLUX_ACTIVATION_CONSTANTS`). Blocks swapped to the CPU (``--blocks-to-swap``) always run
  checkpointed, so they count their inputs, plus one of them recomputed. With
  ``--cpu-offload-checkpointing`` (:mod:`sdcore.train.offload_checkpointing`) the blocks' inputs are kept in
  host memory (:attr:`MemoryEstimate.host`, :func:`offloaded_input_bytes`, not part of the device's total); the
  device keeps one block recomputed plus two block inputs (the input's device copy and the block's output).
  On a CPU run host and device are one memory, so there it counts as plain checkpointing.

- **Memory options**: ``--base-weights-dtype`` counts the denoiser's frozen Linear/Conv2d weights in
  their storage format (:func:`sdcore.dtypes.stored_weight_bytes`: ``fp8``/``--fp8-base`` 1 byte,
  ``nf4`` 0.5 + 4/64 bytes, ``int8`` 1 byte plus 4 per output row), the rest of it at the compute
  dtype (a bf16 base: 2 bytes); ``--text-encoder-weights-dtype`` counts the chosen frozen text encoders' Linear
  weights by the same formula (on a GPU only where they stay: not cached, or trained through an adapter);
  ``--blocks-to-swap N`` takes the last N blocks' weights off the device except the two largest
  (copies in flight); on the CPU those copies add to the weights instead. On a full fine-tune with
  ``--fused-backward-pass`` the blocks' trained weights (4 bytes, 2 under ``--full-bf16``) are swapped
  with them; their optimizer states stay on the device (where the step runs, as kohya's), and
  the copy a weight steps on is within the two blocks' in flight. The swapped bytes are host memory
  (:attr:`MemoryEstimate.swapped_host`), and so is the ``--ema`` average of those trained weights
  (:class:`sdcore.train.ema.WeightEMA` keeps each average beside its weight).

- **EMA** (``--ema``): 4 bytes per trainable parameter (the fp32 average), on the device unless
  ``--ema-device cpu`` keeps it in host memory (on a CPU run it counts either way).

- **Runtime** (CPU only): host memory of the accelerator, data index and allocator slack plus one
  CLIP tokenizer per text encoder (:data:`CPU_RUNTIME_BYTES`, :data:`CPU_TOKENIZER_BYTES`). On a
  GPU the estimate is of ``torch.cuda.max_memory_allocated``, which counts tensors only.

Nothing here imports torch at module level; :func:`device_free_memory` imports it only for CUDA.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypedDict

from ..dtypes import element_bytes, stored_weight_bytes
from ..models.family import DEFAULT_BLOCK_LISTS, BlockList, get_family
from .fused import FUSED_OPTIMIZERS, kohya_groups
from .fused import steps_in_backward as fused_steps
from .memory_options import base_weights_dtype, text_encoder_formats
from .offload_checkpointing import FLAG as OFFLOAD_FLAG
from .offload_checkpointing import checkpointing as checkpointing_on
from .offload_checkpointing import offload_family_problems, offload_option_problems, offloading
from .optim import OPTIMIZER_TABLE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models.bundle import ModelBundle
    from ..models.layout import ModelLayout
    from .options import TrainOptions

MIB = 1024 * 1024

#: optimizer state bytes per trainable (fp32) parameter (the optimizer table's; a class path counts as AdamW)
OPTIMIZER_STATE_BYTES: dict[str, float] = {name: spec.state_bytes for name, spec in OPTIMIZER_TABLE.items()}

#: (K_RES, K_TF, K_CTX, K_TE) for adapter training (frozen base weights) and full training. K_RES,
#: K_TF and K_CTX were fitted to the bytes autograd saves (``python -m benchmarks memory --
#: --calibrate``, 2026-11-30: within 5 % on 14 UNet/resolution/mode points from 1.4 to 472 MiB);
#: K_TE is counted from a CLIP layer's saved tensors (LayerNorms, q/k/v/out, the 4x MLP), not fitted
ACTIVATION_CONSTANTS: dict[str, tuple[float, float, float, float]] = {
    "adapter": (1.52, 37.5, 5.37, 20.0),
    "full": (3.80, 29.9, 2.27, 20.0),
}

#: (K_IMG, K_TXT) of a transformer denoiser (MMDiT/DiT: SD3, Flux), per block and per hidden unit,
#: for an image token and a text token: ``A = batch * bytes * blocks * D * (K_IMG * N + K_TXT * T)``.
#: Fitted to the bytes autograd saves (saved_tensors_hooks, unique non-parameter storages) for two
#: SD3Transformer2DModel sizes (D 128 x 2 blocks, D 256 x 3 blocks) at 128 and 256 px, with a peft
#: LoRA on every attention/MLP output projection ("adapter") and all weights trained ("full"),
#: 2026-11-30 (within 5 % of those points). The patch embedding and output layers are folded into
#: the per-block constants, so deep real models are slightly over-estimated; Flux's single-stream
#: blocks are counted as joint blocks (not measured separately).
TRANSFORMER_ACTIVATION_CONSTANTS: dict[str, tuple[float, float]] = {
    "adapter": (17.8, 12.5),
    "full": (22.6, 16.1),
}

#: (K_DOUBLE, K_SINGLE) of Flux's double-stream and single-stream blocks, per block, hidden unit and
#: token (image and text alike): ``A = batch * bytes * D * (N + T) * (K_DOUBLE * double + K_SINGLE *
#: single)``. Measured as bytes autograd saves per block (saved_tensors_hooks, unique non-parameter
#: storages) on two FluxTransformer2DModel sizes (D 128 with 2+4 blocks at 256 px, D 384 with 4+8
#: blocks at 512 px): "adapter" with a LoRA on every block Linear (kohya's Flux default), "full" with
#: every weight trained; the two sizes agree within 1 % (2026-11-30, ``benchmarks/RESULTS.md``).
FLUX_ACTIVATION_CONSTANTS: dict[str, tuple[float, float]] = {
    "adapter": (22.1, 19.2),
    "full": (24.3, 21.1),
}

#: what the libraries take once imported (torch, diffusers, transformers, accelerate): added when
#: checking the estimate against free memory, not part of the printed estimate
RUNTIME_OVERHEAD = {"cpu": 700 * MIB, "cuda": 300 * MIB}

#: host memory the run itself takes beside tensors on the CPU, part of the estimate ("runtime"):
#: the accelerator, data index, caches' bookkeeping and allocator slack, plus each CLIP tokenizer
#: (a Python vocabulary of ~50k entries). Measured on the tiny model (benchmarks/RESULTS.md). On a
#: GPU the estimate is of ``torch.cuda.max_memory_allocated``, which counts tensors only.
CPU_RUNTIME_BYTES = 30 * MIB
CPU_TOKENIZER_BYTES = 20 * MIB


@dataclass(frozen=True)
class ParameterPlan:
    """Parameter counts the plan needs, from a shapes-only bundle and the method's groups."""

    components: dict[str, int]  # name -> parameters (unet, vae, text_encoder, ...)
    trainable: int  # parameters the optimizer updates
    added: int  # trainable parameters that are not part of the model (LoRA, TI vectors, HN)
    trainable_in: frozenset[str] = frozenset()  # components with trainable weights of their own
    result: int = 0  # parameters in the saved result
    #: frozen Linear/Conv2d weight elements of the denoiser (what ``--fp8-base`` stores in 1 byte)
    denoiser_fp8: int = 0
    #: per swappable transformer block, forward order: (frozen elements, of which fp8-convertible)
    blocks: tuple[tuple[int, int], ...] = ()
    #: elements of the largest trainable tensor: the gradient ``--fused-backward-pass`` holds at most
    largest_trainable: int = 0
    #: (elements, group rate or None) of each trainable tensor in optimizer order: the groups
    #: ``--fused-optimizer-groups`` holds the gradients of (kohya's split, :func:`sdcore.train.fused.kohya_groups`)
    tensors: tuple[tuple[int, float | None], ...] = ()
    #: each of ``tensors``' blockwise group (:func:`sdcore.train.fused.block_key`)
    tensor_blocks: tuple[str, ...] = ()
    #: output rows of the frozen Linear/Conv2d weights (``--base-weights-dtype int8`` keeps a maximum per row)
    denoiser_rows: int = 0
    #: the same per swappable block (forward order, as ``blocks``)
    block_rows: tuple[int, ...] = ()
    #: ``--base-weights-exclude`` patterns that match none of the denoiser's frozen Linear/Conv2d layers (the
    #: pre-flight reports them before any weight loads), and the denoiser's class for that line
    unused_exclude: tuple[str, ...] = ()
    denoiser_class: str = ""
    #: bytes of one saved result when the method says (:meth:`~sdcore.train.method.TrainingMethod.result_bytes`)
    result_bytes: int | None = None
    #: the method's lines about what it built (:meth:`~sdcore.train.method.TrainingMethod.plan_notes`)
    notes: tuple[str, ...] = ()
    #: text-encoder component -> (frozen Linear/Conv2d weight elements, their output rows, trained ones): what
    #: ``--text-encoder-weights-dtype`` stores, and what it must not (an encoder's own weights that train)
    text_encoders: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: trained elements per swappable block (forward order, as ``blocks``): what ``--blocks-to-swap`` keeps on the
    #: CPU on a full fine-tune with ``--fused-backward-pass``
    block_trained: tuple[int, ...] = ()


@dataclass
class MemoryEstimate:
    device: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    #: the ``--ema`` copy of the trained weights (fp32) when it lives on this device
    ema: int = 0
    #: bytes the options keep in host memory instead (``--cpu-offload-checkpointing``'s block inputs); not in
    #: :attr:`total`, which is the device's
    host: int = 0
    #: bytes of the swapped blocks' weights (``--blocks-to-swap``) and of their ``--ema`` average (a full
    #: fine-tune's trained weights), in host memory; not in :attr:`total`
    swapped_host: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime + self.ema

    def line(self) -> str:
        def mib(n: int) -> str:
            return f"{n / MIB:,.0f}"

        return (
            f"estimated peak memory: {mib(self.total)} MiB (weights {mib(self.weights)}, gradients "
            f"{mib(self.gradients)}, optimizer {mib(self.optimizer)}, activations {mib(self.activations)}"
            + (f", EMA {mib(self.ema)}" if self.ema else "")
            + (f", runtime {mib(self.runtime)})" if self.runtime else ")")
            + (f"; in host memory: {mib(self.host)} MiB of checkpointed block inputs" if self.host else "")
            + (f"; in host memory: {mib(self.swapped_host)} MiB of swapped block weights" if self.swapped_host else "")
        )


# ----------------------------------------------------------------------------------------------------------
# parameters


def count_parameters(
    bundle: ModelBundle, groups: list[dict[str, Any]], *, whole_model_result: bool, exclude: Sequence[str] = ()
) -> ParameterPlan:
    """Counts for the plan from a (meta) bundle after the method's ``prepare`` returned ``groups``;
    ``exclude``: ``--base-weights-exclude``'s patterns, whose layers keep their dtype (not counted as converted)."""
    components = {name: sum(p.numel() for p in module.parameters()) for name, module in bundle.components().items()}
    owners: dict[int, str] = {}
    for name, module in bundle.components().items():
        for p in module.parameters():
            owners[id(p)] = name
    seen: set[int] = set()
    trainable = added = largest = 0
    trainable_in: set[str] = set()
    tensors: list[tuple[int, float | None]] = []
    from .fused import parameter_blocks

    keys = parameter_blocks(bundle)
    tensor_blocks: list[str] = []
    for group in groups:
        for p in group["params"]:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            trainable += p.numel()
            largest = max(largest, p.numel())
            tensors.append((p.numel(), group.get("lr")))
            tensor_blocks.append(keys.get(id(p), "other"))
            if id(p) in owners:
                trainable_in.add(owners[id(p)])
            else:
                added += p.numel()
    result = sum(components.values()) + added if whole_model_result else trainable
    from .base_weights import convertible_counts, excluded_names, excluded_weights
    from .block_swap import block_list_names, block_sizes, swappable_blocks

    denoiser = bundle.denoiser
    lists = block_list_names(bundle)
    # the excluded layers' weights are left out of the conversion as the trained ones are
    unconverted = seen | {id(w) for w in excluded_weights(denoiser, exclude)} if exclude else seen
    fp8, rows = convertible_counts(denoiser, unconverted)
    blocks = tuple(block_sizes(denoiser, trainable=seen, lists=lists))
    block_rows = tuple(convertible_counts(block, unconverted)[1] for block in swappable_blocks(denoiser, lists))
    block_trained = tuple(
        sum(p.numel() for p in block.parameters() if id(p) in seen) for block in swappable_blocks(denoiser, lists)
    )
    unused = [pattern for pattern, names in excluded_names(denoiser, exclude, seen).items() if not names]
    text_encoders = {}
    # a bundle-like object without a declared family (a method's own test double) has no encoders to count
    for spec in getattr(getattr(bundle, "family_spec", None), "text_encoders", ()):
        module = bundle.components().get(spec.component)
        if module is not None:
            frozen, frozen_rows = convertible_counts(module, seen)
            text_encoders[spec.component] = (frozen, frozen_rows, convertible_counts(module, set())[0] - frozen)
    return ParameterPlan(
        components,
        trainable,
        added,
        frozenset(trainable_in),
        result,
        fp8,
        blocks,
        largest,
        tuple(tensors),
        tuple(tensor_blocks),
        rows,
        block_rows,
        tuple(unused),
        type(denoiser).__name__,
        text_encoders=text_encoders,
        block_trained=block_trained,
    )


# ----------------------------------------------------------------------------------------------------------
# activations


@dataclass(frozen=True)
class _Block:
    kind: str  # "res" or "tf"
    c_in: int
    c_out: int
    area: float  # latent elements per channel at this level

    def units(self, k_res: float, k_tf: float, k_ctx: float, tokens: int = 77) -> float:
        if self.kind == "res":
            return k_res * (self.c_in + self.c_out) * self.area
        return k_tf * self.c_out * self.area + k_ctx * self.c_out * tokens

    def input_units(self) -> float:
        return self.c_in * self.area


def _per_level(value: Any, levels: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)] * levels


def unet_blocks(unet_config: dict[str, Any], latent_area: float) -> list[_Block]:
    """The ResNet and transformer blocks of a diffusers ``UNet2DConditionModel`` config with the
    channels and latent area each runs at (in forward order)."""
    channels = [int(c) for c in unet_config.get("block_out_channels", (320, 640, 1280, 1280))]
    levels = len(channels)
    layers = _per_level(unet_config.get("layers_per_block", 2), levels)
    depth = _per_level(unet_config.get("transformer_layers_per_block", 1), levels)
    down_types = list(unet_config.get("down_block_types") or ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"])
    up_types = list(unet_config.get("up_block_types") or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1))
    blocks: list[_Block] = []
    skips = [channels[0]]
    c_prev = channels[0]
    for level, (c, kind) in enumerate(zip(channels, down_types, strict=False)):
        area = latent_area / 4**level
        for _ in range(layers[level]):
            blocks.append(_Block("res", c_prev, c, area))
            if "CrossAttn" in kind:
                blocks.extend(_Block("tf", c, c, area) for _ in range(depth[level]))
            c_prev = c
            skips.append(c)
        if level < levels - 1:
            skips.append(c)  # the downsampler's output is a skip too
    mid_area = latent_area / 4 ** (levels - 1)
    c_mid = channels[-1]
    mid_type = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    blocks.append(_Block("res", c_mid, c_mid, mid_area))
    if mid_type and "CrossAttn" in str(mid_type):
        blocks.extend(_Block("tf", c_mid, c_mid, mid_area) for _ in range(depth[-1]))
    if mid_type:
        blocks.append(_Block("res", c_mid, c_mid, mid_area))
    reversed_channels = list(reversed(channels))
    reversed_depth = list(reversed(depth))
    reversed_layers = list(reversed(layers))
    c_prev = c_mid
    for index, (c, kind) in enumerate(zip(reversed_channels, up_types, strict=False)):
        level = levels - 1 - index
        area = latent_area / 4**level
        for _ in range(reversed_layers[index] + 1):
            skip = skips.pop() if skips else c
            blocks.append(_Block("res", c_prev + skip, c, area))
            if "CrossAttn" in kind:
                blocks.extend(_Block("tf", c, c, area) for _ in range(reversed_depth[index]))
            c_prev = c
    return blocks


def activation_bytes(
    unet_config: dict[str, Any],
    *,
    batch: int,
    resolution: int,
    vae_scale: int = 8,
    bytes_per_element: int = 4,
    gradient_checkpointing: bool = False,
    mode: str = "adapter",
    text_encoders: list[dict[str, Any]] | None = None,
    text_encoder_trains: bool = False,
) -> int:
    """Bytes autograd keeps for one micro-batch through the UNet (and a training text encoder)."""
    k_res, k_tf, k_ctx, _k_te = ACTIVATION_CONSTANTS[mode]
    side = resolution / vae_scale
    blocks = unet_blocks(unet_config, side * side)
    if gradient_checkpointing:
        units = sum(b.input_units() for b in blocks) + max(b.units(k_res, k_tf, k_ctx) for b in blocks)
    else:
        units = sum(b.units(k_res, k_tf, k_ctx) for b in blocks)
    total = units
    if text_encoder_trains:
        total += text_encoder_units(text_encoders or [], mode=mode, gradient_checkpointing=gradient_checkpointing)
    return math.ceil(batch * bytes_per_element * total)


def text_encoder_units(
    text_encoders: list[dict[str, Any]], *, mode: str = "adapter", gradient_checkpointing: bool = False
) -> float:
    """Activation elements of training text encoders (``K_TE * tokens * width * layers`` each; CLIP
    and T5 configs name their sizes differently)."""
    k_te = ACTIVATION_CONSTANTS[mode][3]
    total = 0.0
    for te in text_encoders:
        tokens = int(te.get("max_position_embeddings", te.get("n_positions", 77)) or 77)
        width = int(te.get("hidden_size", te.get("d_model", 768)))
        layers = int(te.get("num_hidden_layers", te.get("num_layers", 12)))
        te_units = k_te * tokens * width * layers
        total += te_units / layers * 2 if gradient_checkpointing else te_units
    return total


def transformer_tokens(config: dict[str, Any], latent_area: float, latent_channels: int) -> float:
    """Image tokens a diffusers transformer sees for ``latent_area`` latent cells: patches of
    ``patch_size`` squared, times packing (Flux packs 2x2 latent cells into its 64 input channels)."""
    patch = int(config.get("patch_size", 1) or 1)
    packing = latent_channels / int(config.get("in_channels", latent_channels) or latent_channels)
    return latent_area * packing / (patch * patch)


class TransformerShape(TypedDict):
    """The inputs :func:`transformer_activation_bytes` and :func:`offloaded_input_bytes` share (one micro-batch
    through a transformer denoiser): built once per estimate, so the device's and the host's share of the block
    inputs are counted from the same numbers."""

    batch: int
    resolution: int
    latent_channels: int
    context_tokens: int
    vae_scale: int
    bytes_per_element: int
    reference_images: int
    block_lists: Sequence[BlockList]


def transformer_activation_bytes(
    config: dict[str, Any],
    *,
    batch: int,
    resolution: int,
    latent_channels: int,
    context_tokens: int,
    vae_scale: int = 8,
    bytes_per_element: int = 4,
    gradient_checkpointing: bool = False,
    mode: str = "adapter",
    recomputed_blocks: int = 0,
    reference_images: int = 0,
    block_lists: Sequence[BlockList] = DEFAULT_BLOCK_LISTS,
    offload_inputs: bool = False,
) -> int:
    """Bytes autograd keeps for one micro-batch through a transformer denoiser (SD3's joint blocks,
    Flux's double and single blocks; :data:`TRANSFORMER_ACTIVATION_CONSTANTS`).

    ``block_lists`` (the family's ``ModelFamily.block_lists``) say which config keys count the blocks: each
    list whose ``depth_key`` the config has counts that many blocks, in order. With a single-stream list among
    them the blocks take Flux's constants (joint lists as its double blocks), else SD3's; a config with none
    of the keys counts as one block.

    ``recomputed_blocks`` (``--blocks-to-swap``) blocks always run checkpointed: they keep only
    their inputs, and one of them is recomputed at a time in backward. ``reference_images`` (FLUX.1
    Kontext) each add the image's tokens again: the reference's tokens run through every block beside
    the latents' (the control image is resized to the training image's size). ``offload_inputs``
    (``--cpu-offload-checkpointing``, with ``gradient_checkpointing``): the kept block inputs are in host
    memory (:func:`offloaded_input_bytes`); the device counts one block recomputed and two block inputs."""
    per, inputs = _transformer_block_units(config, resolution, latent_channels, context_tokens, vae_scale, mode,
                                           reference_images, block_lists)  # fmt: skip
    if gradient_checkpointing and offload_inputs:
        units = max(per) + 2 * inputs
    elif gradient_checkpointing:  # block inputs kept, one block recomputed at a time
        units = len(per) * inputs + max(per)
    else:  # the last ``recomputed`` blocks (the swapped ones) keep their inputs, one recomputed at a time
        recomputed = min(max(recomputed_blocks, 0), len(per))
        kept = per[: len(per) - recomputed]
        units = sum(kept) + (recomputed * inputs + max(per[len(kept) :]) if recomputed else 0)
    return math.ceil(batch * bytes_per_element * units)


def offloaded_input_bytes(config: dict[str, Any], shape: TransformerShape) -> int:
    """Host bytes ``--cpu-offload-checkpointing`` keeps: every block's input ``D (N + T)``, the term plain
    checkpointing counts on the device (:func:`transformer_activation_bytes` with the same ``shape``)."""
    per, inputs = _transformer_block_units(config, shape["resolution"], shape["latent_channels"],
                                           shape["context_tokens"], shape["vae_scale"], "adapter",
                                           shape["reference_images"], shape["block_lists"])  # fmt: skip
    return math.ceil(shape["batch"] * shape["bytes_per_element"] * len(per) * inputs)


def _transformer_block_units(
    config: dict[str, Any],
    resolution: int,
    latent_channels: int,
    context_tokens: int,
    vae_scale: int,
    mode: str,
    reference_images: int,
    block_lists: Sequence[BlockList],
) -> tuple[list[float], float]:
    """(each block's activation elements per sample, one block input's elements ``D (N + T)``)."""
    k_img, k_txt = TRANSFORMER_ACTIVATION_CONSTANTS[mode]
    width = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 64))
    side = resolution / vae_scale
    n = transformer_tokens(config, side * side, latent_channels) * (1 + max(reference_images, 0))
    inputs = width * (n + context_tokens)
    depths = [
        (block.stream, int(config.get(block.depth_key) or 0)) for block in block_lists if block.depth_key in config
    ]
    if any(stream == "single" for stream, _ in depths):  # Flux: double-stream then single-stream, measured apart
        k_double, k_single = FLUX_ACTIVATION_CONSTANTS[mode]
        per = [
            (k_single if stream == "single" else k_double) * inputs for stream, depth in depths for _ in range(depth)
        ]
    else:
        blocks = sum(depth for _, depth in depths) if depths else 1
        per = [width * (k_img * n + k_txt * context_tokens)] * blocks
    return per, inputs


# ----------------------------------------------------------------------------------------------------------
# the estimate


def swapped_block_bytes(
    params: ParameterPlan, options: TrainOptions, frozen_bytes: int, trained_bytes: int = 4
) -> tuple[int, int] | None:
    """``--blocks-to-swap``: (bytes of the swapped blocks' weights, bytes of the two largest of them,
    the copies in flight on the device), at the stored dtypes (``--base-weights-dtype``). On a full fine-tune
    with ``--fused-backward-pass`` the blocks' trained weights (``trained_bytes`` each) are swapped too."""
    from .memory_options import swaps_trained

    count = getattr(options, "blocks_to_swap", 0)
    if count <= 0 or not params.blocks:
        return None
    stored = base_weights_dtype(options)
    rows = params.block_rows if len(params.block_rows) == len(params.blocks) else (0,) * len(params.blocks)
    trained = params.block_trained if len(params.block_trained) == len(params.blocks) and swaps_trained(options) else (
        (0,) * len(params.blocks)
    )  # fmt: skip
    sizes = [
        (frozen - convertible) * frozen_bytes
        + (stored_weight_bytes(stored, convertible, n) if stored else convertible * frozen_bytes)
        + t * trained_bytes
        for (frozen, convertible), n, t in zip(params.blocks[-count:], rows[-count:], trained[-count:], strict=True)
    ]
    return math.ceil(sum(sizes)), math.ceil(sum(sorted(sizes)[-2:]))


def swapped_trained_elements(params: ParameterPlan, options: TrainOptions) -> int:
    """The trained elements ``--blocks-to-swap`` keeps in host memory (a full fine-tune with
    ``--fused-backward-pass``; 0 otherwise)."""
    from .memory_options import swaps_trained

    count = getattr(options, "blocks_to_swap", 0)
    if count <= 0 or len(params.block_trained) != len(params.blocks) or not swaps_trained(options):
        return 0
    return sum(params.block_trained[-count:])


def estimate_memory(
    layout: ModelLayout,
    params: ParameterPlan,
    options: TrainOptions,
    *,
    device: str = "cpu",
    text_encoder_frozen: bool = True,
    needs_pixels: bool = False,
    cast_frozen_weights: bool = True,
    reference_images: int = 0,
    partial_text_cache: tuple[str, ...] = (),
) -> MemoryEstimate:
    """The peak-memory estimate for training ``layout`` with ``options`` on ``device`` (``cpu``/``cuda``);
    ``reference_images``: FLUX.1 Kontext reference images per sample (more image tokens);
    ``partial_text_cache``: the text encoders whose outputs ``--cache-text-encoder-outputs`` caches while the
    others train (:func:`sdcore.train.cache.partial_text_encoders`, asked with the option on)."""
    o = options
    compute = element_bytes(o.mixed_precision)
    frozen_bytes = compute if cast_frozen_weights else 4
    latents_cached = o.cache_latents and not needs_pixels
    family = get_family(layout.family)
    cached_encoders = _cached_encoders(family, o, text_encoder_frozen, partial_text_cache)
    text_cached = bool(cached_encoders)
    stored = base_weights_dtype(o)
    te_stored = text_encoder_formats(o, [te.component for te in family.text_encoders])
    # --full-bf16/--full-fp16: the trained weights, their gradients and float optimizer states in 2 bytes
    full_half = bool(getattr(o, "full_bf16", False) or getattr(o, "full_fp16", False))
    trained = 2 if full_half else 4
    weights = 0.0
    for name, count in params.components.items():
        if device != "cpu":
            if name == "vae" and latents_cached:
                continue
            if name in cached_encoders:
                continue
        if name in params.trainable_in:
            weights += count * trained
            continue
        per = frozen_bytes
        if name == "vae" and o.mixed_precision == "fp16":
            per = 4
        if name == family.denoiser and stored:  # converted weights in their format, the rest as before
            weights += stored_weight_bytes(stored, params.denoiser_fp8, params.denoiser_rows)
            weights += (count - params.denoiser_fp8) * per
            continue
        if name in te_stored and name in params.text_encoders:  # --text-encoder-weights-dtype: the same formula
            elements, rows, _ = params.text_encoders[name]
            weights += stored_weight_bytes(te_stored[name], elements, rows) + (count - elements) * per
            continue
        weights += count * per
    weights += params.added * trained
    swapped = swapped_block_bytes(params, o, frozen_bytes, trained)
    swapped_host = 0
    if swapped:  # in CPU memory; two blocks' copies in flight on the device (on the CPU: beside them)
        weights += (-swapped[0] if device != "cpu" else 0) + swapped[1]
        swapped_host = swapped[0] if device != "cpu" else 0
    gradients = held_gradient_elements(params, o) * trained
    fused = fused_steps(o)
    optimizer = params.trainable * OPTIMIZER_STATE_BYTES.get(o.optimizer.lower(), 8.0)
    if full_half and "8bit" not in o.optimizer.lower():  # float states are created like the parameter (8-bit ones stay)
        optimizer /= 2
    full = bool(params.trainable_in & {family.denoiser})
    vae_blocks = layout.configs.get("vae", {}).get("block_out_channels", (128, 256, 512, 512))
    vae_scale = 2 ** (len(vae_blocks) - 1)
    checkpointed = checkpointing_on(o)
    # --cpu-offload-checkpointing: the block inputs in host memory (on a CPU run that is the same memory)
    offload = offloading(o) and device != "cpu" and family.denoiser != "unet"
    host = 0
    if family.denoiser == "unet":
        activations = activation_bytes(
            layout.configs["unet"],
            batch=o.batch_size,
            resolution=o.resolution,
            vae_scale=vae_scale,
            bytes_per_element=compute,
            gradient_checkpointing=checkpointed,
            mode="full" if full else "adapter",
            text_encoders=_training_encoder_configs(layout, family, cached_encoders),
            text_encoder_trains=not text_encoder_frozen,
        )
    else:
        shape = TransformerShape(
            batch=o.batch_size,
            resolution=o.resolution,
            latent_channels=family.latent.channels,
            context_tokens=family.context_tokens,
            vae_scale=vae_scale,
            bytes_per_element=compute,
            reference_images=reference_images,
            block_lists=family.block_lists,
        )
        config = layout.configs[family.denoiser]
        activations = transformer_activation_bytes(
            config,
            **shape,
            gradient_checkpointing=checkpointed,
            mode="full" if full else "adapter",
            recomputed_blocks=getattr(o, "blocks_to_swap", 0),
            offload_inputs=offload,
        )
        if offload:
            host = offloaded_input_bytes(config, shape)
        if not text_encoder_frozen:
            te_units = text_encoder_units(
                _training_encoder_configs(layout, family, cached_encoders),
                mode="full" if full else "adapter",
                gradient_checkpointing=checkpointed,
            )
            activations += math.ceil(o.batch_size * compute * te_units)
    # --ema: an fp32 copy of every trained parameter, here unless it lives in host memory (--ema-device cpu)
    ema_here = getattr(o, "ema", False) and (getattr(o, "ema_device", "same") == "same" or device == "cpu")
    ema = params.trainable * 4 if ema_here else 0
    if ema and swapped and device != "cpu":  # each average lives beside its weight: a swapped one's on the host
        averaged = swapped_trained_elements(params, o)
        ema -= averaged * 4
        swapped_host += averaged * 4
    runtime = 0
    if device == "cpu":
        runtime = CPU_RUNTIME_BYTES + CPU_TOKENIZER_BYTES * len(layout.configs.get("text_encoders") or [])
    return MemoryEstimate(
        device=device,
        runtime=runtime,
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=activations,
        ema=ema,
        host=host,
        swapped_host=swapped_host,
        settings={
            "batch_size": o.batch_size,
            "resolution": o.resolution,
            "mixed_precision": o.mixed_precision,
            "gradient_checkpointing": checkpointed,
            "cpu_offload_checkpointing": offloading(o),
            "optimizer": o.optimizer,
            "fp8_base": stored == "fp8",
            "base_weights_dtype": stored or "none",
            "text_encoder_weights_dtype": dict(te_stored),
            "full_half": full_half,
            "fused_backward_pass": fused,
            "blocks_to_swap": getattr(o, "blocks_to_swap", 0),
            "latents_cached": latents_cached,
            "text_cached": text_cached,
            "text_cached_encoders": sorted(cached_encoders),
            "trainable_parameters": params.trainable,
        },
    )


def _cached_encoders(
    family: Any, options: TrainOptions, text_encoder_frozen: bool, partial: tuple[str, ...]
) -> frozenset[str]:
    """The text encoders (components) whose outputs the run caches: all with the option and frozen encoders,
    ``partial``'s with the option while the others train, else none."""
    if not options.cache_text_encoder_outputs:
        return frozenset()
    if text_encoder_frozen:
        return frozenset(te.component for te in family.text_encoders)
    return frozenset(partial)


def _training_encoder_configs(layout: ModelLayout, family: Any, cached: frozenset[str]) -> list[dict[str, Any]]:
    """The layout's text-encoder configs without the cached ones (run once, without gradients); the configs
    follow the family's order when the layout has every encoder, else a T5 (``d_model``) is told by its keys."""
    configs: list[dict[str, Any]] = list(layout.configs.get("text_encoders") or [])
    if not cached:
        return configs
    specs = family.text_encoders
    if len(configs) == len(specs):
        return [c for c, spec in zip(configs, specs, strict=True) if spec.component not in cached]
    t5_cached = any(spec.kind.startswith("t5") for spec in specs if spec.component in cached)
    return [c for c in configs if not (t5_cached and "d_model" in c)]


def held_gradient_elements(params: ParameterPlan, options: TrainOptions) -> int:
    """Gradient elements alive at the peak: all of them, or with ``--fused-backward-pass`` the largest
    tensor's (each is freed once its tensor stepped, before the next is accumulated), or with
    ``--fused-optimizer-groups N`` the largest group's (freed when the group steps); see :mod:`.fused`.
    With gradient accumulation every gradient waits for the update's last micro-batch: all of them."""
    if options.gradient_accumulation > 1:
        return params.trainable
    count = getattr(options, "fused_optimizer_groups", 0)
    if count and params.tensors:
        sizes = [n for n, _ in params.tensors]
        return max(sum(sizes[i] for i in members) for members in kohya_groups([r for _, r in params.tensors], count))
    if getattr(options, "blockwise_fused_optimizers", False) and params.tensor_blocks:
        per_block: dict[str, int] = {}
        for (n, _), key in zip(params.tensors, params.tensor_blocks, strict=True):
            per_block[key] = per_block.get(key, 0) + n
        return max(per_block.values())
    if fused_steps(options):
        return params.largest_trainable
    return params.trainable


def device_free_memory(device: Any) -> int | None:
    """Bytes that can still be allocated on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a
    ``torch.device``): for a GPU ``torch.cuda.mem_get_info``'s free memory plus what PyTorch's caching
    allocator holds unused; for the CPU the host's available memory (``MemAvailable``: the page cache of
    the model files read counts as available), else the OS's available pages; ``None`` when unknown."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cuda":
        try:
            import torch

            free, _total = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except Exception:
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def training_device() -> str:
    """The device accelerate will train on: ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Suggestion:
    flags: str
    estimate: MemoryEstimate
    fits: bool


def suggestions(
    layout: ModelLayout,
    params: ParameterPlan,
    options: TrainOptions,
    budget: int,
    *,
    device: str = "cpu",
    text_encoder_frozen: bool = True,
    needs_pixels: bool = False,
    cast_frozen_weights: bool = True,
    optimizer_8bit_available: bool = True,
    steps_in_backward: bool = False,
    reference_images: int = 0,
    partial_text_cache: tuple[str, ...] = (),
    batch_from_data: bool = False,
) -> list[Suggestion]:
    """Option changes that lower the estimate, each with its estimate and whether it fits ``budget``
    (gradient checkpointing, 8-bit AdamW, cached text-encoder outputs, bf16, an fp8 base and block
    swap where the method trains adapters, ``--cpu-offload-checkpointing`` on a transformer's blocks where it
    takes more than the two block inputs in flight off the device (its estimate's ``host`` says what goes to
    host memory: :func:`offloaded_input_bytes`), the fused backward pass where it trains whole weights
    (``steps_in_backward``), smaller batches, all together). Block swap and the offload are refused together:
    both are offered alone, and "all together" takes the one that saves more. ``batch_from_data``: the
    dataset config gives the batch sizes (a kohya ``[[datasets]]``/``[general]`` ``batch_size`` wins over
    ``--batch-size``, as in kohya), so no ``--batch-size`` change is offered: it would change nothing."""
    o = options

    def trial(change: dict[str, Any]) -> MemoryEstimate:
        return estimate_memory(
            layout,
            params,
            replace(options, **change),
            device=device,
            text_encoder_frozen=text_encoder_frozen,
            needs_pixels=needs_pixels,
            cast_frozen_weights=cast_frozen_weights,
            reference_images=reference_images,
            partial_text_cache=partial_text_cache,
        )

    variants: list[tuple[str, dict[str, Any]]] = []
    if not checkpointing_on(o):
        variants.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if o.optimizer in ("adamw", "prodigy", "lion") and optimizer_8bit_available:
        variants.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if not o.cache_text_encoder_outputs and (text_encoder_frozen or partial_text_cache):
        variants.append(("--cache-text-encoder-outputs", {"cache_text_encoder_outputs": True}))
    if not o.cache_latents and not needs_pixels:
        variants.append(("--cache-latents", {"cache_latents": True}))
    if o.mixed_precision == "no":
        variants.append(("--mixed-precision bf16", {"mixed_precision": "bf16"}))
    if not base_weights_dtype(o) and params.denoiser_fp8 and params.trainable_in.isdisjoint({"unet", "transformer"}):
        variants.append(("--fp8-base", {"fp8_base": True}))
    swap: tuple[str, dict[str, Any]] | None = None
    from .memory_options import swaps_trained

    # frozen blocks, or a full fine-tune's trained ones where they may be swapped (--fused-backward-pass)
    swappable = not params.trainable_in or swaps_trained(o)
    if not getattr(o, "blocks_to_swap", 0) and len(params.blocks) > 2 and swappable:
        # two swapped blocks are in flight anyway: the fewest blocks (3 or more) that fit, else all
        count = next(
            (n for n in range(3, len(params.blocks) + 1) if trial({"blocks_to_swap": n}).total <= budget),
            len(params.blocks),
        )
        swap = (f"--blocks-to-swap {count}", {"blocks_to_swap": count})
    offload: tuple[str, dict[str, Any]] | None = None
    offloaded: dict[str, Any] = {"cpu_offload_checkpointing": True}
    if (
        hasattr(o, "cpu_offload_checkpointing")
        and not offloading(o)
        and device != "cpu"  # host and device are one memory: nothing moves off the device
        and not offload_family_problems(replace(o, **offloaded), layout.family)  # SD3/FLUX.1/Chroma blocks
        and not offload_option_problems(replace(o, **offloaded))  # refused with --blocks-to-swap
    ):
        with_checkpointing = trial({"gradient_checkpointing": True}) if not checkpointing_on(o) else None
        baseline = with_checkpointing.total if with_checkpointing is not None else trial({}).total
        if trial(offloaded).total < baseline:  # block inputs beyond the two in flight: the activations matter
            offload = (OFFLOAD_FLAG, offloaded)
    # --blocks-to-swap and --cpu-offload-checkpointing are refused together: each is offered alone, and
    # the one that saves more on its own goes first, so that the combination below takes it
    variants += sorted((v for v in (swap, offload) if v is not None), key=lambda v: trial(v[1]).total)
    if (
        not fused_steps(o)
        and steps_in_backward  # the method trains whole weights (kohya offers it for full fine-tunes)
        and o.optimizer.lower() in FUSED_OPTIMIZERS
        and o.gradient_accumulation == 1
        and o.mixed_precision != "fp16"
    ):
        variants.append(("--fused-backward-pass", {"fused_backward_pass": True}))
    batch = 1 if batch_from_data else o.batch_size
    while batch > 1:
        batch //= 2
        accum = o.gradient_accumulation * (o.batch_size // batch)
        variants.append(
            (
                f"--batch-size {batch} --gradient-accumulation {accum}",
                {"batch_size": batch, "gradient_accumulation": accum},
            )
        )
    if len(variants) > 1:
        combined: dict[str, Any] = {}
        names = []
        for flags, change in variants:
            if "batch_size" in change and ("batch_size" in combined or combined.get("fused_backward_pass")):
                continue  # one batch change; none with the fused pass (it needs accumulation 1)
            if offload_option_problems(replace(o, **{**combined, **change})):
                continue  # a pair the run refuses (--cpu-offload-checkpointing with --blocks-to-swap)
            combined.update(change)
            names.append(flags)
        variants.append((" ".join(names), combined))
    out = []
    for flags, change in variants:
        estimate = trial(change)
        out.append(Suggestion(flags, estimate, estimate.total <= budget))
    return out
