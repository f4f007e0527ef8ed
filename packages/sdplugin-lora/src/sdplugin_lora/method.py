"""``sdcore train lora`` / ``sdcore train locon``: kohya-compatible LoRA training.

The runtime owns data, noise, loss, optimizer and checkpoints; this method freezes the model,
hooks LoRA modules onto kohya's target layers, hands their parameters over (UNet and text-encoder
groups with their own learning rates) and writes kohya ``.safetensors`` files with metadata.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdcore.errors import ConfigError
from sdcore.options import option
from sdcore.train.method import SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions

if TYPE_CHECKING:
    import torch
    from sdcore.models.bundle import ModelBundle

    from .network import LoraNetwork

ALGOS = ("lora", "locon", "loha", "lokr", "dora")  # same as sdplugin_lora.network.ALGOS (kept torch-free here)


ALGO_HELP = (
    "lora; locon (= lora with conv modules, conv rank defaults to --rank); LyCORIS loha, lokr or dora "
    "(files load in A1111/ComfyUI and here, not in diffusers)."
)


@dataclass
class LoraOptions(TrainOptions):
    """LoRA options; names follow the issue (``--rank --alpha --conv-rank ...``), meanings follow kohya."""

    rank: int = option(16, "Rank (kohya network_dim) of Linear and 1x1-conv LoRA modules.", group="lora")
    alpha: float | None = option(
        None, "LoRA alpha; the update is scaled by alpha/rank (default rank/2; kohya's own default is 1).", group="lora"
    )
    conv_rank: int = option(
        0,
        "Rank of 3x3 convs (ResNets, down/upsamplers). > 0 makes a LoCon (kohya 'C3Lier') that also adapts "
        "time_emb_proj and conv_shortcut at --rank.",
        group="lora",
    )
    conv_alpha: float | None = option(None, "Alpha of the 3x3-conv modules (default conv_rank/2).", group="lora")
    algo: str = option("lora", ALGO_HELP, choices=ALGOS, group="lora")
    train_text_encoder: bool = option(
        False, "Also train LoRA on the text encoder(s) (disables text-encoder output caching).", group="lora"
    )
    unet_only: bool = option(False, "Train only the UNet (the default unless --train-text-encoder).", group="lora")
    te_only: bool = option(False, "Train only the text encoder(s).", group="lora")
    unet_lr: float | None = option(None, "Learning rate of the UNet modules (default --lr).", group="lora")
    te_lr: float | None = option(None, "Learning rate of the text-encoder modules (default --lr).", group="lora")
    network_weights: str | None = option(
        None, "Start from an existing LoRA file (same rank; kohya --network_weights).", group="lora"
    )
    lokr_factor: int = option(-1, "LoKr factor (-1: most square split of each dimension).", group="lora")
    dropout: float | None = option(None, "Dropout on the LoRA down output (kohya --network_dropout).", group="lora")
    rank_dropout: float | None = option(
        None, "Per-sample dropout of whole rank channels (kohya rank_dropout).", group="lora"
    )
    module_dropout: float | None = option(None, "Probability of skipping a LoRA module for a step.", group="lora")
    title: str | None = option(
        None, "Name stored as modelspec.title / ss_output_name (default: the file name).", group="lora"
    )
    minimal_metadata: bool = option(
        False, "Write only kohya's minimal metadata (no dataset folder names, tags or training settings).", group="lora"
    )


@dataclass
class LoconOptions(LoraOptions):
    algo: str = option("locon", ALGO_HELP, choices=ALGOS, group="lora")


class LoraMethod(TrainingMethod):
    """LoRA / LoCon on the UNet (and optionally the text encoders), saved in kohya's format."""

    name: ClassVar[str] = "lora"
    options_class: ClassVar[type[TrainOptions]] = LoraOptions
    output_suffix: ClassVar[str] = ".safetensors"
    resume_shape_options: ClassVar[tuple[str, ...]] = (
        "rank", "conv_rank", "algo", "lokr_factor", "train_text_encoder", "unet_only", "te_only"
    )  # fmt: skip

    def __init__(self, options: TrainOptions) -> None:
        super().__init__(options)
        self.network: LoraNetwork | None = None

    @property
    def o(self) -> LoraOptions:
        assert isinstance(self.options, LoraOptions)
        return self.options

    # --- resolved settings ------------------------------------------------------------------------
    @property
    def train_unet(self) -> bool:
        return not self.o.te_only

    @property
    def train_te(self) -> bool:
        return (self.o.train_text_encoder or self.o.te_only) and not self.o.unet_only

    @property
    def alpha(self) -> float:
        return float(self.o.alpha) if self.o.alpha is not None else self.o.rank / 2

    @property
    def conv_rank(self) -> int:
        if self.o.conv_rank:
            return int(self.o.conv_rank)
        return self.o.rank if self.o.algo == "locon" else 0

    @property
    def conv_alpha(self) -> float | None:
        if not self.conv_rank:
            return None
        return float(self.o.conv_alpha) if self.o.conv_alpha is not None else self.conv_rank / 2

    def validate(self) -> None:
        o = self.o
        if o.unet_only and o.te_only:
            raise ConfigError("--unet-only and --te-only contradict each other")
        if o.unet_only and o.train_text_encoder:
            raise ConfigError("--unet-only and --train-text-encoder contradict each other")
        if o.rank < 1:
            raise ConfigError(f"--rank must be at least 1 (got {o.rank})")
        if o.conv_rank < 0:
            raise ConfigError(f"--conv-rank must be 0 (off) or positive (got {o.conv_rank})")
        for flag, value in (
            ("--dropout", o.dropout),
            ("--rank-dropout", o.rank_dropout),
            ("--module-dropout", o.module_dropout),
        ):
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"{flag} must be in [0, 1) (got {value})")
        if o.network_weights and not Path(o.network_weights).is_file():
            raise ConfigError(f"--network-weights {o.network_weights}: file not found")

    @property
    def text_encoder_frozen(self) -> bool:
        return not self.train_te

    # --- setup -----------------------------------------------------------------------------------
    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        from .naming import ModuleIndex
        from .network import LoraNetwork

        for module in bundle.components().values():
            module.requires_grad_(False)
        index = ModuleIndex.from_bundle(bundle)
        targets = index.select(unet=self.train_unet, text_encoder=self.train_te, conv=self.conv_rank > 0)
        network = LoraNetwork.create(
            targets,
            rank=self.o.rank,
            alpha=self.alpha,
            conv_rank=self.conv_rank,
            conv_alpha=self.conv_alpha,
            dropout=self.o.dropout,
            rank_dropout=self.o.rank_dropout,
            module_dropout=self.o.module_dropout,
            algo=self.o.algo,
            lokr_factor=self.o.lokr_factor,
        )
        if self.o.network_weights:
            self._warm_start(network, index, self.o.network_weights)
        network.to(bundle.device)
        network.train()
        network.attach()
        self.network = network
        groups = []
        unet_params = network.parameters_of(text_encoder=False)
        te_params = network.parameters_of(text_encoder=True)
        if unet_params:
            groups.append({"params": unet_params, "lr": self.o.unet_lr or self.o.lr, "name": "unet"})
        if te_params:
            groups.append({"params": te_params, "lr": self.o.te_lr or self.o.lr, "name": "text_encoder"})
        return groups

    @staticmethod
    def _warm_start(network: LoraNetwork, index: Any, path: str) -> None:
        """Copy the modules of an existing file into the new network (kohya ``--network_weights``)."""
        from .format import match_modules, read_lora

        lora = read_lora(path)
        match = match_modules(lora, index)
        names = {"down": "lora_down.weight", "up": "lora_up.weight"}
        state = {
            f"{name}.{names.get(part, part)}": tensor
            for name, (_target, weights) in match.modules.items()
            for part, tensor in weights.tensors.items()
        }
        own = network.state_dict()
        for key, value in state.items():  # LoRA factors may be stored flat or as 1x1/kxk conv kernels
            if key in own and value.numel() == own[key].numel() and value.shape != own[key].shape:
                state[key] = value.reshape(own[key].shape)
        missing = network.load_kohya_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        unused = sorted({k.split(".", 1)[0] for k in state if k not in own})
        if missing or unused or match.unmatched:
            warnings.warn(
                f"{path}: warm start left {len(missing)} new modules at their init; "
                f"{len(unused) + len(match.unmatched)} file modules/keys unused",
                stacklevel=2,
            )

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[dict[str, Any]]:
        network = self.network
        was_training = bool(network is not None and network.training)
        if network is not None:
            network.eval()
        try:
            yield {}
        finally:
            if network is not None and was_training:
                network.train()

    # --- state -----------------------------------------------------------------------------------
    def _require_network(self) -> LoraNetwork:
        if self.network is None:
            raise RuntimeError("LoraMethod.prepare() has not run")
        return self.network

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self._require_network().state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._require_network().load_kohya_state_dict(state)

    def metadata(self, bundle: ModelBundle, info: SaveInfo) -> dict[str, str]:
        from .format import network_metadata

        o = self.o
        args: dict[str, Any] = {}
        if o.rank_dropout:
            args["rank_dropout"] = o.rank_dropout
        if o.module_dropout:
            args["module_dropout"] = o.module_dropout
        extra: dict[str, Any] = dict(info.metadata)
        extra.update(
            {
                "ss_network_dropout": o.dropout,
                "ss_unet_lr": (o.unet_lr or o.lr) if self.train_unet else None,
                "ss_text_encoder_lr": (o.te_lr or o.lr) if self.train_te else None,
                "ss_network_train_unet_only": not self.train_te,
                "ss_network_train_text_encoder_only": not self.train_unet,
                "ss_steps": info.step,
                "ss_epoch": info.epoch,
                "ss_seed": o.seed,
                "ss_mixed_precision": o.mixed_precision,
                "ss_training_finished_at": int(time.time()) if info.final else None,
                "ss_sd_model_name": Path(o.model).name if o.model else None,
            }
        )
        module = "networks.lora"
        if o.algo in ("loha", "lokr", "dora"):
            module = "lycoris.kohya"  # what sd-scripts writes for LyCORIS networks
            args["algo"] = "lora" if o.algo == "dora" else o.algo
            if o.algo == "dora":
                args["dora_wd"] = True
            if o.algo == "lokr":
                args["factor"] = o.lokr_factor
        return network_metadata(
            family=bundle.family,
            prediction_type=bundle.prediction_type,
            network_module=module,
            rank=o.rank,
            alpha=self.alpha,
            conv_rank=self.conv_rank,
            conv_alpha=self.conv_alpha,
            network_args=args,
            title=o.title or info.path.stem,
            resolution=o.resolution,
            clip_skip=o.clip_skip,
            extra=extra,
        )

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        from .format import save_lora

        network = self._require_network()
        return save_lora(
            info.path,
            network.state_dict(),
            self.metadata(bundle, info),
            dtype=self.o.save_dtype,
            minimal=self.o.minimal_metadata,
        )

    def load_result(self, bundle: ModelBundle, path: Path) -> None:
        """Hook the saved file onto a fresh bundle (same forward as during training)."""
        from .apply import apply_lora

        apply_lora(bundle, path, 1.0, merge=False, strict=True)


class LoconMethod(LoraMethod):
    """LoRA with conv modules (kohya C3Lier / LyCORIS LoCon); same file format."""

    name: ClassVar[str] = "locon"
    options_class: ClassVar[type[TrainOptions]] = LoconOptions


__all__ = ["LoconMethod", "LoconOptions", "LoraMethod", "LoraOptions"]
