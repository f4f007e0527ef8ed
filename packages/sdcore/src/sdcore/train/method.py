"""The method contract: the small part of training that differs between LoRA, TI, DreamBooth...

A plugin subclasses ``TrainingMethod[MyOptions]``, sets ``name`` and ``options_class`` and
implements ``prepare`` and ``save`` (and overrides the other hooks only when it must). The runtime in
:mod:`sdcore.train.loop` owns everything else: data, buckets, caching, noise and timesteps,
v-prediction, min-SNR, mixed precision, optimizer and schedule, accelerate, checkpoints and resume,
sampling, progress and logs.

Decisions:

- **One source of truth for options.** The method object owns them: ``method.options`` is typed as
  the method's own options class (``TrainingMethod[LoraOptions]`` gives ``self.options:
  LoraOptions``) and ``train(method)`` trains with exactly those. Nothing in the runtime or a
  method mutates them during a run.
- **Capabilities are declared once**: :meth:`TrainingMethod.capabilities` returns a frozen
  :class:`Capabilities`; the runtime reads it once per run (it may depend on the options, e.g.
  APT needs pixels only with ``--reconstruction``).
- **Extra datasets are explicit**: :meth:`TrainingMethod.regularization_data` names a folder of
  class images the method adds (DreamBooth's generated class images) instead of changing
  ``options.reg_data``.
- **Method-specific metadata** (kohya ``ss_*`` keys for LoRA) comes from the method's ``save``;
  the runtime only passes generic facts in :class:`SaveInfo`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from .options import TrainOptions

if TYPE_CHECKING:
    import torch

    from ..data.dataset import DatasetIndex, ImageEntry
    from ..models.bundle import ModelBundle
    from ..models.family import ModelFamily

OptionsT = TypeVar("OptionsT", bound=TrainOptions)


def text_encoding_options(options: TrainOptions, family: ModelFamily) -> dict[str, Any]:
    """The ``encode_prompts`` options of a run's T5 and SD3 CLIP encoders: T5's length and mask (kohya's
    ``--t5xxl_max_token_length``, ``--apply_t5_attn_mask``) on a family with T5, SD3's CLIP mask
    (``--apply_lg_attn_mask``). Its captions are encoded with them and so are its sample prompts (the
    ``text_encoding`` of :func:`sdcore.generate.pipeline.generate_images`), as kohya's samplers encode with the
    run's own strategy (``flux_train_utils.sample_image_inference``, ``sd3_train_network.py``'s
    ``sample_prompts_te_outputs``). Empty on the CLIP-only families."""
    out: dict[str, Any] = {}
    if any(encoder.kind.startswith("t5") for encoder in family.text_encoders):
        out["t5_max_length"] = options.t5xxl_max_token_length
        out["t5_attention_mask"] = options.apply_t5_attn_mask
    if options.apply_lg_attn_mask:
        out["lg_attention_mask"] = True  # SD3 only (the pre-flight refuses it elsewhere)
    return out


#: :meth:`TrainingMethod.lr_fallback_parts` of a method without per-part rates: all it trains reads --lr
ALL_AT_LR = "everything the method trains"


@dataclass(frozen=True)
class Capabilities:
    """What a method needs from the runtime, declared once (see :meth:`TrainingMethod.capabilities`)."""

    #: the runtime passes decoded pixels in the batch (APT reconstruction loss); latents cannot be cached
    needs_pixels: bool = False
    #: class (regularisation) images are drawn to match the instance images each epoch (kohya)
    balance_class: bool = True
    #: ``caption_for`` is random (templates): cache several caption variants like shuffled tags
    random_captions: bool = False
    #: under mixed precision the frozen weights are stored in fp16/bf16 to save memory; methods
    #: that save the whole model (DreamBooth) set False so frozen parts are saved at full precision
    cast_frozen_weights: bool = True
    #: something in the text encoders trains: their outputs are not cached and gradient
    #: checkpointing (when asked) also covers them
    trains_text_encoder: bool = False
    #: with ``trains_text_encoder``: the text encoders that train, by kohya's number (1 CLIP-L/OpenCLIP, 2 CLIP-G,
    #: 3 T5; :func:`sdcore.models.family.text_encoder_slot`); ``None``: every one. A family's
    #: ``partial_text_cache`` encoders outside this set may then have their outputs cached while the others
    #: train (:func:`sdcore.train.cache.partial_text_encoders`; the method's encoding must be the family's,
    #: :meth:`TrainingMethod.encodes_as_family`). Since 0.1. Named without the family (a method's capabilities know
    #: none): slots the family lacks mean nothing, and a family with one text encoder is never split, so for it
    #: ``trains_text_encoder`` alone says that its encoder trains (Chroma's lone T5 under a method naming {1, 2}).
    trained_text_encoders: frozenset[int] | None = None
    #: False: a sample's conditioning depends on the other captions of its batch (kohya's
    #: ``no_token_padding`` pads to the longest one), so captions are encoded every step even when
    #: the text encoders are frozen (no text-encoder output cache)
    cacheable_text: bool = True
    #: the saved result is the whole model (DreamBooth), not only the trained tensors: sizes the
    #: disk estimate of the pre-flight
    saves_whole_model: bool = False
    #: the method scales what it trains per sample by the sample's dataset strength (kohya's per-dataset
    #: ``network_multiplier``, e.g. +1 and -1 datasets for a "slider" LoRA) in
    #: :meth:`TrainingMethod.network_strength`; without it the pre-flight refuses strengths other than 1
    per_sample_strength: bool = False
    #: the method trains whole model weights, so ``--fused-backward-pass`` may step each tensor inside
    #: backward (kohya offers it in its full fine-tune scripts only; its ``train_network.py`` ignores the
    #: flag and clips all gradients together, so adapter methods leave this False)
    steps_in_backward: bool = False
    #: the method trains a FLUX.1 control LoRA (``sdcore train lora --control-lora``): each sample's control image
    #: (``--control-dir``) joins the noisy latents on the channels of a widened ``img_in`` rather than as FLUX.1
    #: Kontext's reference tokens, and the pre-flight checks the model and data for it (:mod:`.control_lora`)
    control_channels: bool = False


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for a batch (the family adapter's ``encode_prompts``
    makes it, its ``predict`` reads it).

    ``hidden_states`` is ``encoder_hidden_states`` (SD1/SD2/SDXL: [B, 77*k, C]); ``pooled`` is the
    pooled text embedding (SDXL's ``text_embeds``, SD3/Flux ``pooled_projections``), ``None`` for
    SD1/SD2. ``extra`` holds any other per-sample tensors a family needs (e.g. a T5 attention
    mask), each with the batch as its first dimension: caches slice and stack them like the rest.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: Any = None, dtype: Any = None) -> Conditioning:
        """Move (and cast the floating-point tensors; masks and ids keep their dtype)."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        extra = {
            key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            for key, value in self.extra.items()
        }
        return Conditioning(self.hidden_states.to(device=device, dtype=dtype), pooled, extra)

    def select(self, index: int) -> Conditioning:
        """Sample ``index`` as a batch of one (copies, so a cache does not keep the whole batch)."""
        pooled = None if self.pooled is None else self.pooled[index : index + 1].clone()
        extra = {key: value[index : index + 1].clone() for key, value in self.extra.items()}
        return Conditioning(self.hidden_states[index : index + 1].clone(), pooled, extra)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Stack conditionings of equal shapes along the batch."""
        import torch

        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])  # type: ignore[misc]
        extra = {key: torch.cat([c.extra[key] for c in items]) for key in items[0].extra}
        return Conditioning(torch.cat([c.hidden_states for c in items]), pooled, extra)


@dataclass
class Batch:
    """One training batch as the runtime hands it to a method.

    ``latents`` are already scaled by the VAE scaling factor. ``pixels`` ([-1, 1]) are present
    only when the method sets ``needs_pixels``. ``loss_weights`` carries per-sample weights
    (the prior-preservation weight for class images, 1.0 otherwise). SDXL size conditioning is in
    ``original_sizes``/``crop_coords``/``target_sizes`` as (h, w) pairs. ``network_strength`` ([B]) is
    each sample's dataset strength (kohya's per-dataset ``network_multiplier``), ``None`` when every
    sample's is 1, so that the usual run takes exactly the path it always took.
    """

    latents: torch.Tensor
    captions: list[str]
    is_class: torch.Tensor
    loss_weights: torch.Tensor
    original_sizes: list[tuple[int, int]]
    crop_coords: list[tuple[int, int]]
    target_sizes: list[tuple[int, int]]
    pixels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    conditioning: Conditioning | None = None  # set by the runtime from the text-encoder cache
    #: partial text-encoder caching: the frozen encoders' cached outputs for ``captions``; the step runs the
    #: training encoders and joins them (:meth:`TrainingMethod.encode_partial`); None otherwise
    cached_text: Conditioning | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    network_strength: torch.Tensor | None = None
    #: FLUX.1 Kontext's clean reference latents ``[B, C, h, w]`` (scaled like ``latents``), one per sample, from
    #: the dataset's control images (:mod:`sdcore.train.kontext_data`); None without control images
    reference_latents: torch.Tensor | None = None
    #: an inpainting model's conditioning (:mod:`sdcore.train.inpainting`): the mask at latent size (``[B, 1, h, w]``
    #: for an SD inpainting UNet, ``[B, 64, h, w]`` for FLUX.1 Fill; 1 = repaint) and the masked image's latents
    #: ``[B, C, h, w]`` (scaled like ``latents``); None for other models
    inpainting_mask: torch.Tensor | None = None
    masked_latents: torch.Tensor | None = None


@dataclass
class StepContext:
    """Everything a method's custom loss may need for one micro-batch."""

    bundle: ModelBundle
    batch: Batch
    noisy_latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    step: int
    conditioning: Conditioning
    predict: Any  # predict(conditioning) -> model output, for methods needing several passes (APT)


