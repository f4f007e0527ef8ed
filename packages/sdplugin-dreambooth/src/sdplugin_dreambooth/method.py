"""DreamBooth: fine-tune the whole UNet (and optionally the text encoders) on a subject.

Prior preservation uses the runtime's class-image support: class images (generated here when
fewer than ``num_class_images`` exist) enter the dataset as regularisation images, the sampler
balances them against the instance images (kohya's scheme) and the runtime weights their loss by
``prior_loss_weight``. The result is a full checkpoint (single file or diffusers folder) that keeps
the base model's family and prediction type.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdcore.errors import ConfigError
from sdcore.models.family import text_encoder_slot
from sdcore.train.method import Capabilities, Conditioning, SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions

from .class_images import ensure_class_images
from .options import DreamBoothOptions

if TYPE_CHECKING:  # torch is imported where it is used: the class loads without it (`sdcore data check`)
    import torch
    from sdcore.models.bundle import ModelBundle


#: the per-encoder rate options and the encoder each names
_RATE_OPTIONS = (("te1_lr", 1, "CLIP-L (or SD2's OpenCLIP)"), ("te2_lr", 2, "CLIP-G"), ("te3_lr", 3, "T5"))


class DreamBoothMethod(TrainingMethod[DreamBoothOptions]):
    name: ClassVar[str] = "dreambooth"
    start_from_result: ClassVar[str | None] = "--model"  # the saved checkpoint is a whole model
    options_class: ClassVar[type[TrainOptions]] = DreamBoothOptions
    output_suffix: ClassVar[str] = ".safetensors"
    resume_shape_options: ClassVar[tuple[str, ...]] = ("train_text_encoder", "train_t5")

    def __init__(self, options: DreamBoothOptions) -> None:
        super().__init__(options)
        self._trainables: dict[str, Any] = {}

    # --- setup -------------------------------------------------------------------------------
    def validate(self) -> None:
        o = self.options
        if o.class_prompt and not (o.class_data or o.reg_data):
            raise ConfigError("--class-prompt needs --class-data (the folder to keep class images in)")
        if o.class_data and not o.class_prompt and not Path(o.class_data).is_dir():
            raise ConfigError(
                f"--class-data {o.class_data} does not exist and no --class-prompt was given to generate it"
            )
        if o.train_t5 and not o.train_text_encoder:  # kohya sd3_train.py asserts the same
            raise ConfigError("--train-t5 needs --train-text-encoder (kohya: T5 trains together with CLIP-L/G)")
        given = [f"--{name.replace('_', '-')}" for name, _slot, _what in _RATE_OPTIONS if getattr(o, name) is not None]
        if given and not o.train_text_encoder:
            raise ConfigError(f"{', '.join(given)} need --train-text-encoder (kohya ignores them without it)")
        if o.te3_lr is not None and not o.train_t5:
            raise ConfigError("--te3-lr is T5's rate: it needs --train-t5 (kohya --train_t5xxl)")
        if o.num_last_block_to_freeze < 0:
            raise ConfigError(f"--num-last-block-to-freeze must be 0 (off) or more, got {o.num_last_block_to_freeze}")
        for name, _slot, _what in _RATE_OPTIONS:
            value = getattr(o, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 (frozen) or positive, got {value}")
        if o.class_data and o.reg_data and Path(o.class_data) != Path(o.reg_data):
            raise ConfigError("give either --class-data or --reg-data, not both")
        if o.no_token_padding and o.clip_skip > 1:
            # kohya's get_hidden_states returns the last layer for unpadded ids (its early return), so
            # clip skip silently applied only to batches whose longest caption fills 77 tokens
            raise ConfigError(
                "--no-token-padding with --clip-skip: kohya's unpadded path ignores clip skip (except when a "
                "caption fills all 77 tokens); use one of them"
            )
        if o.block_lr is not None:
            from .block_lr import parse_block_lr

            try:
                parse_block_lr(o.block_lr)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if o.no_token_padding and o.weighted_captions:
            raise ConfigError(
                "--no-token-padding with --weighted-captions: kohya's weighted path pads to 77 tokens whatever "
                "no_token_padding says; use one of them"
            )

    def family_problems(self, family: str) -> list[str]:
        """kohya has ``--no_token_padding`` in train_db.py only: SD1/SD2 (one CLIP text encoder), and
        ``--block_lr`` in sdxl_train.py only (its 23 blocks are the SDXL U-Net's); a per-encoder rate or
        ``--train-t5`` needs the model to have that encoder."""
        from sdcore.errors import SdcoreError
        from sdcore.models.family import get_family

        o = self.options
        problems = []
        if o.no_token_padding and family not in ("sd1", "sd2"):
            problems.append(
                f"--no-token-padding (kohya's train_db.py option) is for SD1/SD2 models; this model is {family}"
            )
        if o.block_lr is not None and family != "sdxl":
            problems.append(f"--block-lr (kohya's sdxl_train.py option) is for SDXL models; this model is {family}")
        try:
            slots = {text_encoder_slot(spec.kind) for spec in get_family(family).text_encoders}
        except SdcoreError:
            return problems  # the pre-flight reports an unknown family itself
        for name, slot, what in _RATE_OPTIONS:
            if getattr(o, name) is not None and slot not in slots:
                problems.append(f"--{name.replace('_', '-')}: a {family} model has no {what} text encoder")
        if o.train_t5 and 3 not in slots:
            problems.append(f"--train-t5: a {family} model has no T5 text encoder")
        if o.num_last_block_to_freeze and family != "sd3":
            problems.append(
                f"--num-last-block-to-freeze is kohya's sd3_train.py option (SD3 MMDiT); this model is {family}"
            )
        return problems

    def capabilities(self) -> Capabilities:
        # frozen parts (VAE, a frozen text encoder) stay in full precision: they are saved too; a full
        # fine-tune may step in backward (--fused-backward-pass, kohya's sdxl/sd3/flux_train.py). The encoders
        # that train, by kohya's slot: SD3/FLUX.1's frozen T5 then has its outputs cached while CLIP trains
        # (kohya sd3_train.py's --use_t5xxl_cache_only; sdcore.train.cache.partial_text_encoders)
        trained = frozenset(s for s in (1, 2, 3) if self._slot_rate(s)) if self.options.train_text_encoder else None
        return Capabilities(
            trains_text_encoder=self.options.train_text_encoder,
            trained_text_encoders=trained,
            cast_frozen_weights=False,
            saves_whole_model=True,
            cacheable_text=not self.options.no_token_padding,  # padded to the batch's longest caption
            steps_in_backward=True,
        )

    def regularization_data(self) -> Path | None:
        """``--class-data`` (generated in :meth:`prepare` when ``--class-prompt`` asks for more)."""
        o = self.options
        return Path(o.class_data) if o.class_data and not o.reg_data else None

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        o = self.options
        if o.class_data and o.class_prompt:
            ensure_class_images(
                bundle,
                o.class_data,
                o.class_prompt,
                o.num_class_images,
                batch_size=o.class_batch_size,
                steps=o.class_steps,
                sampler=o.class_sampler,
                seed=o.seed,
                progress=o.progress,
            )
        return self._unfreeze(bundle)

    def plan_groups(self, bundle: Any) -> list[dict[str, Any]]:
        """What trains, without rendering class images (the pre-flight sizes a meta-device model)."""
        return self._unfreeze(bundle)

    def _unfreeze(self, bundle: Any) -> list[dict[str, Any]]:
        o = self.options
        for module in bundle.components().values():
            module.requires_grad_(False)
        denoiser = bundle.denoiser  # the UNet, or the transformer of SD3/Flux
        denoiser.requires_grad_(True)
        if o.num_last_block_to_freeze > 0:  # kohya sd3_train.py: the last N x_block tensors stay frozen
            from sdcore.models.sd3.convert import kohya_x_block_rules, shape_from_config

            rules = kohya_x_block_rules(shape_from_config(denoiser.config))
            params = dict(denoiser.named_parameters())
            for rule in rules[max(0, len(rules) - o.num_last_block_to_freeze) :]:
                for name in rule.diffusers:
                    params[name].requires_grad_(False)
        groups: list[dict[str, Any]]
        if o.block_lr is not None:  # kohya sdxl_train.py: a group per U-Net block, 0 = not trained
            from .block_lr import block_param_groups, parse_block_lr

            groups = block_param_groups(denoiser, parse_block_lr(o.block_lr))
        else:
            unet_params = [p for p in denoiser.parameters() if p.requires_grad]
            groups = [{"params": unet_params, "lr": o.lr, "name": "unet"}]
        self._trainables = {"unet": denoiser}  # "unet." keys in training states whatever the denoiser
        if o.train_text_encoder:
            rates = self.text_encoder_rates(bundle)
            same = len(set(rates.values())) == 1  # one group, as before per-encoder rates existed
            te_params: list[torch.nn.Parameter] = []
            for index, lr in rates.items():
                encoder = bundle.text_encoders[index]
                encoder.requires_grad_(True)
                self._trainables[f"text_encoder_{index}"] = encoder
                if same:
                    te_params += list(encoder.parameters())
                else:
                    groups.append({"params": list(encoder.parameters()), "lr": lr, "name": f"text_encoder_{index}"})
            if same and rates:
                groups.append({"params": te_params, "lr": next(iter(rates.values())), "name": "text_encoder"})
        return groups

    def text_encoder_rates(self, bundle: Any) -> dict[int, float]:
        """The text encoders that train with ``--train-text-encoder`` (index in ``bundle.text_encoders``) and
        their learning rates, as kohya's sdxl_train.py/sd3_train.py choose them: encoder *i* has
        ``--te{i}-lr`` (kohya ``--learning_rate_te{i}``; CLIP-L/OpenCLIP 1, CLIP-G 2, T5 3), else ``--te-lr``,
        else ``--lr``, and trains only when that rate is not 0; T5 trains only with ``--train-t5``."""
        rates: dict[int, float] = {}
        for index, spec in enumerate(bundle.family_spec.text_encoders):
            lr = self._slot_rate(text_encoder_slot(spec.kind))
            if lr:
                rates[index] = lr
        return rates

    def _slot_rate(self, slot: int) -> float:
        """The rate of the text encoder in kohya's ``slot`` (:meth:`text_encoder_rates`), 0 when it is frozen."""
        o = self.options
        if slot == 3 and not o.train_t5:
            return 0.0
        given = (o.te1_lr, o.te2_lr, o.te3_lr)[slot - 1]
        if given is not None:
            return given
        return o.te_lr if o.te_lr is not None else o.lr

    def encode(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """The family's encoding, or with ``--no-token-padding`` kohya's unpadded one."""
        if not self.options.no_token_padding:
            return super().encode(bundle, captions)
        return encode_unpadded(bundle, captions)

    def encodes_as_family(self) -> bool:
        """The family's encoding unless ``--no-token-padding`` (then :func:`encode_unpadded`): a partial
        text-encoder cache applies as it does to LoRA. A subclass that overrides :meth:`encode` again encodes
        its own way (the base class's default rule) unless it says otherwise."""
        return type(self).encode is DreamBoothMethod.encode and not self.options.no_token_padding

    def caption_for(self, caption: str, *, is_class: bool, rng: Any) -> str:
        if is_class and self.options.class_prompt:
            return self.options.class_prompt
        if not is_class and self.options.instance_prompt:
            return self.options.instance_prompt
        return caption

    # --- per step ----------------------------------------------------------------------------
    def stop_text_encoder(self, bundle: Any) -> None:
        """Freeze the text encoders (the runtime's stop: kohya's ``--stop_text_encoder_training`` or the
        epoch form, :mod:`sdcore.train.te_stop`); the denoiser keeps training."""
        for encoder in bundle.text_encoders:
            encoder.requires_grad_(False)
            for param in encoder.parameters():
                param.grad = None

    def resolve_output(self, path: Path) -> Path:
        """``--output x.safetensors`` is a single file; a folder (or ``--save-format diffusers``) a diffusers model."""
        if self.options.save_format == "diffusers" or (not path.suffix and self.options.save_format is None):
            return path
        return super().resolve_output(path)

    # --- state -------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """A host copy of every trained tensor, made one tensor at a time: a clone on the device would hold
        a second copy of the trained model there (a FLUX.1 transformer: 47 GB in fp32) while the state is
        written. ``copy=True``: a CPU model's snapshot must not change as training goes on."""
        state: dict[str, torch.Tensor] = {}
        for prefix, module in self._trainables.items():
            for key, value in module.state_dict().items():
                state[f"{prefix}.{key}"] = value.detach().to("cpu", copy=True)
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in self._trainables.items():
            own = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own)

    def save(self, bundle: Any, info: SaveInfo) -> Path:
        o = self.options
        fmt = o.save_format or ("single-file" if info.path.suffix in (".safetensors", ".ckpt") else "diffusers")
        metadata = dict(info.metadata)
        metadata.setdefault("sdcore.method", "dreambooth")
        return bundle.save(info.path, format=fmt, dtype=o.save_dtype, prune=True, metadata=metadata)

    def load_result(self, bundle: Any, path: str | Path) -> None:
        """Load a saved DreamBooth checkpoint's weights into ``bundle`` (same architecture)."""
        import torch
        from sdcore.models.load import load_model

        trained = load_model(str(path))
        with torch.no_grad():
            bundle.denoiser.load_state_dict(trained.denoiser.state_dict())
            for mine, theirs in zip(bundle.text_encoders, trained.text_encoders, strict=True):
                mine.load_state_dict(theirs.state_dict())


def unpadded_input_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """kohya's ``tokenizer(captions, padding=True, truncation=True)``: ``BOS + tokens + EOS`` cut at
    ``model_max_length`` (77), then padded with the pad token (EOS when the tokenizer has none) only up
    to the batch's longest row. A batch of one is not padded at all."""
    import torch

    limit = int(tokenizer.model_max_length)
    rows = tokenizer(list(captions), truncation=True, max_length=limit, padding=False, verbose=False).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = max(len(row) for row in rows)
    return torch.tensor([list(row) + [pad] * (longest - len(row)) for row in rows], dtype=torch.long)


def encode_unpadded(bundle: ModelBundle, captions: list[str]) -> Conditioning:
    """kohya train_db.py with ``--no_token_padding`` (``get_hidden_states``' early return): the text
    encoder's last hidden state (after its final layer norm) of :func:`unpadded_input_ids`, no attention
    mask, ``[B, L, C]`` with ``L <= 77``. The UNet's cross-attention takes any length."""
    tokenizer, encoder = bundle.tokenizers[0], bundle.text_encoders[0]
    ids = unpadded_input_ids(tokenizer, captions)
    device = next(encoder.parameters()).device
    return Conditioning(encoder(ids.to(device), return_dict=True).last_hidden_state)