@dataclass(frozen=True)
class RunFacts:
    """Read-only facts about the run for a method's metadata (kohya ``ss_*`` keys in LoRA files)."""

    total_steps: int
    started_at: float
    #: the dataset entries that train (``sdcore.data.dataset.ImageEntry``: subset folder, repeats, caption,
    #: is_class); images held out for the validation loss are not among them
    entries: tuple[ImageEntry, ...] = ()
    family: str = ""
    #: held-out images times repeats (``--validation-split``; kohya's ``ss_num_validation_images``)
    validation_images: int = 0
    #: micro-batches of the first epoch on this process (kohya's ``ss_num_batches_per_epoch``, the length of
    #: its prepared dataloader); 0 where unknown
    batches_per_epoch: int = 0
    #: epochs the run lasts: ``--epochs``, or the epochs ``--max-steps`` reaches (kohya's ``ss_num_epochs``,
    #: ``ceil(max_train_steps / steps per epoch)``); 0 where unknown
    epochs: int = 0


@dataclass(frozen=True)
class ProcessInfo:
    """The processes of a run (``accelerate launch``): how many train together and which one this is.

    A method reads it as :attr:`TrainingMethod.processes` from :meth:`TrainingMethod.prepare` on (e.g. a
    learning rate scaled by the total batch, diffusers' ``--scale_lr``). Since 0.1.
    """

    num_processes: int = 1
    process_index: int = 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @classmethod
    def from_environment(cls) -> ProcessInfo:
        """What the launcher's environment says (``WORLD_SIZE``, ``RANK``): the pre-flight's view, before the
        runtime's accelerator exists (the runtime then sets the accelerator's own numbers)."""
        import os

        from ..console import launcher_rank

        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return cls(num_processes=max(world, 1), process_index=launcher_rank())


@dataclass(frozen=True)
class SaveInfo:
    """Passed to ``save``: where the runtime wants the result and the generic metadata to include.

    ``metadata`` holds the runtime's own keys (``sdcore_method``, base model, family); a method adds
    its format's keys itself (LoRA writes kohya's ``ss_*`` from ``run``).
    """

    path: Path
    step: int
    epoch: int
    metadata: dict[str, str]
    final: bool
    run: RunFacts | None = None


class TrainingMethod(Generic[OptionsT]):
    """Base class of every training method: ``class MyMethod(TrainingMethod[MyOptions])``.

    Subclasses set the class attributes and implement :meth:`prepare` and :meth:`save`.
    """

    name: ClassVar[str] = ""
    #: the options dataclass the CLI and configs build (must be the ``OptionsT`` class)
    options_class: ClassVar[type[TrainOptions]] = TrainOptions
    #: default output name suffix when ``--output`` names a folder
    output_suffix: ClassVar[str] = ".safetensors"
    #: option names that decide the shapes of the trained tensors (LoRA rank, TI vector count): a
    #: ``--resume`` state saved with other values is refused in the pre-flight, before any loading
    resume_shape_options: ClassVar[tuple[str, ...]] = ()
    #: the option that starts a new run from a saved result (LoRA: ``--network-weights``), named where a
    #: run could write its result but no resumable state (one process of several failed); ``None``: the
    #: method has none. Since 0.1.
    start_from_result: ClassVar[str | None] = None
    #: the run's processes, set on the instance by the runtime before :meth:`prepare` (from its accelerator; in
    #: the pre-flight's plan from the launcher's environment); one process when a method is used outside a run.
    #: Read it rather than creating ``accelerate.PartialState()`` yourself, which in the pre-flight would set up
    #: the distributed state before the runtime's accelerator and its settings. Since 0.1.
    processes: ProcessInfo = ProcessInfo()

    def __init__(self, options: OptionsT) -> None:
        if not isinstance(options, self.options_class):
            raise TypeError(f"{type(self).__name__} needs {self.options_class.__name__}, got {type(options).__name__}")
        self.options: OptionsT = options

    def capabilities(self) -> Capabilities:
        """What this method needs from the runtime (read once per run, after :meth:`validate`)."""
        return Capabilities()

    # --- setup -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`sdcore.errors.ConfigError` for contradictory options (before any model loads)."""

    def lr_fallback_parts(self) -> list[str]:
        """What trains at ``--lr`` for want of a rate of its own, named for a message (``"the U-Net (--unet-lr)"``).
        The pre-flight refuses ``--lr 0`` only where this is not empty: a method whose every trained part has its
        own positive rate (kohya's LoRA with ``unet_lr`` and ``text_encoder_lr`` beside ``learning_rate = 0``, as
        kohya_ss GUI presets write it) trains without one. The default: everything trains at ``--lr``. A part whose
        fallback is known only with the model's family is checked in :meth:`family_problems`. Since 0.1."""
        return [ALL_AT_LR]

    def family_problems(self, family: str) -> list[str]:
        """Options of this method that do not apply to the model's ``family`` (e.g. kohya's block-wise
        LoRA options, defined for SD1/SD2/SDXL only), one message each. The pre-flight calls this with
        the family read from the model's header, so such problems are reported before any weights
        load, together with every other problem. Since 0.1."""
        return []

    def dataset_problems(self, index: DatasetIndex) -> list[str]:
        """What makes the scanned dataset wrong for this method, one message each (e.g. a new-token method whose
        token no caption contains: ``entry.written_caption`` of ``index.instance_entries``). The pre-flight calls
        it once the dataset is indexed, before any model loads, and reports these with every other problem.
        ``index`` holds the instance and class images (``--reg-data``), not class images the method makes in
        :meth:`prepare`. Since 0.1."""
        return []

    def dataset_notes(self, index: DatasetIndex) -> list[str]:
        """Remarks on the scanned dataset that do not stop the run (printed before training and by
        ``--dry-run``), one line each; called with :meth:`dataset_problems`. Since 0.1."""
        return []

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        """Freeze, inject or unfreeze, then return optimizer parameter groups.

        Each group is a dict with ``params`` and optionally ``lr`` (otherwise ``options.lr``) and
        ``name`` (shown in logs). Called once, after the model is loaded and before caching.
        """
        raise NotImplementedError

    def plan_groups(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        """The parameter groups :meth:`prepare` would return, on a shapes-only ``bundle`` (every
        parameter on the meta device), for the memory plan and the disk estimate.

        Called on a throwaway instance (a copy of the options) before any weight loads. The default
        runs :meth:`prepare`; override it when ``prepare`` does more than freeze, inject or unfreeze
        (DreamBooth renders class images first).
        """
        return self.prepare(bundle)

    def result_bytes(self, bundle: ModelBundle) -> int | None:
        """The bytes one saved result takes on disk, for the pre-flight's disk estimate, or ``None``: the
        trained parameters at ``--save-dtype`` (a LoRA file: its tensors and a small header).

        Called on the throwaway instance right after :meth:`plan_groups` ran on the shapes-only ``bundle``
        (meta tensors: sizes only). Methods whose files are not their tensors at ``--save-dtype`` say their
        own (an embedding is always fp32 in a pickled dict, DreamArtist writes two). Since 0.1.
        """
        return None

    def plan_notes(self) -> list[str]:
        """Lines for the pre-flight plan (``--dry-run``) about what :meth:`plan_groups` built, e.g. a LoRA's
        modules and their ranks when they differ per module. Called on the throwaway instance right after
        :meth:`plan_groups` ran on the shapes-only bundle. Since 0.1."""
        return []

    def regularization_data(self) -> Path | None:
        """A folder of class (regularisation) images this method adds to the dataset, or ``None``.

        Called after :meth:`prepare` (which may have generated the images, as DreamBooth does);
        the runtime indexes it as class images like ``--reg-data``. The user's ``--reg-data``
        wins when both are given.
        """
        return None

    def caption_for(self, caption: str, *, is_class: bool, rng: Any) -> str:
        """Turn a dataset caption into the prompt used for training (TI templates do more)."""
        return caption

    def is_auxiliary_file(self, path: Path) -> bool:
        """True for files in the dataset folders that belong to the method, not training images.

        DreamArtist keeps attention maps as ``<image>_att.png`` beside the images; the runtime
        leaves such files out of the dataset (and reports how many) instead of training on them.
        """
        return False

    def loss_mask(self, entry: ImageEntry, assignment: Any, *, flipped: bool, latent_size: tuple[int, int]) -> Any:
        """Per-pixel loss weights ``[1, h, w]`` at latent size for one sample, or ``None``.

        Load the map with :func:`sdcore.train.data.load_pixels` on ``entry`` with another path so it
        gets exactly the image's resize, crop and flip. The runtime multiplies the element-wise loss
        by it (``Batch.masks``; samples without a map get ones).
        """
        return None

    # --- per step ----------------------------------------------------------------------------
    def encode(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """Encode captions to conditioning; the default is the family's encoder (its adapter's
        ``encode_prompts``) with the run's clip skip."""
        from ..models.family import family_adapter

        return family_adapter(bundle.family).encode_prompts(bundle, captions, **self.encode_options(bundle))

    def encodes_as_family(self) -> bool:
        """Whether :meth:`encode` is the family's encoding (its adapter's ``encode_prompts`` with
        :meth:`encode_options`) for this run's options. Partial text-encoder caching
        (:func:`sdcore.train.cache.partial_text_encoders`) joins cached and live parts of that encoding, so a
        method that encodes in its own way (TI's vectors, DreamBooth's ``--no-token-padding``) gets none.
        The default: True for a method that keeps :meth:`encode`; one that overrides it and delegates to the
        family's for some options says so here."""
        return type(self).encode is TrainingMethod.encode

    def encode_partial(
        self, bundle: ModelBundle, captions: list[str], cached: Conditioning | None = None
    ) -> Conditioning:
        """Partial text-encoder caching (:func:`sdcore.train.cache.partial_text_encoders`) with the default
        encoding: without ``cached``, the outputs of the family's ``partial_text_cache`` encoders alone (what the
        cache keeps); with it (those outputs for ``captions``), what :meth:`encode` returns, running only the
        other encoders (the ones that train)."""
        from ..models.family import family_adapter

        adapter: Any = family_adapter(bundle.family)
        options = self.encode_options(bundle)
        if cached is None:
            return adapter.encode_cached_part(bundle, captions, **options)  # type: ignore[no-any-return]
        return adapter.complete_encoding(bundle, captions, cached, **options)  # type: ignore[no-any-return]

    def encode_options(self, bundle: ModelBundle) -> dict[str, Any]:
        """The keyword options of the family's ``encode_prompts`` for this run (clip skip, T5 length and mask,
        SD3's CLIP mask: :func:`text_encoding_options`, weighted captions)."""
        options: dict[str, Any] = {"clip_skip": self.options.clip_skip}
        options.update(text_encoding_options(self.options, bundle.family_spec))
        if getattr(self.options, "weighted_captions", False):
            options["weighted"] = True  # the pre-flight allows it for the CLIP-only families
        return options

    def compute_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """Return a custom per-sample loss [B], or ``None`` for the runtime's denoising MSE."""
        return None

    def lr_lambda(self) -> Any:
        """A ``step -> factor`` callable on every group's ``lr`` that replaces ``--lr-scheduler``, or None.

        For methods with their own schedule syntax (TI/HN's A1111 strings ``"0.005:100, 1e-5"``):
        the runtime then builds ``torch.optim.lr_scheduler.LambdaLR(optimizer, method.lr_lambda())``
        and steps it once per optimizer step, so the factor for step ``s`` applies to update ``s``.
        """
        return None

    def before_optimizer_step(self, bundle: ModelBundle, step: int) -> None:
        """Called once per optimizer step with the step's final gradients (accumulated over the
        micro-batches, all-reduced across processes, unscaled and clipped to ``--max-grad-norm``), right
        before the optimizer applies them: the weights are still those the gradients were taken at
        (kohya's LoRA-GGPO reads its gradient and weight norms here). ``step`` is the number
        :meth:`on_step_end` gets after this step. An fp16 step the grad scaler then skips (inf/NaN
        gradients) is called too. Not called with ``--fused-backward-pass``: there the tensors step
        inside backward, so no moment holds every gradient (refuse your option with it). Since 0.1."""

    def on_step_end(self, bundle: ModelBundle, step: int) -> Mapping[str, float] | None:
        """Called after each optimizer step (e.g. rescale weights as LoRA's max-norm regularisation does;
        stopping the text encoder is the runtime's: :meth:`stop_text_encoder`).

        May return per-step values to report (``{"keys_scaled": 3}``): the runtime shows them on the
        progress bar, logs them to the trackers as ``train/<name>`` and passes them to the
        ``sdcore_on_train_step`` hooks with its own (since 0.1: returning ``None`` reports nothing).
        """
        return None

    def stop_text_encoder(self, bundle: ModelBundle) -> None:
        """Freeze what this method trains in the text encoders, for the rest of the run: ``requires_grad``
        False and ``grad`` None on those parameters (torch optimizers then skip them, weight decay
        included); everything else keeps training.

        The runtime decides when (:mod:`sdcore.train.te_stop`: ``--stop-text-encoder-at`` or
        ``--stop-text-encoder-after-epochs``, also after a resume past the stop) and calls this once,
        before the first optimizer step without the text encoder. Only methods whose options mix in
        :class:`~sdcore.train.te_stop.TextEncoderStopOptions` are called; they must override it. Since 0.1."""
        raise NotImplementedError(f"{type(self).__name__} offers a text-encoder stop but does not implement it")

    @contextlib.contextmanager
    def network_strength(self, strengths: torch.Tensor) -> Iterator[None]:
        """Scale what the method trains by ``strengths`` ([B], one per sample of the batch) inside the
        ``with`` block: the forward of sample ``b`` must equal the forward at a run-wide strength
        ``strengths[b]`` (LoRA: its change times ``strengths[b]``, kohya's per-dataset
        ``network_multiplier``).

        The runtime enters it around a micro-batch's forward and backward (so gradient checkpointing
        recomputes with the same strengths), and only when some sample's strength is not 1 and the
        method declares :attr:`Capabilities.per_sample_strength`. Since 0.1."""
        from ..errors import ConfigError

        raise ConfigError(
            f"the {self.name or type(self).__name__!r} method cannot scale its training per sample "
            "(dataset network_multiplier other than 1)"
        )
        yield  # pragma: no cover - a generator, for contextmanager

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[dict[str, Any]]:
        """Context for sample images during training; yields extra pipeline kwargs.

        The default yields nothing extra: injected modules are already active in the bundle.
        """
        yield {}

    def resolve_output(self, path: Path) -> Path:
        """Where the final result goes for ``--output path``.

        Default: a path without a suffix (or an existing folder) is a folder that receives
        ``<method name><output_suffix>``; any path with a suffix is used as given. Methods whose
        result may itself be a folder (a diffusers model) override this.
        """
        if self.output_suffix and (path.is_dir() or not path.suffix):
            return path / f"{self.name or 'result'}{self.output_suffix}"
        return path

    # --- state -------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, for resumable state (full precision, stable names)."""
        raise NotImplementedError

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        """Write the result in the user-facing format (atomically) and return its path."""
        raise NotImplementedError

    def saved_files(self, path: Path) -> list[Path]:
        """Every file or folder :meth:`save` wrote when it returned ``path`` (``path`` first): what ``--save-limit``
        deletes together when that intermediate result is pruned, and what a state records for a resumed run.
        One by default; a method whose save writes companions (TI's ``--format`` copy, APT's ``-neg`` pair) names
        them here, so nothing is ever found by a name pattern."""
        return [Path(path)]

    def load_result(self, bundle: ModelBundle, path: Path) -> None:
        """Apply a result written by :meth:`save` to a fresh ``bundle`` (optional, but the
        contract suite in :mod:`sdcore.testing.contract` requires it: save -> load must give the
        same outputs as the trained model). Called on an unprepared bundle."""
        raise NotImplementedError
