"""``sdcore train lora`` / ``sdcore train locon``: kohya-compatible LoRA training.

The runtime owns data, noise, loss, optimizer and checkpoints; this method freezes the model,
hooks LoRA modules onto kohya's target layers, hands their parameters over (UNet and text-encoder
groups with their own learning rates) and writes kohya ``.safetensors`` files with metadata.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdcore.errors import ConfigError
from sdcore.options import option
from sdcore.train.memory_options import base_weights_dtype
from sdcore.train.method import Capabilities, SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions
from sdcore.train.te_stop import TextEncoderStopOptions

from .algos import ALGO_HELP, ALGOS, NETWORK_MODULE, network_module
from .dataset_metadata import (
    PER_DATASET_KEYS,
    bucket_rule,
    folder_bucket_metadata,
    folder_counts,
    folder_tag_frequency,
    from_dataset_config,
    kohya_datasets,
    subset_dir_name,
    subset_identity,
    unique_name,
)

log = logging.getLogger(__name__)

#: LyCORIS algos without neuron/rank dropout, Tucker core or max-norm here -> why
LYCORIS_PLAIN = {
    "ia3": "a scaling vector per layer, no rank",
    "glora": "its forward rebuilds the weight",
    "full": "the whole weight change, no rank",
    "diag_oft": "rotation blocks, no Tucker core; its dropouts and max-norm on the blocks are not reproduced",
    "boft": "butterfly rotation blocks, no Tucker core; its dropouts and max-norm on the blocks are not reproduced",
}

#: ``--embedding``'s help (sdplugin_lora.pivotal.SPEC_HELP, kept here so --help imports nothing more)
EMBEDDING_HELP = (
    "A new embedding trained with the LoRA (pivotal tuning; OneTrainer's additional embeddings), repeatable: "
    "NAME[:TOKENS[:INIT_TEXT]]. NAME is the placeholder the captions and sample prompts use (replaced wherever "
    "it is written, as OneTrainer does) and the embedding's name in the LoRA file (bundle_emb.NAME.*, which "
    "A1111 1.7+ loads with the LoRA; --embedding-files: separate files instead); TOKENS vectors (default 1), "
    "started from INIT_TEXT's token vectors (default '*'). SD1, SD2, SDXL, SD3/SD3.5, FLUX.1 (CLIP and T5-XXL "
    "vectors) and Chroma (T5-XXL)."
)

if TYPE_CHECKING:
    import torch
    from sdcore.data.dataset import DatasetIndex
    from sdcore.models.bundle import ModelBundle

    from .blocks import BlockPlan
    from .naming import ModuleIndex, Target
    from .network import LoraNetwork
    from .pivotal import PivotalEmbeddings
    from .presets import Choice, LycorisPreset


@dataclass
class LoraOptions(TrainOptions, TextEncoderStopOptions):
    """LoRA options; names follow the issue (``--rank --alpha --conv-rank ...``), meanings follow kohya."""

    rank: int = option(16, "Rank (kohya network_dim) of Linear and 1x1-conv LoRA modules.", group="lora", minimum=1)
    alpha: float | None = option(
        None, "LoRA alpha; the update is scaled by alpha/rank (default rank/2; kohya's own default is 1).", group="lora"
    )
    conv_rank: int = option(
        0,
        "Rank of 3x3 convs (ResNets, down/upsamplers). > 0 makes a LoCon (kohya 'C3Lier') that also adapts "
        "time_emb_proj and conv_shortcut at --rank.",
        group="lora",
        minimum=0,
    )
    conv_alpha: float | None = option(None, "Alpha of the 3x3-conv modules (default conv_rank/2).", group="lora")
    algo: str = option("lora", ALGO_HELP, choices=ALGOS, group="lora")
    train_text_encoder: bool = option(
        False, "Also train LoRA on the text encoder(s) (disables text-encoder output caching).", group="lora"
    )
    unet_only: bool = option(False, "Train only the UNet (the default unless --train-text-encoder).", group="lora")
    te_only: bool = option(False, "Train only the text encoder(s).", group="lora")
    unet_lr: float | None = option(
        None,
        "Learning rate of the UNet modules (default --lr); 0 leaves them untrained, except those a --module-lrs "
        "rule gives a rate (kohya unet_lr).",
        group="lora",
        minimum=0,
    )
    te_lr: float | None = option(
        None,
        "Learning rate of the text-encoder modules (default --lr); 0 leaves them untrained, except those a "
        "--te1-lr/--te2-lr/--te3-lr or --module-lrs rule gives a rate (kohya text_encoder_lr).",
        group="lora",
        minimum=0,
    )
    te1_lr: float | None = option(
        None,
        "Learning rate of the first CLIP encoder's modules (CLIP-L; SD2's OpenCLIP); 0 leaves them untrained "
        "(default --te-lr, else --lr; kohya text_encoder_lr's first value).",
        group="lora",
        minimum=0,
    )
    te2_lr: float | None = option(
        None,
        "Learning rate of CLIP-G's modules (SDXL, SD3); 0 leaves them untrained (default --te-lr, else --lr; kohya "
        "SD3 text_encoder_lr's second value).",
        group="lora",
        minimum=0,
    )
    te3_lr: float | None = option(
        None,
        "With --train-t5: learning rate of T5's modules (SD3, Flux, Chroma); 0 leaves them untrained (default "
        "--te-lr, else --lr; kohya text_encoder_lr's third value on SD3, second on Flux).",
        group="lora",
        minimum=0,
    )
    layer_filter: str | None = option(
        None,
        "OneTrainer's custom layer filter: comma-separated patterns; of the denoiser modules the other options "
        "select, only those whose diffusers path contains a pattern are adapted (down_blocks.1.attentions.0."
        "transformer_blocks.0.attn1.to_q; Flux single_transformer_blocks.3.proj_mlp). Text encoders are not "
        "filtered. Every pattern must match; an empty one (a trailing comma) matches all, as in OneTrainer.",
        group="lora",
    )
    layer_filter_regex: bool = option(
        False,
        "Read the --layer-filter (and --layer-exclude) patterns as regular expressions, searched in the path "
        "(OneTrainer layer_filter_regex).",
        group="lora",
    )
    layer_exclude: str | None = option(
        None,
        "Comma-separated patterns, matched as --layer-filter's: the denoiser modules a pattern matches are not "
        "adapted, even where --layer-filter keeps them (ai-toolkit ignore_if_contains). A pattern that matches "
        "nothing is no error. `sdcore lora targets` shows what each pattern matched.",
        group="lora",
    )
    network_weights: str | None = option(
        None, "Start from an existing LoRA file (same rank; kohya --network_weights).", group="lora", path=True
    )
    dim_from_weights: bool = option(
        False,
        "Take each module's rank and alpha from --network-weights (kohya --dim_from_weights): modules the file "
        "lacks are not created.",
        group="lora",
    )
    base_weights: str | None = option(
        None,
        "LoRA files merged into the model before training, comma-separated (kohya --base_weights): the result "
        "is the difference on top of them.",
        group="lora",
        path=True,
    )
    base_weights_multiplier: str | None = option(
        None,
        "Merge strength of each --base-weights file, comma-separated (kohya --base_weights_multiplier; "
        "missing ones are 1).",
        group="lora",
    )
    lokr_factor: int = option(-1, "LoKr factor (-1: most square split of each dimension).", group="lora", minimum=-1)
    dylora_unit: int = option(
        1,
        "--algo dylora: rank rows trained per step (kohya networks.dylora unit); --rank must be a multiple.",
        group="lora",
        minimum=1,
    )
    oft_all_linear: bool = option(
        True,
        "--algo oft: every Linear of the UNet's transformer blocks (kohya networks.oft enable_all_linear); "
        "off: the attention projections only (kohya's default without enable_all_linear).",
        group="lora",
    )
    dropout: float | None = option(
        None, "Dropout on the LoRA down output (kohya --network_dropout).", group="lora", minimum=0, maximum=1
    )
    rank_dropout: float | None = option(
        None,
        "Per-sample dropout of whole rank channels (kohya rank_dropout).",
        group="lora",
        minimum=0,
        maximum=1,
    )
    module_dropout: float | None = option(
        None, "Probability of skipping a LoRA module for a step.", group="lora", minimum=0, maximum=1
    )
    lora_input_dropout: float | None = option(
        None,
        "PEFT's lora_dropout (diffusers' and SimpleTuner's LoRAs): while training, dropout on the features the LoRA "
        "reads, lora_up(lora_down(dropout(x))), a fresh mask per module and forward (a fused SD3/Flux module: one "
        "for its q/k/v); the base layer sees x unchanged. Plain LoRA (--algo lora or locon) only.",
        group="lora",
        minimum=0,
        maximum=1,
    )
    scale_weight_norms: float | None = option(
        None,
        "kohya max-norm regularisation: after each step, rescale every module whose change ||alpha/rank * "
        "up @ down|| exceeds this to exactly this norm (kohya suggests 1; LoHa/LoKr/DoRA: LyCORIS' rule).",
        group="lora",
        minimum=0,
    )
    ggpo_sigma: float | None = option(
        None,
        "kohya's LoRA-GGPO (lora_flux network_args ggpo_sigma; kohya suggests 0.03): while training, each LoRA "
        "layer adds noise x @ P.T, P = randn(out, in) per row times (sigma * weight norm + beta * grad norm^2) / "
        "sqrt(out); on only with --ggpo-beta too. Plain LoRA on Linear (and 1x1-conv) layers, any family.",
        group="lora",
        minimum=0,
    )
    ggpo_beta: float | None = option(
        None,
        "kohya's LoRA-GGPO gradient term (lora_flux network_args ggpo_beta; kohya suggests 0.01).",
        group="lora",
        minimum=0,
    )
    network_multiplier: float = option(
        1.0,
        "The network's multiplier while training (kohya network_multiplier): the forward adds m * the change; "
        "the file is the same format (not baked in), so it reproduces the training model at weight m.",
        group="lora",
    )
    use_tucker: bool = option(
        False,
        "LyCORIS use_tucker: kxk convs keep their kernel in a small core (lora_mid / hada_t1,t2 / lokr_t2); "
        "the file is then a LyCORIS file.",
        group="lora",
    )
    decompose_both: bool = option(
        False,
        "LyCORIS decompose_both (--algo lokr): the small Kronecker factor w1 is low-rank too (lokr_w1_a @ "
        "lokr_w1_b) when the rank is below half its larger side.",
        group="lora",
    )
    rank_dropout_scale: bool = option(
        False,
        "LyCORIS rank_dropout_scale: the --rank-dropout mask is divided by its mean (the kept channels make up "
        "for the dropped ones); for lora/locon also LyCORIS' rule (whole output rows of the weight change, one "
        "mask per batch, no --dropout) instead of kohya's rank channels per sample.",
        group="lora",
    )
    train_norm: bool = option(
        False,
        "LyCORIS train_norm: also train the GroupNorm/LayerNorm weights and biases of the adapted UNet blocks "
        "(additive w_norm/b_norm in the file).",
        group="lora",
    )
    constraint: float = option(
        0.0,
        "LyCORIS constraint (--algo diag_oft/boft): the norm of all of a layer's skew blocks is kept below "
        "constraint * output width (0: no limit); stored as the module's alpha.",
        group="lora",
        minimum=0,
    )
    rescaled: bool = option(
        False,
        "LyCORIS rescaled (--algo diag_oft/boft): also train a per-output-channel scale (rescale, starting at 1).",
        group="lora",
    )
    lycoris_preset: str | None = option(
        None,
        "LyCORIS preset (kohya network_args preset=): full, full-lin, attn-mlp, attn-only, unet-only, "
        "unet-transformer-only, unet-convblock-only, or a preset .toml file (target classes/names, "
        "module_algo_map/name_algo_map with per-module algo, dim, alpha). Adapts exactly the modules a kohya run "
        "with lycoris.kohya adapts (kxk convs need a conv rank). Default: kohya networks.lora's targets.",
        group="lora",
    )
    block_dims: str | None = option(
        None,
        "kohya block_dims: ranks per UNet block, comma-separated (25 values SD1/SD2, 23 SDXL); 0 leaves a block out.",
        group="lora",
    )
    block_alphas: str | None = option(None, "kohya block_alphas: alphas per block (default --alpha).", group="lora")
    conv_block_dims: str | None = option(None, "kohya conv_block_dims: 3x3-conv ranks per block.", group="lora")
    conv_block_alphas: str | None = option(
        None, "kohya conv_block_alphas: 3x3-conv alphas per block (default --conv-alpha, else 1).", group="lora"
    )
    down_lr_weight: str | None = option(
        None,
        "kohya down_lr_weight: UNet lr multipliers of the down blocks (12 values SD1/SD2, 9 SDXL, shallow to deep) "
        "or sine/cosine/linear/reverse_linear/zeros[+offset]; a block at 0 gets no modules.",
        group="lora",
    )
    mid_lr_weight: str | None = option(
        None, "kohya mid_lr_weight: lr multiplier(s) of the mid block (1 value SD1/SD2, 3 SDXL).", group="lora"
    )
    up_lr_weight: str | None = option(
        None,
        "kohya up_lr_weight: lr multipliers of the up blocks (deep to shallow), like --down-lr-weight.",
        group="lora",
    )
    block_lr_zero_threshold: float = option(
        0.0, "kohya block_lr_zero_threshold: lr weights not above this become 0 (no modules).", group="lora"
    )
    module_ranks: str | None = option(
        None,
        "Ranks by module: comma-separated REGEX=RANK, each regex searched in the module's kohya name "
        "(lora_unet_double_blocks_0_img_attn_qkv; `sdcore lora targets` lists them); the first that matches "
        "gives the rank, 0 = the module is not adapted (kohya network_reg_dims). Alpha stays --alpha "
        "(--conv-alpha for kxk convs). Wins over --block-dims and --extra-module-ranks.",
        group="lora",
    )
    module_lrs: str | None = option(
        None,
        "Learning rates by module: comma-separated REGEX=LR on the kohya name, first match wins (kohya "
        "network_reg_lrs); replaces the module's --unet-lr/--te-lr/block rate, LoRA+ still multiplies its "
        "lora_up; 0 leaves the module untrained.",
        group="lora",
    )
    extra_module_ranks: str | None = option(
        None,
        "Also adapt denoiser modules outside the default targets (embedders, final layer: FLUX.1 lora_unet_img_in, "
        "lora_unet_time_in_in_layer; SD3 lora_unet_context_embedder, lora_unet_x_embedder_proj): comma-separated "
        "REGEX=RANK on the kohya name, first match wins; 0 = only if --module-ranks gives a rank (kohya "
        "in_dims / emb_dims).",
        group="lora",
    )
    kohya_network_args: str | None = option(
        None,
        "Set by a kohya config: its per-module network_args as given (a JSON object of strings), written back "
        "into the file's ss_network_args as kohya writes them; the rules they become are sdcore's.",
        group="lora",
        cli=False,
    )
    loraplus_lr_ratio: float | None = option(
        None,
        "LoRA+ (kohya loraplus_lr_ratio): lora_up weights learn at lr x this (paper: 16).",
        group="lora",
        minimum=0,
        above_minimum=True,
    )
    loraplus_unet_lr_ratio: float | None = option(
        None,
        "LoRA+ ratio for the UNet only (default --loraplus-lr-ratio).",
        group="lora",
        minimum=0,
        above_minimum=True,
    )
    loraplus_text_encoder_lr_ratio: float | None = option(
        None,
        "LoRA+ ratio for the text encoder(s) only (default --loraplus-lr-ratio).",
        group="lora",
        minimum=0,
        above_minimum=True,
    )
    title: str | None = option(
        None,
        "Name stored as ss_output_name and modelspec.title (default: the file name; --metadata-title sets "
        "modelspec.title alone, as kohya's --metadata_title).",
        group="lora",
    )
    minimal_metadata: bool = option(
        False, "Write only kohya's minimal metadata (no dataset folder names, tags or training settings).", group="lora"
    )
    key_layout: str = option(
        "kohya",
        "Key names of the saved file: kohya (what ComfyUI, Forge, A1111 and sd-scripts load; SD3/Flux in SAI/BFL "
        "names with fused qkv) or diffusers (PEFT keys, transformer.<module>.lora_A/B; SD3/Flux only).",
        choices=("kohya", "diffusers"),
        group="lora",
    )
    train_t5: bool = option(
        False, "SD3/Flux: with text-encoder training, also train the T5 encoder (kohya train_t5xxl).", group="lora"
    )
    split_qkv: bool = option(
        False,
        "SD3/Flux: train q, k, v (and Flux's MLP input) with a down each, saved fused at rank x3/x4 (kohya "
        "split_qkv=True). Default, as kohya: one LoRA per fused qkv/linear1 Linear, its down shared by q, k, v.",
        group="lora",
    )
    control_lora: bool = option(
        False,
        "FLUX.1 dev: train a control LoRA (BFL's Depth/Canny kind, diffusers' train_control_lora_flux.py): img_in "
        "widened from 64 to 128 inputs with zero columns, each training image's control image (--control-dir, "
        "same stem; a depth map, edges, a pose ...) encoded like it and joined to the noisy latents on the "
        "channels, plain LoRA on the transformer's Linears (--lora-layers); saved in BFL's layout (sdcore generate "
        "--control-image, diffusers' FluxControlPipeline and ComfyUI load it).",
        group="lora",
    )
    train_norm_layers: bool = option(
        False,
        "With --control-lora: also train the attention RMSNorm scales (diffusers' --train_norm_layers); the file "
        "holds them in full, as BFL's control LoRAs do.",
        group="lora",
    )
    lora_bias: bool = option(
        False,
        "Also train a bias on every LoRA module's lora_up, from zero (PEFT's lora_bias=True, diffusers' "
        "--use_lora_bias), saved as lora_B.bias. Plain LoRA (--algo lora or locon) in a layout that holds it: "
        "--control-lora (BFL's control layout, as BFL's own files) or --key-layout diffusers (PEFT's, convs "
        "included); kohya's LoRA modules have none.",
        group="lora",
    )
    lora_layers: str | None = option(
        None,
        "With --control-lora: the transformer modules to adapt, as diffusers' --lora_layers: comma-separated "
        "diffusers module names matched as PEFT's target_modules (a name or its dotted tail: attn.to_q), x_embedder "
        "always added; or all-linear (every Linear, as BFL's releases). Default: the script's list (x_embedder, "
        "the attention projections and the double blocks' feed-forwards).",
        group="lora",
    )
    embedding: tuple[str, ...] = option((), EMBEDDING_HELP, group="lora", metavar="NAME:TOKENS:INIT_TEXT")
    embedding_lr: float | None = option(
        None,
        "Learning rate of the --embedding vectors (default --lr; OneTrainer embedding_learning_rate).",
        group="lora",
        minimum=0,
    )
    embedding_stop_at: int | None = option(
        None,
        "Train the --embedding vectors in the first N optimizer steps only, then freeze them while the LoRA "
        "trains on (pivotal tuning's switch: OneTrainer's stop_training_after in STEP, diffusers' "
        "--train_text_encoder_ti_frac as a step count).",
        group="lora",
        minimum=1,
    )
    embedding_files: bool = option(
        False,
        "Write the --embedding vectors as separate embedding files instead of into the LoRA file: "
        "<LoRA file>_embeddings/NAME.safetensors beside every save (OneTrainer's bundle_additional_embeddings: "
        "false, its folder and names). For ComfyUI, Forge and diffusers, which skip or refuse bundled embeddings: "
        "put the files in their embeddings folder.",
        group="lora",
    )
    embedding_t5: bool = option(
        False,
        "SD3/FLUX.1: also train the --embedding vectors of T5-XXL (OneTrainer's train_embedding of T5, as "
        "train ti --train-t5). Off: they stay at the init text's vectors, written so (bundle_emb.NAME.t5, as "
        "OneTrainer writes it). Chroma's T5, its only encoder, always trains.",
        group="lora",
    )


@dataclass
class LoconOptions(LoraOptions):
    algo: str = option("locon", ALGO_HELP, choices=ALGOS, group="lora")


def _family_encoders(bundle: Any) -> tuple[Any, ...]:
    """The family's text encoders (:class:`sdcore.models.family.TextEncoderSpec`), in the bundle's order."""
    from sdcore.models.family import get_family

    return tuple(get_family(bundle.family).text_encoders)


#: resumable-state key suffix of a module's LyCORIS max-norm ``scalar``
_SCALAR_KEY = "sdcore_scalar"
#: resumable-state key suffix (start) of a module's GGPO norms (``<module>.sdcore_ggpo_weight_norms``)
_GGPO_KEY = "sdcore_ggpo"
#: prefix of the trained RMSNorm scales (--train-norm-layers, BFL names) in a training state
_NORM_STATE = "sdcore_norm."
#: the header key saying a file is a FLUX.1 control LoRA and what its img_in takes
CONTROL_METADATA = "sdcore_control_lora"


class LoraMethod(TrainingMethod[LoraOptions]):
    """LoRA / LoCon on the UNet (and optionally the text encoders), saved in kohya's format."""

    name: ClassVar[str] = "lora"
    start_from_result: ClassVar[str | None] = "--network-weights"
    options_class: ClassVar[type[TrainOptions]] = LoraOptions
    output_suffix: ClassVar[str] = ".safetensors"
    resume_shape_options: ClassVar[tuple[str, ...]] = (
        "rank", "conv_rank", "algo", "lokr_factor", "dylora_unit", "oft_all_linear", "train_text_encoder", "unet_only", "te_only", "split_qkv",
        "block_dims", "conv_block_dims", "dim_from_weights", "decompose_both", "train_norm", "rescaled", "lycoris_preset",
        "layer_filter", "layer_filter_regex", "layer_exclude", "control_lora", "train_norm_layers",
        "module_ranks", "extra_module_ranks",
        "lora_bias", "lora_layers", "embedding", "embedding_t5",
    )  # fmt: skip

    def __init__(self, options: LoraOptions) -> None:
        super().__init__(options)
        self.network: LoraNetwork | None = None
        self.index: ModuleIndex | None = None
        self._te_frozen = False  # the text-encoder stop has frozen the lora_te* modules
        self._preset: LycorisPreset | None = None
        #: text-encoder module name -> kohya's number of its encoder (1 CLIP-L/OpenCLIP, 2 CLIP-G, 3 T5)
        self._te_slots: dict[str, int] = {}
        #: --embedding: the new embeddings in the bundle (sdplugin_lora.pivotal), after prepare
        self.pivotal: PivotalEmbeddings | None = None

    # --- resolved settings ------------------------------------------------------------------------
    @property
    def train_unet(self) -> bool:
        preset = self._safe_preset()
        return not self.options.te_only and (preset is None or preset.has_unet)

    @property
    def train_te(self) -> bool:
        preset = self._safe_preset()
        wanted = (self.options.train_text_encoder or self.options.te_only) and not self.options.unet_only
        return wanted and (preset is None or preset.has_text_encoder)

    def lycoris_preset(self) -> LycorisPreset | None:
        """The --lycoris-preset, read once (``ConfigError`` when it is neither built in nor a valid TOML file)."""
        text = self.options.lycoris_preset
        if text is None:
            return None
        if self._preset is None or self._preset.name != text:
            from .presets import load_preset

            self._preset = load_preset(text)
        return self._preset

    def _safe_preset(self) -> LycorisPreset | None:
        try:
            return self.lycoris_preset()
        except ConfigError:  # validate() reports it
            return None

    @property
    def alpha(self) -> float:
        if self.options.alpha is not None:
            return float(self.options.alpha)
        return 1e-3 if self.options.algo == "oft" else self.options.rank / 2  # OFT: alpha is kohya's constraint

    @property
    def conv_rank(self) -> int:
        if self.options.conv_rank:
            return int(self.options.conv_rank)
        return self.options.rank if self.options.algo == "locon" else 0

    @property
    def conv_alpha(self) -> float | None:
        if not self.conv_rank:
            return None
        if self.options.algo == "dylora":  # kohya networks.dylora gives every module network_alpha
            return self.alpha
        return float(self.options.conv_alpha) if self.options.conv_alpha is not None else self.conv_rank / 2

    def validate(self) -> None:
        o = self.options
        self._embedding_checks()
        if o.unet_only and o.te_only:
            raise ConfigError("--unet-only and --te-only contradict each other")
        if o.unet_only and o.train_text_encoder:
            raise ConfigError("--unet-only and --train-text-encoder contradict each other")
        if o.rank < 1:
            raise ConfigError(f"--rank must be at least 1 (got {o.rank})")
        if o.algo == "oft" and (o.train_text_encoder or o.te_only):
            raise ConfigError(
                "--algo oft adapts the UNet only (kohya networks.oft); drop --train-text-encoder/--te-only"
            )
        if o.algo == "oft":
            unused = [
                flag
                for flag, value in (
                    ("--block-dims", o.block_dims),
                    ("--conv-block-dims", o.conv_block_dims),
                    ("--use-tucker", o.use_tucker or None),
                    ("--conv-rank", o.conv_rank or None),
                )
                if value is not None
            ]
            if unused:
                raise ConfigError(
                    f"--algo oft has no ranks per block, Tucker core or conv modules: drop {', '.join(unused)}"
                )
        if o.conv_rank < 0:
            raise ConfigError(f"--conv-rank must be 0 (off) or positive (got {o.conv_rank})")
        self._kohya_module_checks()
        for flag, value in (
            ("--dropout", o.dropout),
            ("--rank-dropout", o.rank_dropout),
            ("--module-dropout", o.module_dropout),
            ("--lora-input-dropout", o.lora_input_dropout),
        ):
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"{flag} must be in [0, 1) (got {value})")
        if o.dropout and o.algo in ("loha", "lokr", "dora"):
            log.warning(
                "%s",
                f"--dropout has no effect on --algo {o.algo} (LyCORIS has no neuron dropout for it either); "
                "--rank-dropout and --module-dropout apply",
            )
        elif o.dropout and o.rank_dropout and o.rank_dropout_scale and o.algo in ("lora", "locon"):
            log.warning(
                "%s",
                f"--dropout has no effect on --algo {o.algo} with --rank-dropout-scale: LyCORIS' LoCon rebuilds the "
                "weight with its rows dropped and has no neuron dropout there; --rank-dropout and --module-dropout apply",
            )
        for note in self._idle_option_notes():  # said as the CLI's warnings, once per command
            log.warning("%s", note)
        problems: list[str] = []
        if o.scale_weight_norms is not None and o.scale_weight_norms < 0:
            problems.append(f"--scale-weight-norms must be positive (0 = off), got {o.scale_weight_norms}")
        elif o.scale_weight_norms and o.algo == "oft":
            problems.append("--scale-weight-norms: kohya's networks.oft has no max-norm regularisation")
        elif o.scale_weight_norms and o.split_qkv:
            problems.append(
                "--scale-weight-norms with --split-qkv: kohya's lora_flux/lora_sd3 max-norm does not handle split "
                "q/k/v modules (it fails on their per-member lora_down.N keys), so there is no meaning to copy"
            )
        elif o.scale_weight_norms and o.rank_dropout and (o.algo in ("loha", "lokr", "dora") or o.use_tucker):
            problems.append(
                f"--scale-weight-norms with --algo {o.algo}{' --use-tucker' if o.use_tucker else ''} and "
                "--rank-dropout: LyCORIS measures the norm under a fresh rank-dropout mask drawn from torch's "
                "global generator, which sdcore does not reproduce"
            )
        if o.network_multiplier == 0 or o.network_multiplier != o.network_multiplier:
            problems.append(
                f"--network-multiplier must be a non-zero number (0 trains nothing), got {o.network_multiplier}"
            )
        if o.network_weights and not Path(o.network_weights).is_file():
            raise ConfigError(f"--network-weights {o.network_weights}: file not found")
        problems += self._weights_file_problems()
        from .blocks import check_block_options

        problems += check_block_options(**self.block_options())
        blockwise = [name for name, value in self.block_options().items() if value is not None]
        if blockwise and NETWORK_MODULE[o.algo] == "lycoris.kohya":
            problems.append(
                f"{', '.join('--' + n.replace('_', '-') for n in blockwise)} with --algo {o.algo}: the block-wise "
                "options are kohya networks.lora's; LyCORIS (lycoris.kohya) ignores them, so a kohya run would "
                "train another network; use --algo lora/locon or drop them"
            )
        for flag, ratio in (
            ("--loraplus-lr-ratio", o.loraplus_lr_ratio),
            ("--loraplus-unet-lr-ratio", o.loraplus_unet_lr_ratio),
            ("--loraplus-text-encoder-lr-ratio", o.loraplus_text_encoder_lr_ratio),
        ):
            if ratio is not None and ratio <= 0:
                problems.append(f"{flag} must be positive (got {ratio})")
        problems += self._te_rate_problems()
        if o.layer_filter is not None:
            from .naming import LayerFilter

            try:
                LayerFilter.parse(o.layer_filter, regex=o.layer_filter_regex)
            except ConfigError as exc:
                problems.append(str(exc))
        if o.layer_exclude is not None:
            from .naming import LayerFilter

            try:
                LayerFilter.parse(o.layer_exclude, regex=o.layer_filter_regex, flag="--layer-exclude")
            except ConfigError as exc:
                problems.append(str(exc))
        if o.layer_filter_regex and o.layer_filter is None and o.layer_exclude is None:
            problems.append("--layer-filter-regex reads the --layer-filter patterns: give --layer-filter")
        stop = [f for f, v in (("--stop-text-encoder-at", o.stop_text_encoder_at),
                               ("--stop-text-encoder-after-epochs", o.stop_text_encoder_after_epochs)) if v is not None]  # fmt: skip
        if stop and o.te_only:
            problems.append(f"{' and '.join(stop)} with --te-only: nothing would train after the stop")
        problems += self._control_lora_problems()
        problems += self._ggpo_problems()
        problems += self._module_rule_problems()
        problems += self._lora_bias_problems()
        problems += self._input_dropout_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _idle_option_notes(self) -> list[str]:
        """LyCORIS options that act only with another one, given without it: accepted (LyCORIS takes them in
        silence too, and kohya configs copied between runs carry them in ``network_args``) with a warning saying
        they do nothing, rather than ignored without a word. The algos that have no such option at all are
        refused by :meth:`_kohya_module_checks` before this."""
        o = self.options
        notes: list[str] = []
        if o.rank_dropout_scale and not o.rank_dropout:
            notes.append(
                "--rank-dropout-scale has no effect without --rank-dropout: it rescales the rank-dropout mask "
                "(LyCORIS' rank_dropout_scale does nothing without rank_dropout either)"
            )
        convs = (
            self.conv_rank
            or o.conv_block_dims
            or o.dim_from_weights
            or o.lycoris_preset is not None
            or o.extra_module_ranks
            or o.control_lora
        )
        if o.use_tucker and not convs:
            notes.append(
                f"--use-tucker has no effect: --algo {o.algo} without --conv-rank adapts no kxk conv, whose kernel "
                "the Tucker core would hold (LyCORIS' use_tucker acts on such convs only); give --conv-rank to "
                "adapt them"
            )
        if o.train_norm and o.te_only:
            notes.append(
                "--train-norm has no effect with --te-only: the norm layers it trains are the UNet's, which does "
                "not train here"
            )
        return notes

    @property
    def ggpo(self) -> tuple[float, float] | None:
        """(sigma, beta) of kohya's LoRA-GGPO, ``None`` when off: kohya turns it on only when both are given."""
        o = self.options
        return None if o.ggpo_sigma is None or o.ggpo_beta is None else (o.ggpo_sigma, o.ggpo_beta)

    def _ggpo_problems(self) -> list[str]:
        """--ggpo-sigma/--ggpo-beta: numbers >= 0, on what kohya's lora_flux defines it for (plain LoRA on
        Linear layers); one alone does nothing, as in kohya (a warning says so)."""
        o = self.options
        given = {flag: v for flag, v in (("--ggpo-sigma", o.ggpo_sigma), ("--ggpo-beta", o.ggpo_beta)) if v is not None}
        problems = [f"{flag} must be 0 or positive (got {v})" for flag, v in given.items() if not v >= 0]
        if len(given) == 1:
            (alone,) = given
            other = "--ggpo-beta" if alone == "--ggpo-sigma" else "--ggpo-sigma"
            log.warning(
                "%s", f"{alone} without {other}: GGPO is off (kohya's lora_flux turns it on only when both are given)"
            )
        if self.ggpo is None:
            return problems
        others = [
            flag
            for flag, on in (
                (f"--algo {o.algo}", o.algo != "lora"),
                ("--conv-rank/--conv-block-dims", bool(o.conv_rank or o.conv_block_dims)),
                ("--split-qkv", o.split_qkv),
                ("--lycoris-preset", o.lycoris_preset is not None),
                ("--rank-dropout-scale", o.rank_dropout_scale),
                ("--train-norm", o.train_norm),
                ("--fused-backward-pass", o.fused_backward_pass),
            )
            if on
        ]
        if others:
            problems.append(
                f"--ggpo-sigma/--ggpo-beta with {', '.join(others)}: kohya's LoRA-GGPO (networks.lora_flux) is "
                "defined for plain LoRA on Linear layers, with every gradient known before the optimizer step "
                "(its split_qkv modules fail there); drop one"
            )
        return problems

    def _module_rule_problems(self) -> list[str]:
        """--module-ranks / --module-lrs / --extra-module-ranks: parseable, and ranks only where a rank means
        something (not OFT's blocks, (IA)^3 or full; not a LyCORIS preset's own dims, nor the ranks a file gives)."""
        from .module_rules import parse_rules

        o = self.options
        problems: list[str] = []
        if o.kohya_network_args is not None and self.kohya_network_args() is None:
            problems.append(
                f"kohya_network_args {o.kohya_network_args!r}: a JSON object of strings (kohya network_args key: value)"
            )
        for flag, text, integer in (("--module-ranks", o.module_ranks, True), ("--module-lrs", o.module_lrs, False),
                                    ("--extra-module-ranks", o.extra_module_ranks, True)):  # fmt: skip
            problems += parse_rules(text, flag=flag, integer=integer)[1]
        ranks = [
            f for f, v in (("--module-ranks", o.module_ranks), ("--extra-module-ranks", o.extra_module_ranks)) if v
        ]
        if not ranks:
            return problems
        given = ", ".join(ranks)
        if o.algo in ("oft", "ia3", "full"):
            problems.append(f"{given} with --algo {o.algo}: its modules have no rank to set")
        if o.lycoris_preset is not None:
            problems.append(f"{given} with --lycoris-preset: the preset's maps set the dims; use one or the other")
        if o.dim_from_weights:
            problems.append(f"{given} with --dim-from-weights: kohya takes every rank from the file; drop one")
        if o.control_lora:
            problems.append(f"{given} with --control-lora: a control LoRA adapts every transformer Linear at --rank")
        return problems

    def kohya_network_args(self) -> dict[str, str] | None:
        """The kohya run's per-module network_args as given (``kohya_network_args``), ``None`` when unset or not
        a JSON object of strings."""
        import json

        text = self.options.kohya_network_args
        if text is None:
            return None
        try:
            args = json.loads(text)
        except ValueError:
            return None
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            return None
        return args

    def module_rank_rules(self) -> tuple[list[Any], list[Any]]:
        """The parsed --module-ranks and --extra-module-ranks (:class:`sdplugin_lora.module_rules.Rule`)."""
        from .module_rules import parse_rules

        o = self.options
        ranks = parse_rules(o.module_ranks, flag="--module-ranks", integer=True)[0]
        extra = parse_rules(o.extra_module_ranks, flag="--extra-module-ranks", integer=True)[0]
        return ranks, extra

    def _control_lora_problems(self) -> list[str]:
        """Options a control LoRA cannot take: BFL's layout is plain LoRA (``lora_A``/``lora_B``, one ``lora_A`` per
        fused qkv/linear1 Linear) on every Linear of the transformer and nothing else, and its ``img_in`` is wider
        than any file a run could start from or merge (those are refused rather than half applied)."""
        o = self.options
        if not o.control_lora:
            problems = []
            if o.train_norm_layers:
                problems.append("--train-norm-layers trains a control LoRA's norm scales: give --control-lora")
            if o.lora_layers is not None:
                problems.append(
                    "--lora-layers picks a control LoRA's modules as diffusers' train_control_lora_flux.py does: give "
                    "--control-lora (other LoRAs choose theirs with --layer-filter/--layer-exclude)"
                )
            return problems
        given = [
            flag
            for flag, on in (
                (f"--algo {o.algo}", o.algo != "lora"),
                ("--split-qkv", o.split_qkv),
                ("--key-layout diffusers", o.key_layout != "kohya"),
                ("--train-text-encoder/--te-only", o.train_text_encoder or o.te_only),
                ("--lycoris-preset", o.lycoris_preset is not None),
                ("--layer-filter/--layer-exclude", o.layer_filter is not None or o.layer_exclude is not None),
                ("--conv-rank", bool(o.conv_rank)),
                ("--train-norm", o.train_norm),
                ("--network-weights", o.network_weights is not None),
                ("--base-weights", o.base_weights is not None),
                ("--use-tucker", o.use_tucker),
            )
            if on
        ]
        if not given:
            return []
        return [
            f"--control-lora with {', '.join(given)}: a FLUX.1 control LoRA is plain LoRA on the Linears of the "
            "transformer (--lora-layers picks them) in BFL's layout (one lora_A per fused qkv/linear1; no text encoder), trained from zero on "
            "the widened img_in; drop them"
        ]

    def _lora_bias_problems(self) -> list[str]:
        """--lora-bias needs plain LoRA and a file layout with a place for ``lora_B.bias``: BFL's control layout and
        PEFT's diffusers layout have one; kohya's ``networks.lora``/``lora_flux`` build ``lora_up`` without a bias
        (sd-scripts loads its files non-strictly, so such a bias would be dropped without a word). LoCon is plain
        LoRA on every target (``up @ down``, a kxk conv's ``lora_up`` a 1x1 conv: the same adapter), so it is
        taken: on FLUX.1 it has no conv to adapt, and where it adapts one (SD3's patch conv) the diffusers layout
        holds its bias as PEFT's conv ``lora_B`` does (``bias=lora_bias``); the control layout holds Linears only
        and ``--control-lora`` refuses other algos itself."""
        o = self.options
        if not o.lora_bias:
            return []
        problems: list[str] = []
        if not o.control_lora and o.key_layout != "diffusers":
            problems.append(
                "--lora-bias: lora_B.bias has a place in BFL's control layout (--control-lora) and PEFT's diffusers "
                "layout (--key-layout diffusers, SD3/Flux/Chroma), not in kohya's (its lora_up has no bias; "
                "sd-scripts would drop it)"
            )
        if o.algo not in ("lora", "locon") or o.use_tucker:
            problems.append(f"--lora-bias trains PEFT's lora_B bias of plain LoRA, not --algo {o.algo}"
                            f"{' --use-tucker' if o.use_tucker else ''}")  # fmt: skip
        return problems

    def _input_dropout_problems(self) -> list[str]:
        """--lora-input-dropout is PEFT's ``lora_dropout``, defined for plain LoRA's ``up(down(x))`` (LoCon's convs
        and a Tucker core read the same dropped input). Where the change is a rebuilt weight there is no LoRA input
        to drop: LoHa, LoKr, OFT..., DoRA (PEFT's DoRA drops the input of the whole rescaled layer, another
        formula) and LyCORIS' rank dropout (--rank-dropout-scale); DyLoRA and LoRA-FA are kohya's, without it."""
        o = self.options
        if not o.lora_input_dropout:
            return []
        if o.algo not in ("lora", "locon"):
            return [f"--lora-input-dropout is PEFT's lora_dropout of plain LoRA, not defined for --algo {o.algo}"]
        if o.lycoris_preset is not None:
            return ["--lora-input-dropout with --lycoris-preset: LyCORIS' modules have no PEFT lora_dropout"]
        if o.rank_dropout and o.rank_dropout_scale:
            return [
                "--lora-input-dropout with --rank-dropout-scale: LyCORIS' rank dropout rebuilds the weight, so there "
                "is no LoRA input to drop"
            ]
        return []

    def _te_rate_problems(self) -> list[str]:
        """--te1-lr/--te2-lr/--te3-lr: not negative, and for encoders that train here."""
        o = self.options
        problems: list[str] = []
        given = [f"--te{slot}-lr" for slot, rate in self.te_rate_options().items() if rate is not None]
        for slot, rate in self.te_rate_options().items():
            if rate is not None and rate < 0:
                problems.append(f"--te{slot}-lr must be 0 (untrained) or positive, got {rate}")
        wanted_te = (o.train_text_encoder or o.te_only) and not o.unet_only
        if given and not wanted_te:
            problems.append(f"{', '.join(given)}: the text encoders do not train (give --train-text-encoder)")
        elif o.te3_lr is not None and not o.train_t5:
            problems.append("--te3-lr is T5's rate: it needs --train-t5 (kohya train_t5xxl)")
        return problems

    def lr_fallback_parts(self) -> list[str]:
        """What trains at --lr for want of its own rate: the denoiser's modules without --unet-lr, the text
        encoders' without --te-lr or a --te{n}-lr, the --embedding vectors without --embedding-lr (LoRA+ ratios and
        block lr weights scale a part's rate, so they read --lr only through it). With a --te{n}-lr but no --te-lr
        the encoders left at --lr depend on the family: :meth:`family_problems` checks them. kohya trains
        ``learning_rate = 0`` with ``unet_lr`` and ``text_encoder_lr`` set, as kohya_ss GUI presets write it."""
        o = self.options
        parts = []
        if self.train_unet and o.unet_lr is None:
            parts.append("the denoiser (--unet-lr)")
        if self.train_te and o.te_lr is None and all(rate is None for rate in self.te_rate_options().values()):
            parts.append("the text encoders (--te-lr)")
        if o.embedding and o.embedding_lr is None:
            parts.append("the --embedding vectors (--embedding-lr)")
        return parts

    def _lr_fallback_family_problems(self, family: str) -> list[str]:
        """--lr 0 with per-encoder rates (--te{n}-lr, no --te-lr) that leave a training encoder of ``family`` at it
        (T5 trains only with --train-t5): the pre-flight's own wording, as where no encoder has a rate."""
        from sdcore.errors import SdcoreError
        from sdcore.models.family import get_family

        o = self.options
        rates = self.te_rate_options()
        if o.lr != 0 or not self.train_te or o.te_lr is not None or all(r is None for r in rates.values()):
            return []
        try:
            slots = {spec.slot for spec in get_family(family).text_encoders}
        except SdcoreError:
            return []  # the pre-flight reports an unknown family itself
        left = sorted(slot for slot in slots if rates[slot] is None and (slot != 3 or o.train_t5))
        if not left:
            return []
        flags = ", ".join(f"--te{slot}-lr" for slot in left)
        return [f"--lr must be positive, got {o.lr} (the text encoders without {flags} train at it)"]

    def te_rate_options(self) -> dict[int, float | None]:
        """The per-encoder rate options by kohya's encoder number (:func:`sdcore.models.family.text_encoder_slot`)."""
        o = self.options
        return {1: o.te1_lr, 2: o.te2_lr, 3: o.te3_lr}

    def te_rate(self, slot: int) -> float:
        """The learning rate of text encoder number ``slot``: its --te{slot}-lr, else --te-lr, else --lr (as
        kohya's SD3/Flux networks give each encoder its own value of ``text_encoder_lr``)."""
        given = self.te_rate_options().get(slot)
        return given if given is not None else self.part_lr(te=True)

    def part_lr(self, *, te: bool) -> float:
        """--te-lr (``te``) or --unet-lr, else --lr. A given 0 stays 0, the part's modules untrained: kohya's
        networks leave a 0-rate group out of the optimizer (``prepare_optimizer_params``), only modules a
        --module-lrs rule (network_reg_lrs) gives a rate still train."""
        rate = self.options.te_lr if te else self.options.unet_lr
        return self.options.lr if rate is None else rate

    def _kohya_module_checks(self) -> None:
        """What kohya's ``networks.lora_fa`` / ``networks.dylora`` do not have (all problems at once)."""
        o = self.options
        problems: list[str] = []
        if o.algo in ("lora_fa", "dylora") and o.use_tucker:
            problems.append(f"--use-tucker with --algo {o.algo}: kohya's networks.{o.algo} has no Tucker core")
        if o.algo == "lora_fa":
            plus = [f for f, v in (("--loraplus-lr-ratio", o.loraplus_lr_ratio),
                                   ("--loraplus-unet-lr-ratio", o.loraplus_unet_lr_ratio),
                                   ("--loraplus-text-encoder-lr-ratio", o.loraplus_text_encoder_lr_ratio)) if v is not None]  # fmt: skip
            if plus:
                problems.append(
                    f"{', '.join(plus)} with --algo lora_fa: kohya's networks.lora_fa has no LoRA+ (it ignores the "
                    "ratios; only lora_up trains anyway): drop them or use --algo lora"
                )
        if o.algo == "dylora":
            if o.dylora_unit < 1 or o.rank % o.dylora_unit:
                problems.append(f"--dylora-unit {o.dylora_unit}: --rank {o.rank} must be a positive multiple of it")
            if o.conv_rank not in (0, o.rank):
                problems.append(
                    f"--conv-rank {o.conv_rank} with --algo dylora: kohya's networks.dylora requires conv_dim = "
                    f"network_dim (--conv-rank {o.rank}, or 0 for no 3x3 convs)"
                )
            dropouts = [f for f, v in (("--dropout", o.dropout), ("--rank-dropout", o.rank_dropout),
                                       ("--module-dropout", o.module_dropout)) if v]  # fmt: skip
            if dropouts:
                problems.append(f"{', '.join(dropouts)} with --algo dylora: kohya's networks.dylora has no dropout")
            if o.scale_weight_norms:
                problems.append("--scale-weight-norms: kohya's networks.dylora has no max-norm regularisation")
            blockwise = [name for name, value in self.block_options().items() if value is not None]
            if blockwise:
                problems.append(
                    f"{', '.join('--' + n.replace('_', '-') for n in blockwise)} with --algo dylora: kohya's "
                    "networks.dylora has no block-wise ranks or learning rates"
                )
        elif o.dylora_unit != 1:
            problems.append(f"--dylora-unit is for --algo dylora (got --algo {o.algo})")
        if o.algo in LYCORIS_PLAIN:
            plain = [
                flag
                for flag, value in (
                    ("--dropout", o.dropout),
                    ("--rank-dropout", o.rank_dropout),
                    ("--rank-dropout-scale", o.rank_dropout_scale),
                    ("--use-tucker", o.use_tucker),
                    ("--scale-weight-norms", o.scale_weight_norms),
                )
                if value
            ]
            if plain:
                problems.append(
                    f"{', '.join(plain)} with --algo {o.algo}: LyCORIS' {o.algo} has no such option here "
                    f"({LYCORIS_PLAIN[o.algo]}); --module-dropout applies"
                )
        if o.decompose_both and o.algo != "lokr":
            problems.append(f"--decompose-both is LyCORIS' LoKr option (got --algo {o.algo})")
        lycoris = [f for f, v in (("--train-norm", o.train_norm), ("--rank-dropout-scale", o.rank_dropout_scale)) if v]
        if lycoris and o.algo in ("oft", "lora_fa", "dylora"):
            problems.append(
                f"{', '.join(lycoris)} with --algo {o.algo}: LyCORIS options; kohya's networks.{o.algo} has "
                "neither (use --algo lora/locon/loha/lokr/dora)"
            )
        if not o.oft_all_linear and o.algo != "oft":
            problems.append(f"--no-oft-all-linear is for --algo oft (got --algo {o.algo})")
        problems += self._lycoris_oft_problems()
        problems += self._preset_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _preset_problems(self) -> list[str]:
        """--lycoris-preset: a preset that loads, with an algo lycoris.kohya trains and options it reads."""
        o = self.options
        if o.lycoris_preset is None:
            return []
        flag = f"--lycoris-preset {o.lycoris_preset}"
        problems: list[str] = []
        try:
            preset = self.lycoris_preset()
        except ConfigError as exc:
            return [str(exc)]
        if o.algo in ("oft", "lora_fa", "dylora"):
            problems.append(f"{flag} with --algo {o.algo}: presets are LyCORIS', kohya's networks.{o.algo} has none")
        maps = [*preset.module_algo_map.values(), *preset.name_algo_map.values()] if preset else []
        if maps and o.algo == "dora":
            problems.append(
                f"{flag}: module_algo_map/name_algo_map with --algo dora (one DoRA network) is not supported"
            )
        blockwise = [name for name, value in self.block_options().items() if value is not None]
        if blockwise or o.dim_from_weights:
            given = [*blockwise, *(["dim_from_weights"] if o.dim_from_weights else [])]
            problems.append(
                f"{flag} with {', '.join('--' + n.replace('_', '-') for n in given)}: kohya networks.lora's options; "
                "lycoris.kohya ignores them"
            )
        wanted_te = (o.train_text_encoder or o.te_only) and not o.unet_only
        if (
            preset is not None
            and not (preset.has_unet and not o.te_only)
            and not (preset.has_text_encoder and wanted_te)
        ):
            problems.append(
                f"{flag}: the preset adapts nothing that trains here (its UNet/text-encoder targets are empty)"
            )
        return problems

    def _lycoris_oft_problems(self) -> list[str]:
        """The constraint and multiplier of LyCORIS' diag-oft/BOFT modules, and their options given to other algos."""
        o = self.options
        problems: list[str] = []
        if o.algo not in ("diag_oft", "boft"):
            given = [f for f, v in (("--constraint", o.constraint), ("--rescaled", o.rescaled)) if v]
            if given:
                problems.append(f"{', '.join(given)}: LyCORIS diag-oft/BOFT options (got --algo {o.algo})")
            return problems
        if o.constraint < 0 or o.constraint != o.constraint:
            problems.append(f"--constraint must be 0 (no limit) or positive (got {o.constraint})")
        if o.network_multiplier != 1 and (o.algo == "boft" or o.rescaled):
            problems.append(
                f"--network-multiplier {o.network_multiplier} with --algo {o.algo}"
                f"{' --rescaled' if o.rescaled else ''}: LyCORIS interpolates the rotations by the multiplier, "
                "which sdcore's linear multiplier matches only at 1"
            )
        return problems

    def _weights_file_problems(self) -> list[str]:
        """--dim-from-weights, --network-weights and --base-weights values (kohya's train_network.py reads them); the
        files are read as LoRA files here, so one the run would refuse after the model loads is refused in the
        pre-flight with the run's own line."""
        o = self.options
        problems: list[str] = []
        if o.dim_from_weights:
            if not o.network_weights:
                problems.append("--dim-from-weights takes the ranks from --network-weights: give that file")
            if o.algo not in ("lora", "locon"):
                problems.append(
                    f"--dim-from-weights with --algo {o.algo}: kohya reads the ranks of networks.lora files "
                    "(lora_down); train --algo lora or locon"
                )
            given = [f for f, v in (("--block-dims", o.block_dims), ("--conv-block-dims", o.conv_block_dims)) if v]
            if given:
                problems.append(
                    f"--dim-from-weights with {', '.join(given)}: kohya takes every rank from the file and "
                    "ignores the block dims; drop one"
                )
        files = self.base_weight_files()
        if o.base_weights is not None and not files:
            problems.append("--base-weights is empty: give one or more LoRA files, comma-separated")
        problems += [f"--base-weights {f}: file not found" for f in files if not Path(f).is_file()]
        # read now as the run reads them after the model loads (a junk or non-LoRA file): the same line, sooner
        from sdcore.errors import SdcoreError

        from .format import read_lora

        for file in ([o.network_weights] if o.network_weights else []) + files:
            if Path(file).is_file():
                try:
                    read_lora(file)
                except SdcoreError as exc:
                    problems.append(str(exc))
        if o.base_weights_multiplier is not None:
            if not files:
                problems.append("--base-weights-multiplier without --base-weights has nothing to scale")
            try:
                self.base_weight_multipliers()
            except ValueError:
                problems.append(
                    f"--base-weights-multiplier {o.base_weights_multiplier!r}: expected comma-separated numbers"
                )
        return problems

    def base_weight_files(self) -> list[str]:
        """The --base-weights files in order (kohya merges them one after the other)."""
        text = self.options.base_weights
        return [part.strip() for part in text.split(",") if part.strip()] if text else []

    def base_weight_multipliers(self) -> list[float]:
        """One multiplier per --base-weights file: kohya's given value, 1.0 where none is given
        (extra values are unused, as in kohya)."""
        text = self.options.base_weights_multiplier
        given = [float(part) for part in text.replace(" ", ",").split(",") if part.strip()] if text else []
        files = self.base_weight_files()
        return [given[i] if i < len(given) else 1.0 for i in range(len(files))]

    def family_problems(self, family: str) -> list[str]:
        """Options that do not apply to ``family`` (the pre-flight asks with the model header's family,
        before any weights load): kohya's block-wise options exist for SD1/SD2 (25 blocks) and SDXL (23)."""
        from .blocks import BlockPlan

        o = self.options
        problems: list[str] = []
        try:
            BlockPlan.build(
                family,
                rank=o.rank,
                alpha=self.alpha,
                conv_rank=self.conv_rank or None,
                conv_alpha=self.conv_alpha,
                block_lr_zero_threshold=o.block_lr_zero_threshold,
                **self.block_options(),
            )
        except ConfigError as exc:
            problems.append(str(exc))
        if o.lycoris_preset not in (None, "full") and not family.startswith(
            ("sd1", "sd2", "sdxl", "sd3", "flux", "chroma")
        ):
            problems.append(
                f"--lycoris-preset {o.lycoris_preset} on {family}: sdcore applies LyCORIS presets to SD1/SD2/SDXL "
                "UNets, SD3/FLUX.1/Chroma transformers and CLIP encoders (full on other families: kohya's blocks)"
            )
        problems += self._te_rate_family_problems(family)
        problems += self._lr_fallback_family_problems(family)
        problems += self._t5_only_family_problems(family)
        problems += self._train_t5_family_problems(family)
        if o.embedding:
            from .pivotal import FAMILY_LABEL, T5, family_keys

            keys = family_keys(family)
            if keys is None:
                problems.append(
                    f"--embedding on {family}: sdcore trains and bundles new embeddings for {FAMILY_LABEL} "
                    "(OneTrainer's bundle_emb layouts)"
                )
            elif o.embedding_t5 and T5 not in keys:
                problems.append(f"--embedding-t5 on {family}: this model has no T5-XXL text encoder")
        if o.train_norm and not family.startswith(("sd1", "sd2", "sdxl")):
            problems.append(
                f"--train-norm on {family}: sdcore trains LyCORIS' norm modules on the SD1/SD2/SDXL UNet's "
                "GroupNorm/LayerNorm layers only"
            )
        return problems

    def dataset_problems(self, index: DatasetIndex) -> list[str]:
        """--embedding: no caption (instance or class image's, as written: kohya's class tokens, file-name
        captions, prefix and suffix) holds any embedding's name, so its vectors would never get a gradient."""
        return self._embedding_dataset_check(index)[0]

    def dataset_notes(self, index: DatasetIndex) -> list[str]:
        """--embedding: the embeddings no caption names, when others are named (they are written untrained)."""
        return [*super().dataset_notes(index), *self._embedding_dataset_check(index)[1]]

    def _embedding_dataset_check(self, index: DatasetIndex) -> tuple[list[str], list[str]]:
        if not self.options.embedding:
            return [], []
        from .pivotal import caption_problems, parse_specs

        try:
            specs = parse_specs(self.options.embedding)
        except ConfigError:  # reported by the options' own check
            return [], []
        return caption_problems(specs, [entry.written_caption for entry in index.entries])

    def _embedding_checks(self) -> None:
        """--embedding specs, and its rate and stop only with it."""
        o = self.options
        if not o.embedding:
            for flag, value in (("--embedding-lr", o.embedding_lr), ("--embedding-stop-at", o.embedding_stop_at),
                                ("--embedding-t5", o.embedding_t5 or None)):  # fmt: skip
                if value is not None:
                    raise ConfigError(f"{flag} applies to --embedding vectors; this run trains none")
            if o.embedding_files:
                raise ConfigError("--embedding-files writes the --embedding vectors; this run trains none")
            return
        from .pivotal import file_names, parse_specs

        specs = parse_specs(o.embedding)
        if o.embedding_files:
            file_names(specs)  # every name gives its own file name
        if o.embedding_lr is not None and not o.embedding_lr >= 0:
            raise ConfigError(f"--embedding-lr must be 0 or more (got {o.embedding_lr})")
        if o.embedding_stop_at is not None and o.embedding_stop_at < 1:
            raise ConfigError(f"--embedding-stop-at must be at least 1 step (got {o.embedding_stop_at})")

    def _te_rate_family_problems(self, family: str) -> list[str]:
        """A --te{n}-lr for an encoder the family does not have."""
        from sdcore.errors import SdcoreError
        from sdcore.models.family import get_family

        try:
            slots = {spec.slot for spec in get_family(family).text_encoders}
        except SdcoreError:
            return []  # the pre-flight reports an unknown family itself
        what = {1: "CLIP-L/OpenCLIP", 2: "CLIP-G", 3: "T5"}
        return [
            f"--te{slot}-lr: a {family} model has no {what[slot]} text encoder"
            for slot, rate in self.te_rate_options().items()
            if rate is not None and slot not in slots
        ]

    def _train_t5_family_problems(self, family: str) -> list[str]:
        """--train-t5 on a family without a T5-XXL encoder (SD1/SD2/SDXL): it would train nothing more, in silence
        (kohya's train_t5xxl exists only in its SD3/FLUX.1 scripts)."""
        from sdcore.errors import SdcoreError
        from sdcore.models.family import get_family

        if not self.options.train_t5:
            return []
        try:
            slots = {spec.slot for spec in get_family(family).text_encoders}
        except SdcoreError:
            return []  # the pre-flight reports an unknown family itself
        if 3 in slots:
            return []
        return [f"--train-t5 trains the T5-XXL encoder of SD3/FLUX.1/Chroma; {family} has none: drop it"]

    def _t5_only_family_problems(self, family: str) -> list[str]:
        """--train-text-encoder/--te-only on a family whose only text encoder is T5-XXL (Chroma) without --train-t5:
        the text-encoder LoRA covers T5 only with --train-t5 (kohya's train_t5xxl), so no text-encoder module would
        exist, and the run would encode every step for nothing (--te-only: train nothing at all)."""
        from sdcore.errors import SdcoreError
        from sdcore.models.family import get_family

        o = self.options
        if not ((o.train_text_encoder or o.te_only) and not o.unet_only) or o.train_t5 or o.lycoris_preset:
            return []  # a LyCORIS preset picks its own text-encoder classes (CLIP's; none on Chroma), --train-t5 or not
        try:
            slots = {spec.slot for spec in get_family(family).text_encoders}
        except SdcoreError:
            return []  # the pre-flight reports an unknown family itself
        if slots != {3}:
            return []
        flag = "--te-only" if o.te_only else "--train-text-encoder"
        return [
            f"{flag} on {family}: its only text encoder is T5-XXL, which a LoRA trains with --train-t5 (kohya "
            "train_t5xxl); without it no text-encoder module would train"
        ]

    def capabilities(self) -> Capabilities:
        # kohya's slots: the CLIP encoders train with the text encoder, T5 only with train_t5 (so a cached T5);
        # --embedding vectors live in the encoders' input embeddings, so the encoders whose vectors train encode
        # every step: the CLIP ones, T5 with --embedding-t5 (an untrained T5's vectors are constant: it may be
        # cached as for a CLIP-only LoRA). The family is unknown here, so Chroma gets {1, 2} too, though its lone
        # T5 is what trains (pivotal.trained_keys): the slots' one reader, partial_text_encoders, never splits a
        # one-encoder family, and trains_text_encoder keeps Chroma's T5 running every step (tests/test_pivotal.py)
        t5 = self.options.train_t5 or (bool(self.options.embedding) and self.options.embedding_t5)
        if self.train_te or self.options.embedding:
            trained: frozenset[int] | None = frozenset({1, 2, 3} if t5 else {1, 2})
        else:
            trained = None
        return Capabilities(trains_text_encoder=self.train_te or bool(self.options.embedding), per_sample_strength=True,
                            trained_text_encoders=trained, control_channels=self.options.control_lora)  # fmt: skip

    # --- setup -----------------------------------------------------------------------------------
    def block_options(self) -> dict[str, str | None]:
        """kohya's block-wise options as written (comma-separated text, ``None`` when unset)."""
        o = self.options
        names = (
            "block_dims",
            "block_alphas",
            "conv_block_dims",
            "conv_block_alphas",
            "down_lr_weight",
            "mid_lr_weight",
            "up_lr_weight",
        )
        return {name: getattr(o, name) for name in names}

    def block_plan(self, family: str) -> BlockPlan | None:
        """kohya's per-block dims/alphas/lr weights for ``family`` (``None`` when none is set)."""
        from .blocks import BlockPlan

        o = self.options
        return BlockPlan.build(
            family,
            rank=o.rank,
            alpha=self.alpha,
            conv_rank=self.conv_rank or None,
            conv_alpha=self.conv_alpha,
            block_lr_zero_threshold=o.block_lr_zero_threshold,
            **self.block_options(),
        )

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        from .naming import ModuleIndex
        from .network import LoraNetwork

        for module in bundle.components().values():
            module.requires_grad_(False)
        if self.options.control_lora:
            self._widen_for_control(bundle)
        index = ModuleIndex.from_bundle(bundle)
        self._check_layout(index)
        shapes_only = any(p.is_meta for m in bundle.components().values() for p in m.parameters())
        if self.options.base_weights and not shapes_only:  # the memory plan's model has no weights to merge into
            self._merge_base_weights(bundle, index)
        plan = self.block_plan(bundle.family)
        file_ranks = self._ranks_from_weights(index) if self.options.dim_from_weights else None
        # kohya builds a network from a file's ranks over the conv targets too (modules_dim given)
        conv = self.conv_rank > 0 or bool(plan and plan.conv_dims) or file_ranks is not None
        from .presets import DIT_PRESET_FAMILIES

        walks = index.denoiser == "unet" or index.family.startswith(DIT_PRESET_FAMILIES)
        preset = self.lycoris_preset() if walks else None
        if preset is not None:
            network = self._preset_network(bundle, index, preset)
            return self._finish_prepare(bundle, index, network, plan)
        targets = index.select(unet=self.train_unet, text_encoder=self.train_te, conv=conv, t5=self.options.train_t5)
        targets += self._extra_targets(index, targets)
        if self.options.control_lora:  # diffusers' --lora_layers over the transformer's Linears
            from .dit import control_lora_layers, control_targets

            targets = control_lora_layers(control_targets(index), self.options.lora_layers)
        if self.options.algo == "oft" and index.kohya:  # kohya networks.oft_flux: its BFL Linears, split per part
            from .dit import oft_flux_modules

            paths = {p.path for m in oft_flux_modules(index, self.options.oft_all_linear) for p in m.parts}
            targets = [t for t in targets if t.component == index.denoiser and t.path in paths]
        elif self.options.algo == "oft" and not self.options.oft_all_linear:
            # kohya networks.oft without enable_all_linear: its CrossAttention modules' Linears only
            targets = [t for t in targets if "_attn1_" in t.name or "_attn2_" in t.name]
        targets = self._layer_filtered(index, targets, lambda t: t)
        shared, swapped = self._fused_groups(index, targets, self.options.algo)
        network = LoraNetwork.create(
            targets,
            rank=self.options.rank,
            alpha=self.alpha,
            conv_rank=self.conv_rank,
            conv_alpha=self.conv_alpha,
            dropout=self.options.dropout,
            rank_dropout=self.options.rank_dropout,
            module_dropout=self.options.module_dropout,
            algo=self.options.algo,
            lokr_factor=self.options.lokr_factor,
            dylora_unit=self.options.dylora_unit,
            use_tucker=self.options.use_tucker,
            rank_for=self._module_rank_for(index, self._rank_for(plan, file_ranks)),
            shared_down=shared,
            swapped=swapped,
            multiplier=self.options.network_multiplier,
            decompose_both=self.options.decompose_both,
            rank_dropout_scale=self.options.rank_dropout_scale,
            constraint=self.options.constraint,
            rescaled=self.options.rescaled,
            norms=index.select_norms(conv=conv) if self.options.train_norm and self.train_unet else (),
            lora_bias=self.options.lora_bias,
            input_dropout=self.options.lora_input_dropout,
        )
        groups = self._finish_prepare(bundle, index, network, plan)
        if self.options.train_norm_layers and self.part_lr(te=False):
            # diffusers' --train_norm_layers: the RMSNorm scales at the LoRA's U-Net rate (a 0 rate: untrained)
            norms = [target.module.weight for target in index.scales.values()]
            for param in norms:
                param.requires_grad_(True)
            groups.append({"params": norms, "lr": self.part_lr(te=False), "name": "norm_scales"})
        return groups

    def _widen_for_control(self, bundle: ModelBundle) -> None:
        """--control-lora: dev's ``img_in`` takes the control image's latents too (zero columns, as diffusers'
        trainer widens it), for the run; a FLUX.1 Kontext model is refused here, where it is first known."""
        from sdcore.models.flux.control import TRAINING_WIDENER, widen_img_in, widened_by
        from sdcore.models.flux.variants import bundle_variant
        from sdcore.train.control_lora import kontext_refusal

        from .format import CONTROL_WIDTH

        if bundle.family != "flux" or bundle.transformer is None:  # the pre-flight says it before loading
            raise ConfigError(f"--control-lora trains FLUX.1 dev; this model is {bundle.family}")
        if bundle_variant(bundle) == "kontext":
            raise ConfigError(kontext_refusal(str(bundle.source or "this model")))
        if widened_by(bundle) != TRAINING_WIDENER:
            widen_img_in(bundle, CONTROL_WIDTH, TRAINING_WIDENER)

    def _fused_groups(
        self, index: ModuleIndex, targets: list[Target], algo: str
    ) -> tuple[list[Any], dict[str, tuple[bool, ...]]]:
        """SD3/Flux: the targets trained as one module per fused SAI/BFL Linear (kohya's one LoRA per
        qkv/linear1 unless split_qkv; LyCORIS' one LoHa/LoKr per fused or half-swapped Linear). Other
        algos on a fused layer's parts are refused: kohya's names have no place for them."""
        if not index.kohya or algo == "oft":
            return [], {}
        from .adapters import FUSED_ADAPTERS
        from .dit import fused_groups, shared_down_groups

        if algo in FUSED_ADAPTERS:
            return fused_groups(index, targets)  # type: ignore[return-value]
        if algo in ("lora", "locon"):
            return ([] if self.options.split_qkv else shared_down_groups(index, targets)), {}
        parts = {t.path for t in targets if t.component == index.denoiser}
        fused = [m.name for m in index.kohya.values() if not m.direct and parts & {p.path for p in m.parts}]
        if fused:
            raise ConfigError(
                f"algo {algo} on {len(fused)} fused SAI/BFL layers ({', '.join(fused[:3])}): sdcore trains "
                "lora, loha or lokr there (one module over the fused weight, as LyCORIS)"
            )
        return [], {}

    def _layer_filtered(self, index: ModuleIndex, items: list[Any], target_of: Callable[[Any], Target]) -> list[Any]:
        """``items`` (targets or preset choices) without the denoiser modules --layer-filter leaves out
        (OneTrainer's rule, :class:`~sdplugin_lora.naming.LayerFilter`, on the path inside the denoiser; the
        text encoders are not filtered, as in OneTrainer). A pattern that matches none of the candidates is
        refused, as OneTrainer refuses an unused filter."""
        o = self.options
        if o.layer_filter is None and o.layer_exclude is None:
            return items
        from .naming import LayerFilter

        candidates = sorted({target_of(i).path for i in items if target_of(i).component == index.denoiser})
        kept = set(candidates)
        if o.layer_filter is not None:
            layer_filter = LayerFilter.parse(o.layer_filter, regex=o.layer_filter_regex)
            kept, unused = layer_filter.select(candidates)
            if unused:
                examples = ", ".join(candidates[:3]) or "none: nothing of the denoiser is adapted"
                raise ConfigError(
                    f"--layer-filter{' (regex)' if o.layer_filter_regex else ''}: {', '.join(map(repr, unused))} "
                    f"matches none of the {len(candidates)} {index.denoiser} modules this run adapts (their "
                    f"diffusers paths, e.g. {examples}; `sdcore lora targets` lists them)"
                )
        if o.layer_exclude is not None:  # ai-toolkit's ignore_if_contains: wins over the filter; unused is no error
            exclude = LayerFilter.parse(o.layer_exclude, regex=o.layer_filter_regex, flag="--layer-exclude")
            kept -= exclude.select(kept)[0]
        return [i for i in items if target_of(i).component != index.denoiser or target_of(i).path in kept]

    def _finish_prepare(
        self, bundle: ModelBundle, index: ModuleIndex, network: LoraNetwork, plan: BlockPlan | None
    ) -> list[dict[str, Any]]:
        slots = {spec.component: spec.slot for spec in _family_encoders(bundle)}
        self._te_slots = {
            name: slots.get(index.targets[name].component, 1)
            for name in network.loras
            if name in index.targets and index.targets[name].is_text_encoder
        }
        if self.options.network_weights:
            self._warm_start(network, index, self.options.network_weights)
        if self.ggpo is not None:
            from .ggpo import enable

            try:
                enable(network, *self.ggpo)
            except TypeError as exc:
                raise ConfigError(f"--ggpo-sigma/--ggpo-beta: {exc}") from None
        network.to(bundle.device)
        network.train()
        network.attach()
        self.network = network
        self.index = index
        groups = self.param_groups(network, plan)
        if self.options.embedding:
            groups.append(self._add_embeddings(bundle))
        return groups

    def _add_embeddings(self, bundle: ModelBundle) -> dict[str, Any]:
        """--embedding: the new tokens in ``bundle`` (sdcore's token API), their optimizer group at
        --embedding-lr (else --lr)."""
        from .pivotal import PivotalEmbeddings, parse_specs

        if self.pivotal is not None:  # a second prepare (the pre-flight's plan, then the run) starts afresh
            self.pivotal.remove()
        self.pivotal = PivotalEmbeddings(parse_specs(self.options.embedding), train_t5=self.options.embedding_t5)
        self.pivotal.add(bundle)
        lr = self.options.embedding_lr if self.options.embedding_lr is not None else self.options.lr
        return self.pivotal.param_group(float(lr))

    def caption_for(self, caption: str, *, is_class: bool, rng: Any) -> str:
        """--embedding: each name in a caption becomes its tokens (OneTrainer replaces the placeholder in every
        caption, class images' too)."""
        return caption if self.pivotal is None else self.pivotal.expand(caption)

    def _preset_network(self, bundle: ModelBundle, index: ModuleIndex, preset: LycorisPreset) -> LoraNetwork:
        """The modules :func:`sdplugin_lora.presets.select` picks, each with its map entry's algo, rank, alpha,
        factor and Tucker setting (LyCORIS: a map's ``dim``/``alpha`` replace the network's for Linear and
        kxk conv alike; 0 or missing keeps them); modules sharing settings are built together."""
        from .network import LoraNetwork
        from .presets import select

        o = self.options
        choices = select(
            bundle,
            index,
            preset,
            unet=self.train_unet,
            text_encoder=self.train_te,
            conv=self.conv_rank > 0,
            norms=o.train_norm,
        )
        if not choices:
            raise ConfigError(
                f"--lycoris-preset {preset.name}: the preset selects no module of this {index.family} model"
            )
        choices = self._layer_filtered(index, choices, lambda c: c.target)
        groups: dict[Any, list[Choice]] = {}
        for choice in choices:
            groups.setdefault((choice.norm, choice.settings), []).append(choice)
        built: dict[str, Any] = {}
        owner: dict[str, str] = {}  # target -> the fused module it belongs to (SD3/Flux)
        for (norm, settings), members in groups.items():
            s = settings
            algo = (s.algo if s and s.algo else None) or o.algo
            shared, swapped = self._fused_groups(index, [] if norm else [c.target for c in members], algo)
            owner.update({t.name: name for name, group in shared for t in group})
            conv_alpha = self.conv_alpha if self.conv_alpha is not None else self.alpha
            network = LoraNetwork.create(
                [] if norm else [c.target for c in members],
                rank=(s.dim if s and s.dim else None) or o.rank,
                alpha=(s.alpha if s and s.alpha else None) or self.alpha,
                conv_rank=(s.dim if s and s.dim else None) or self.conv_rank,
                conv_alpha=(s.alpha if s and s.alpha else None) or conv_alpha,
                dropout=o.dropout,
                rank_dropout=o.rank_dropout,
                module_dropout=o.module_dropout,
                algo=algo,
                lokr_factor=s.factor if s and s.factor is not None else o.lokr_factor,
                use_tucker=s.use_tucker if s and s.use_tucker is not None else o.use_tucker,
                multiplier=o.network_multiplier,
                decompose_both=s.decompose_both if s and s.decompose_both is not None else o.decompose_both,
                rank_dropout_scale=o.rank_dropout_scale,
                constraint=o.constraint,
                rescaled=o.rescaled,
                norms=[c.target for c in members] if norm else (),
                shared_down=shared,
                swapped=swapped,
            )
            built.update(network.loras)
        order = dict.fromkeys(owner.get(c.target.name, c.target.name) for c in choices)
        return LoraNetwork([built[name] for name in order if name in built])

    def _extra_targets(self, index: ModuleIndex, chosen: list[Target]) -> list[Target]:
        """--extra-module-ranks: the denoiser modules outside the default targets whose kohya name a rule
        matches (kohya's in_dims/emb_dims add the embedders only when asked for)."""
        extra = self.module_rank_rules()[1]
        if not extra or not self.train_unet:
            return []
        from .module_rules import first_match, kohya_names

        names = kohya_names(index)
        taken = {t.name for t in chosen}
        return [t for t in index.targets.values()
                if t.component == index.denoiser and t.group == "other" and t.name not in taken
                and first_match(extra, names[t.name]) >= 0]  # fmt: skip

    def _module_rank_for(
        self, index: ModuleIndex, inner: Callable[[Any], tuple[int, float | None] | None] | None
    ) -> Callable[[Any], tuple[int, float | None] | None] | None:
        """kohya lora_flux's order: a --module-ranks rule (first match), else an extra module's
        --extra-module-ranks rule, else ``inner`` (block dims, the file's ranks) or the defaults. A rule's
        module keeps the run's alpha (kohya: network_alpha; a kxk conv: --conv-alpha when set)."""
        ranks, extra = self.module_rank_rules()
        if not ranks and not extra:
            return inner
        from .module_rules import first_match, kohya_names

        names = kohya_names(index)

        def rank_for(target: Any) -> tuple[int, float | None] | None:
            name = names.get(target.name, target.name)
            alpha = self.conv_alpha if target.is_conv3x3 and self.conv_alpha is not None else self.alpha
            found = first_match(ranks, name)
            if found >= 0:
                return int(ranks[found].value), alpha
            if target.group == "other" and target.component == index.denoiser:
                found = first_match(extra, name)
                if found >= 0:
                    return int(extra[found].value), alpha
            return inner(target) if inner is not None else None

        return rank_for

    @staticmethod
    def _rank_for(
        plan: BlockPlan | None, file_ranks: dict[str, tuple[int, float]] | None
    ) -> Callable[[Any], tuple[int, float | None] | None] | None:
        """Per-target (rank, alpha): the file's with --dim-from-weights (0 = no module, as kohya
        skips modules the file lacks), else the block plan's, else the defaults."""
        if file_ranks is not None:
            return lambda t: file_ranks.get(t.name, (0, None))
        if plan is not None:
            return lambda t: plan.rank_for(t.name, t.is_conv3x3)
        return None

    def _ranks_from_weights(self, index: ModuleIndex) -> dict[str, tuple[int, float]]:
        """kohya ``create_network_from_weights``: each module's rank (its ``lora_down`` rows) and
        alpha (the stored one; a file without alpha means alpha = rank) from --network-weights."""
        from .format import match_modules, read_lora

        path = self.options.network_weights
        if not path:
            raise ConfigError("--dim-from-weights takes the ranks from --network-weights: give that file")
        lora = read_lora(path)
        match = match_modules(lora, index)
        ranks: dict[str, tuple[int, float]] = {}
        for name, (_target, weights) in match.modules.items():
            if not weights.plain_lora:
                raise ConfigError(
                    f"--dim-from-weights: {path} module {name} is {weights.kind}"
                    f"{' with DoRA' if weights.is_dora else ''}{' with a Tucker core' if weights.is_tucker else ''}; "
                    "kohya reads the ranks of plain LoRA (lora_down/lora_up) files"
                )
            ranks[name] = (weights.rank, weights.alpha)
        return ranks

    def _merge_base_weights(self, bundle: ModelBundle, index: ModuleIndex) -> None:
        """kohya ``--base_weights``: merge each file into the model's weights (``W += m * dW``) before
        the network is built, so the trained LoRA is the difference on top of them. The merge is
        the one generation uses (``apply_loras(merge=True)``); modules of the file the model lacks
        are reported, as kohya skips them."""
        from .apply import LoraSpec, apply_loras
        from .format import read_lora

        specs = []
        for path, multiplier in zip(self.base_weight_files(), self.base_weight_multipliers(), strict=True):
            lora = read_lora(path)
            if NETWORK_MODULE[self.options.algo] == "networks.lora":
                # kohya merges with the run's network module: networks.lora reads lora_down/lora_up pairs
                # only, so it would leave LoHa/LoKr modules out and merge a DoRA without its magnitude
                other = sorted(
                    {("dora" if w.is_dora else w.kind) for w in lora.modules.values() if w.kind != "lora" or w.is_dora}
                )
                if other:
                    raise ConfigError(
                        f"--base-weights {path}: its {', '.join(other)} modules are not merged by kohya's "
                        f"networks.lora (--algo {self.options.algo}); train a LyCORIS --algo (lycoris.kohya "
                        "merges them), or merge the file into the model first (sdcore lora merge --model)"
                    )
            specs.append(LoraSpec(lora, multiplier))
        import torch

        with torch.random.fork_rng(devices=[]):  # building the merge adapters draws no init from the run's seed
            apply_loras(bundle, specs, merge=True, index=index)

    def _check_layout(self, index: ModuleIndex) -> None:
        """Refuse before training what could not be saved: kohya's SD3/Flux names fuse q/k/v, which
        only plain LoRA can express exactly; the diffusers layout is written for SD3/Flux only."""
        o = self.options
        if not index.kohya:
            if o.key_layout != "kohya":
                raise ConfigError(
                    f"--key-layout {o.key_layout}: written for SD3/Flux models; {index.family} uses kohya"
                )
            if o.split_qkv:
                raise ConfigError(
                    f"--split-qkv: SD3/Flux only (their q/k/v are one fused Linear); {index.family} has separate ones"
                )
            return
        if o.algo == "oft" and index.family in ("flux", "chroma"):  # kohya networks.oft_flux (flux_train_network.py)
            given = [f for f, v in (("--key-layout diffusers", o.key_layout == "diffusers"),
                                    ("--split-qkv", o.split_qkv)) if v]  # fmt: skip
            if given:
                raise ConfigError(
                    f"{', '.join(given)} with --algo oft: kohya's networks.oft_flux writes its own layout (oft_unet_ "
                    "names, one block set per q/k/v/MLP part); diffusers/PEFT files hold LoRA only"
                )
            return
        if o.algo in ("loha", "lokr") and index.family.startswith(("flux", "sd3", "chroma")):
            # lycoris.kohya: one LoHa/LoKr per fused SAI/BFL Linear, saved under kohya's names
            given = [f for f, v in (("--key-layout diffusers", o.key_layout == "diffusers"),
                                    ("--split-qkv", o.split_qkv)) if v]  # fmt: skip
            if given:
                raise ConfigError(
                    f"{', '.join(given)} with --algo {o.algo}: LyCORIS adapts each fused qkv/linear1 Linear as one "
                    "module (kohya names); diffusers/PEFT files hold LoRA only and LyCORIS has no split_qkv"
                )
            return
        if o.algo not in ("lora", "locon"):
            raise ConfigError(
                f"--algo {o.algo} on {index.family}: kohya's {index.family} names fuse q/k/v (and Flux's MLP input), "
                "which sdcore trains as plain LoRA, or LoHa/LoKr on SD3/FLUX.1/Chroma (one LyCORIS module per fused "
                "Linear); train --algo lora, loha or lokr"
            )

    def param_groups(self, network: LoraNetwork, plan: BlockPlan | None = None) -> list[dict[str, Any]]:
        """Optimizer groups as kohya builds them: UNet and text encoder at their learning rates,
        each UNet block at ``lr x its lr weight``, and with LoRA+ the ``lora_up`` weights at
        ``lr x ratio``. With a per-encoder rate (--te1-lr/--te2-lr/--te3-lr) each text encoder has its
        own groups (``text_encoder1``...), as kohya's SD3/Flux networks split ``text_encoder_lr``.
        Groups whose learning rate is 0 are left out (as kohya's ``prepare_optimizer_params``: a 0 --unet-lr or
        --te-lr keeps that part untrained, except the modules a --module-lrs rule gives a rate)."""
        o = self.options
        per_encoder = any(rate is not None for rate in self.te_rate_options().values())
        from .module_rules import first_match, kohya_names, parse_rules

        rules = parse_rules(o.module_lrs, flag="--module-lrs", integer=False)[0]
        names = kohya_names(self.index) if rules and self.index is not None else {}
        groups: list[dict[str, Any]] = []
        for te in (False, True):
            base_lr = self.part_lr(te=te)
            ratio = (o.loraplus_text_encoder_lr_ratio if te else o.loraplus_unet_lr_ratio) or o.loraplus_lr_ratio
            buckets: dict[tuple[int, int, int, bool], list[Any]] = {}
            weights: dict[int, float] = {}
            for module in network:
                if module.lora_name.startswith("lora_te") != te:
                    continue
                slot = self._te_slots.get(module.lora_name, 1) if te and per_encoder else 0
                block = plan.block(module.lora_name) if plan is not None and plan.lr_weights and not te else -1
                weights[block] = plan.lr_weight(module.lora_name) if plan is not None and block >= 0 else 1.0
                rule = first_match(rules, names.get(module.lora_name, module.lora_name)) if rules else -1
                for name, param in module.named_parameters():
                    if not param.requires_grad:  # LoRA-FA's frozen lora_down
                        continue
                    plus = ratio is not None and ("lora_up" in name or "lora_B" in name)  # kohya dylora: lora_B
                    buckets.setdefault((slot, block, rule, plus), []).append(param)
            if ratio is not None and buckets and not any(plus for *_, plus in buckets):
                log.warning("%s", f"LoRA+ has no effect on {o.algo}: it has no lora_up weights")
            for (slot, block, rule, plus), params in sorted(buckets.items()):
                lr = (self.te_rate(slot) if slot else base_lr) * weights[block]
                lr = rules[rule].value if rule >= 0 else lr  # kohya network_reg_lrs: the rule's rate replaces it
                lr *= ratio if plus and ratio is not None else 1.0
                if lr == 0:
                    continue
                name = ("text_encoder" + (str(slot) if slot else "")) if te else "unet"
                name += f"_block{block:02d}" if block >= 0 else ""
                name += f"_rule{rule}" if rule >= 0 else ""
                name += "_plus" if plus else ""
                groups.append({"params": params, "lr": lr, "name": name})
        if not groups and any(True for _ in network):
            raise ConfigError(
                "every LoRA module's learning rate is 0 (--unet-lr/--te-lr/--te1-lr.../--module-lrs; kohya unet_lr, "
                "text_encoder_lr, network_reg_lrs): nothing would train"
            )
        return groups

    def plan_notes(self) -> list[str]:
        """With --module-ranks/--extra-module-ranks/--module-lrs: how many modules got each rank, and each rate."""
        o = self.options
        if self.network is None or not (o.module_ranks or o.extra_module_ranks or o.module_lrs):
            return []
        from collections import Counter

        ranks = Counter(int(getattr(module, "rank", 0) or 0) for module in self.network)
        shown = ", ".join(f"rank {rank} x{count}" for rank, count in sorted(ranks.items(), reverse=True))
        lines = [f"LoRA network: {len(self.network)} modules ({shown})"]
        if o.module_lrs:
            from .module_rules import first_match, kohya_names, parse_rules

            rules = parse_rules(o.module_lrs, flag="--module-lrs", integer=False)[0]
            names = kohya_names(self.index) if self.index is not None else {}
            hits = Counter(first_match(rules, names.get(m.lora_name, m.lora_name)) for m in self.network)
            parts = [f"{rule.pattern!r} -> lr {rule.value:g} on {hits[i]} modules" for i, rule in enumerate(rules)]
            lines.append("--module-lrs: " + "; ".join(parts))
        return lines

    @staticmethod
    def _warm_start(network: LoraNetwork, index: Any, path: str) -> None:
        """Copy the modules of an existing file into the new network (kohya ``--network_weights``)."""
        from .format import match_modules, read_lora

        lora = read_lora(path)
        match = match_modules(lora, index)
        from .adapters import SharedDownLora
        from .network import OFT_PREFIX

        names = set(network.loras)
        shared = {name: m for name, m in network.loras.items() if isinstance(m, SharedDownLora)}
        if shared:  # SD3/Flux: the fused module as the file has it, or rebuilt from its parts' modules
            from sdcore.errors import NetworkMismatchError

            from .dit import shared_down_weights

            by_path = {target.path: weights for target, weights in match.modules.values()}
            for name, adapter in shared.items():
                fused = shared_down_weights(name, index.kohya[name], lora.modules.get(name), by_path)
                if fused is None or fused.rank != adapter.rank:
                    if fused is not None or any(part in by_path for part in adapter.paths):
                        raise NetworkMismatchError(
                            f"{path}: {name} is not one rank-{adapter.rank} LoRA shared by "
                            f"{', '.join(adapter.paths)} (trained with split_qkv?); "
                            "pass --split-qkv to continue it, or another --rank"
                        )
                    continue
                for part in adapter.paths:
                    target_name = index.name_of(index.denoiser, part)
                    match.modules.pop(target_name, None)
                match.modules[name] = (index.targets[index.name_of(index.denoiser, adapter.paths[0])], fused)

        def own_name(name: str) -> str:  # kohya OFT modules are named oft_unet_... in the network
            oft = OFT_PREFIX + name[len("lora_unet") :]
            return oft if name not in names and oft in names else name

        state = {
            f"{own_name(name)}.{part}": tensor
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
            log.warning(
                "%s",
                f"{path}: warm start left {len(missing)} new modules at their init; "
                f"{len(unused) + len(match.unmatched)} file modules/keys unused",
            )

    def on_step_end(self, bundle: ModelBundle, step: int) -> dict[str, float] | None:
        """kohya's max-norm regularisation after the optimizer step (``--scale-weight-norms``);
        reports kohya's "Keys Scaled" / "Average key norm" / max key norm as ``keys_scaled``,
        ``avg_key_norm`` and ``max_key_norm``. Without it, with LoRA-GGPO, kohya's GGPO norms
        ``avg_key_norm``, ``avg_grad_norm``, ``avg_combined_norm`` (:func:`sdplugin_lora.ggpo.log_values`;
        kohya logs them as ``norm/<name>``, and with max-norm only max-norm's)."""
        limit = self.options.scale_weight_norms
        if not limit:
            if self.ggpo is None:
                return None
            from .ggpo import log_values

            return log_values(self._require_network()) or None
        scaled, mean, top = self._require_network().apply_max_norm(limit)
        return {"keys_scaled": float(scaled), "avg_key_norm": mean, "max_key_norm": top}

    def before_optimizer_step(self, bundle: ModelBundle, step: int) -> None:
        """kohya's LoRA-GGPO norms (:func:`sdplugin_lora.ggpo.update`), from this step's final gradients and
        the weights they were taken at, as kohya's train_network.py takes them before ``optimizer.step()``."""
        if self.ggpo is not None:
            from .ggpo import update

            update(self._require_network())
        if self.pivotal is not None:
            self.pivotal.stop(step, self.options.embedding_stop_at)

    def stop_text_encoder(self, bundle: ModelBundle) -> None:
        """Freeze the ``lora_te*`` modules (the runtime's text-encoder stop, :mod:`sdcore.train.te_stop`):
        no gradient and no optimizer update from now on, and eval mode, so that their dropout no longer
        applies (they act as in the saved file); the UNet modules keep training."""
        self._te_frozen = True
        for module in self._te_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)
                param.grad = None

    def _te_modules(self) -> list[Any]:
        return [module for module in self._require_network() if module.lora_name.startswith("lora_te")]

    @contextlib.contextmanager
    def network_strength(self, strengths: torch.Tensor) -> Iterator[None]:
        """kohya's per-dataset ``network_multiplier``: every algorithm's change is scaled per sample
        (on top of ``--network-multiplier``; :meth:`LoraNetwork.sample_strengths`)."""
        with self._require_network().sample_strengths(strengths):
            yield

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[dict[str, Any]]:
        """Sample images and the validation loss (the runtime enters this for both): the network in eval
        mode (dropouts off) and, as its weights cannot change meanwhile, each weight-rebuilding module's
        change computed once (:meth:`LoraNetwork.cached_changes`; the same outputs, fewer rebuilds),
        dropped again when training resumes."""
        network = self.network
        was_training = bool(network is not None and network.training)
        if network is not None:
            network.eval()
        extra: dict[str, Any] = {}
        if self.pivotal is not None:  # sample prompts name the embeddings as the captions do
            from sdcore.generate.session import NetworkSession

            from .pivotal import LivePivotal

            extra["networks"] = NetworkSession({None: [LivePivotal(self.pivotal)]})
        try:
            with network.cached_changes() if network is not None else contextlib.nullcontext():
                yield extra
        finally:
            if network is not None and was_training:
                network.train()
                if self._te_frozen:  # stopped text-encoder modules stay in eval mode
                    for module in self._te_modules():
                        module.eval()

    # --- state -----------------------------------------------------------------------------------
    def _require_network(self) -> LoraNetwork:
        if self.network is None:
            raise RuntimeError("LoraMethod.prepare() has not run")
        return self.network

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The raw trained tensors plus, for modules max-norm rescaled the LyCORIS way, their
        ``scalar`` (float64, ``<module>.sdcore_scalar``), so that a resumed run continues exactly."""
        import torch

        from .network import unbaked_scalars

        network = self._require_network()
        with unbaked_scalars(network):
            state = {k: v.detach().float().cpu().clone() for k, v in network.state_dict().items()}
        for name, module in network.loras.items():
            if module.scalar != 1.0:
                state[f"{name}.{_SCALAR_KEY}"] = torch.tensor(module.scalar, dtype=torch.float64)
        state.update({_NORM_STATE + key: value.detach().float().cpu().clone() for key, value in self._norms().items()})
        if self.ggpo is not None:  # the last GGPO norms: a resumed run's first step has the same noise scale
            from .ggpo import state_dict

            state.update(state_dict(network, _GGPO_KEY))
        if self.pivotal is not None:
            state.update(self.pivotal.state_dict())
        return state

    def _norms(self) -> dict[str, torch.Tensor]:
        """--train-norm-layers: the trained RMSNorm scales by BFL's name (empty otherwise)."""
        if not self.options.train_norm_layers or self.index is None:
            return {}
        return {bfl: target.module.weight for bfl, target in self.index.scales.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        network = self._require_network()
        norms, state = self._norms(), dict(state)
        from .pivotal import STATE_PREFIX

        vectors = {k: state.pop(k) for k in [k for k in state if k.startswith(STATE_PREFIX)]}
        if self.pivotal is not None:
            self.pivotal.load_state_dict(vectors)
        with torch.no_grad():
            for key in [k for k in state if k.startswith(_NORM_STATE)]:
                norms[key[len(_NORM_STATE) :]].copy_(state.pop(key))
        ggpo = {k: state.pop(k) for k in [k for k in state if k.rsplit(".", 1)[-1].startswith(_GGPO_KEY)]}
        if self.ggpo is not None:
            from .ggpo import load_state_dict

            load_state_dict(network.loras, ggpo, _GGPO_KEY)
        scalars = {k: v for k, v in state.items() if k.endswith(f".{_SCALAR_KEY}")}
        network.load_kohya_state_dict({k: v for k, v in state.items() if k not in scalars})
        modules = network.loras
        for key, value in scalars.items():
            modules[key.rsplit(".", 1)[0]].scalar = float(value)

    def _te_lr_metadata(self, bundle: ModelBundle) -> float | list[float]:
        """``ss_text_encoder_lr`` as kohya writes it: one number, or with different per-encoder rates kohya's
        list (``text_encoder_lr``), one value per training text encoder in the family's order."""
        trained = [s.slot for s in _family_encoders(bundle) if s.slot != 3 or self.options.train_t5]
        rates = [self.te_rate(slot) for slot in trained]
        return rates if len(set(rates)) > 1 else self.te_rate(trained[0] if trained else 1)

    def metadata(self, bundle: ModelBundle, info: SaveInfo) -> dict[str, str]:
        from sdcore.data.dataset import run_resolution_pair

        from .format import network_metadata

        o = self.options
        args: dict[str, Any] = {}
        if o.rank_dropout:
            args["rank_dropout"] = o.rank_dropout
        if o.module_dropout:
            args["module_dropout"] = o.module_dropout
        if self.ggpo is not None:  # kohya's ss_network_args holds the network_args as given
            args["ggpo_sigma"], args["ggpo_beta"] = self.ggpo
        extra: dict[str, Any] = {**kohya_training_metadata(o, info), **flow_metadata(o, bundle.family), **info.metadata}
        extra.update(self._module_rule_metadata(args))
        if bundle.family == "sd3" and (o.min_timestep, o.max_timestep) == (0, None):
            # the kohya SD3 default (integer timesteps over the whole range): kohya records a range only when given
            extra.pop("modelspec.timestep_range", None)
        extra.update(
            {
                "ss_network_dropout": o.dropout,
                "ss_unet_lr": self.part_lr(te=False) if self.train_unet else None,
                "ss_text_encoder_lr": self._te_lr_metadata(bundle) if self.train_te else None,
                "ss_network_train_unet_only": not self.train_te,
                "ss_network_train_text_encoder_only": not self.train_unet,
                "ss_sd_model_name": Path(o.model).name if o.model else None,
            }
        )
        for key in (
            "block_dims",
            "block_alphas",
            "conv_block_dims",
            "conv_block_alphas",
            "down_lr_weight",
            "mid_lr_weight",
            "up_lr_weight",
            "loraplus_lr_ratio",
            "loraplus_unet_lr_ratio",
            "loraplus_text_encoder_lr_ratio",
        ):
            if getattr(o, key) is not None:
                args[key] = getattr(o, key)
        if o.block_lr_zero_threshold:
            args["block_lr_zero_threshold"] = o.block_lr_zero_threshold
        if o.split_qkv and self.index is not None and self.index.kohya:
            args["split_qkv"] = True  # as kohya stores it (its file is fused at rank x3/x4 all the same)
        network = self._require_network()
        tucker = any(m.is_tucker for m in network)
        module = network_module(o.algo, bundle.family)
        if tucker:  # kohya's networks.lora has no Tucker core: such files are LyCORIS files
            module = "lycoris.kohya"
            args["use_tucker"] = True
        for key in ("decompose_both", "rank_dropout_scale", "train_norm"):  # LyCORIS options, as it names them
            if getattr(o, key) and (key != "rank_dropout_scale" or o.rank_dropout):
                module = "lycoris.kohya"
                args[key] = True
        if o.algo == "oft" and o.oft_all_linear:
            args["enable_all_linear"] = True  # Transformer2DModel linears, as our LoRA targets
        if o.algo == "dylora":
            args["unit"] = o.dylora_unit
        if o.lycoris_preset is not None:  # kohya keeps network_args as written: preset=<name or path>
            module = "lycoris.kohya"
            args["preset"] = o.lycoris_preset
        if module == "lycoris.kohya":  # what sd-scripts writes for LyCORIS networks
            args["algo"] = {"dora": "lora", "lora": "locon", "diag_oft": "diag-oft"}.get(o.algo, o.algo)
            if o.algo in ("diag_oft", "boft"):
                args["constraint"] = o.constraint
                args["rescaled"] = o.rescaled
            if o.algo == "dora":
                args["dora_wd"] = True
                args["wd_on_output"] = False  # our magnitude layout (LyCORIS' default is True)
            if o.algo == "lokr":
                args["factor"] = o.lokr_factor
        if o.control_lora:  # what the file is, beside its shapes (``lora info`` reads both)
            from .format import CONTROL_LORA_TRAINED

            extra[CONTROL_METADATA] = CONTROL_LORA_TRAINED
            args["control_lora"] = True
            if o.train_norm_layers:
                args["train_norm_layers"] = True
            args["lora_layers"] = o.lora_layers or "diffusers-default"
        if o.lora_bias:
            args["lora_bias"] = True
        variant = None
        if self.index is not None and self.index.kohya:
            from .dit import variant_of_transformer

            variant = variant_of_transformer(bundle.family, bundle.components()["transformer"])
        return network_metadata(
            family=bundle.family,
            variant=variant,
            prediction_type=bundle.prediction_type,
            network_module=module,
            rank=o.rank,
            alpha=float(o.rank) if o.control_lora else self.alpha,  # a control LoRA's file: alpha/rank in lora_B
            conv_rank=self.conv_rank,
            conv_alpha=self.conv_alpha,
            network_args=args,
            title=o.title or self._output_name(),
            resolution=run_resolution_pair(o),  # kohya's W,H as given ("768x512"), else the square
            clip_skip=o.clip_skip,
            extra=extra,
        )

    def _module_rule_metadata(self, args: dict[str, Any]) -> dict[str, str]:
        """The per-module rules, recorded where their reader looks: a kohya run's per-module network_args go into
        ``args`` (``ss_network_args``) as kohya writes them (key and text as given); --module-ranks /
        --extra-module-ranks / --module-lrs the user gave have no kohya key, so they are ``sdcore_<option>`` keys
        (as ``sdcore_ema_*``, ``sdcore_dataset_strengths``) with the rules as given."""
        from sdcore.train.kohya import kohya_rule_options

        kohya = self.kohya_network_args() or {}
        args.update(kohya)
        from_kohya = kohya_rule_options(kohya)
        o = self.options
        rules = {"module_ranks": o.module_ranks, "extra_module_ranks": o.extra_module_ranks, "module_lrs": o.module_lrs}
        return {f"sdcore_{name}": text for name, text in rules.items() if text and name not in from_kohya}

    def _output_name(self) -> str:
        """The final result's name, for every save: kohya writes ``ss_output_name``/``modelspec.title`` from
        ``--output_name``, so ``x-000002.safetensors`` is titled ``x`` like the final ``x.safetensors``."""
        from sdcore.train.checkpoints import output_paths, stem_and_suffix

        return stem_and_suffix(output_paths(self, self.options)[0])[0]

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        from .format import save_lora

        network = self._require_network()
        state = network.state_dict()
        metadata = self.metadata(bundle, info)
        if self.index is not None and self.index.kohya:  # SD3/Flux: SAI/BFL names, or diffusers' on request
            from .dit import diffusers_state_dict, kohya_state_dict

            if self.options.algo == "oft":  # kohya networks.oft_flux
                from .dit import oft_flux_state_dict

                state = oft_flux_state_dict(state, self.index)
            elif self.options.control_lora:  # BFL's control-LoRA layout (lora_A/lora_B, norm scales in full)
                from .dit import control_state_dict

                state = control_state_dict(state, self.index, bundle.transformer)
            elif self.options.key_layout == "diffusers":
                state, header = diffusers_state_dict(state, self.index)
                metadata.update(header)
            else:
                state = kohya_state_dict(state, self.index)
        if self.pivotal is not None and self.options.embedding_files:
            # OneTrainer's bundle_additional_embeddings: false: the files first, so a LoRA file that exists always
            # has its embeddings beside it (each file atomic; the folder belongs to this save, see saved_files).
            # A LoRA already at this path (a resumed run saving the step again, a rerun into the same --output) goes
            # first: a Ctrl-C between the files and the new LoRA must not leave the old LoRA beside new vectors
            from sdcore.models.embedding_files import embeddings_folder

            Path(info.path).unlink(missing_ok=True)
            emb_meta = {"sdcore.method": "lora --embedding", "sdcore.family": bundle.family, "step": str(info.step)}
            self.pivotal.write_files(embeddings_folder(info.path), emb_meta)
        elif self.pivotal is not None:  # OneTrainer's bundle_additional_embeddings: A1111 1.7+ loads them with the LoRA
            state = {**state, **self.pivotal.bundle_state()}
        return save_lora(
            info.path, state, metadata, dtype=self.options.save_dtype, minimal=self.options.minimal_metadata
        )

    def saved_files(self, path: Path) -> list[Path]:
        """The LoRA file; with ``--embedding-files`` also its ``<file>_embeddings`` folder (written by this save
        alone: ``--save-limit`` removes it with the LoRA it belongs to)."""
        if self.options.embedding and self.options.embedding_files:
            from sdcore.models.embedding_files import embeddings_folder

            return [Path(path), embeddings_folder(path)]
        return [Path(path)]

    def load_result(self, bundle: ModelBundle, path: Path) -> None:
        """Hook the saved file onto a fresh bundle (same forward as during training); --embedding: its bundled
        vectors added back with sdcore's token API, so :meth:`caption_for` writes the names as the same tokens."""
        from .apply import apply_lora

        lora: Any = path
        if self.options.embedding:
            from .format import read_lora
            from .pivotal import BUNDLE_PREFIX, PivotalEmbeddings, parse_specs

            lora = read_lora(path)  # its bundled embeddings read by sdcore's one parser; the loader applies none
            saved = {f"{BUNDLE_PREFIX}{e.name}.{part}": t for e in lora.bundled for part, t in e.vectors.items()}
            specs = parse_specs(self.options.embedding)
            if self.options.embedding_files:  # the files beside it, in the keys the bundle would have
                from sdcore.models.embedding_files import embeddings_folder

                from .pivotal import family_keys, saved_from_files

                saved = saved_from_files(embeddings_folder(path), specs, family_keys(bundle.family) or ())
            if self.pivotal is not None:
                self.pivotal.remove()
            self.pivotal = PivotalEmbeddings(specs, train_t5=self.options.embedding_t5)
            self.pivotal.add(bundle, saved)
        apply_lora(bundle, lora, 1.0, merge=False, strict=True, widen=self.options.control_lora)


def kohya_timestep_sampling(options: LoraOptions) -> str:
    """kohya Flux's name of the run's timestep sampling: sdcore's shifted ``sigmoid`` is kohya's ``shift``
    (kohya's ``sigmoid`` and ``uniform`` are never shifted); the others keep their (shared) names."""
    if options.timestep_sampling == "sigmoid" and options.discrete_flow_shift not in (None, 1.0):
        return "shift"
    return options.timestep_sampling


def flow_metadata(options: LoraOptions, family: str) -> dict[str, str]:
    """The ``ss_*`` keys kohya's Flux and SD3 LoRA scripts add (``update_metadata`` of
    flux_train_network.py / sd3_train_network.py), as strings the way kohya writes them; empty for
    other families."""
    o = options
    if family not in ("flux", "sd3", "chroma"):
        return {}
    from sdcore.train.objectives import flow_shift, training_guidance

    meta = {
        # Chroma's adapter masks T5 always (kohya asserts --apply_t5_attn_mask for it)
        "ss_apply_t5_attn_mask": str(o.apply_t5_attn_mask or family == "chroma"),
        "ss_weighting_scheme": o.weighting_scheme,
        "ss_logit_mean": str(o.logit_mean),
        "ss_logit_std": str(o.logit_std),
        "ss_mode_scale": str(o.mode_scale),
    }
    if family == "sd3":
        meta["ss_apply_lg_attn_mask"] = str(o.apply_lg_attn_mask)
    if family in ("flux", "chroma"):  # flux_train_network.py, for both of its model types
        meta.update(
            {
                "ss_model_type": family,
                "ss_guidance_scale": str(training_guidance(o, control=o.control_lora)),
                "ss_timestep_sampling": kohya_timestep_sampling(o),
                "ss_sigmoid_scale": str(o.sigmoid_scale),
                "ss_model_prediction_type": o.model_prediction_type,
                "ss_discrete_flow_shift": str(flow_shift(o, family)),
            }
        )
    return meta


def kohya_training_metadata(options: LoraOptions, info: SaveInfo) -> dict[str, str]:
    """kohya's ``ss_*`` training keys (what sd-scripts writes and A1111/civitai show): the
    settings, the step/epoch of this save and, from the run, the dataset folders, repeats and
    tag frequencies; for a run from a kohya dataset TOML, kohya's ``ss_datasets`` in place of the
    per-dataset top-level keys (:mod:`.dataset_metadata`)."""
    import json

    from sdcore.data.dataset import run_resolution_pair
    from sdcore.train.optim import adafactor_relative_step, optimizer_metadata, scheduler_metadata, steps_text

    o, run = options, info.run
    entries = run.entries if run is not None else ()
    meta = {
        "ss_steps": str(info.step),
        "ss_epoch": str(info.epoch),
        # kohya: no rate when Adafactor computes its own; ss_optimizer is module.Class(args)
        "ss_learning_rate": "None" if adafactor_relative_step(o.optimizer, o.optimizer_args) else str(o.lr),
        "ss_lr_scheduler": scheduler_metadata(o),
        "ss_lr_warmup_steps": steps_text(o.lr_warmup_steps),
        "ss_optimizer": optimizer_metadata(o.optimizer, o.optimizer_args),
        "ss_batch_size_per_device": str(o.batch_size),
        "ss_gradient_accumulation_steps": str(o.gradient_accumulation),
        "ss_mixed_precision": o.mixed_precision,
        "ss_gradient_checkpointing": str(o.gradient_checkpointing or o.cpu_offload_checkpointing),
        "ss_fp8_base": str(base_weights_dtype(o) == "fp8"),  # --fp8-base or --base-weights-dtype fp8
        "ss_full_fp16": str(o.full_fp16),  # kohya records full_fp16 only (no ss_full_bf16)
        "ss_seed": str(o.seed),
        "ss_clip_skip": str(o.clip_skip),
        "ss_resolution": "({}, {})".format(*run_resolution_pair(o)),  # kohya's str() of its (w, h) tuple
        "ss_noise_offset": str(o.noise_offset),
        "ss_min_snr_gamma": str(o.min_snr_gamma),
        "ss_debiased_estimation": str(o.debiased_estimation_loss),
        "ss_loss_type": o.loss_type,
        "ss_huber_schedule": o.huber_schedule,
        "ss_huber_scale": str(o.huber_scale),
        "ss_huber_c": str(o.huber_c),
        "ss_noise_offset_random_strength": str(o.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(o.adaptive_noise_scale),
        "ss_multires_noise_iterations": str(o.multires_noise_iterations),
        "ss_multires_noise_discount": str(o.multires_noise_discount),
        "ss_ip_noise_gamma": str(o.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(o.ip_noise_gamma_random_strength),
        "ss_zero_terminal_snr": str(o.zero_terminal_snr),
        "ss_cache_latents": str(o.cache_latents),
        "ss_shuffle_caption": str(o.shuffle_caption),
        "ss_keep_tokens": str(o.keep_tokens),
        "ss_caption_dropout_every_n_epochs": str(o.caption_dropout_every_n_epochs),
        "ss_scale_weight_norms": str(o.scale_weight_norms),
        "ss_flip_aug": str(o.flip),
        "ss_validation_seed": str(o.validation_seed),
        "ss_validation_split": str(o.validation_split),
        "ss_max_validation_steps": str(o.max_validation_steps),
        "ss_validate_every_n_epochs": str(o.validate_every_n_epochs),
        "ss_validate_every_n_steps": str(o.validate_every_n_steps),
        "ss_color_aug": str(o.color_aug),
        "ss_random_crop": str(o.random_crop),
        "ss_face_crop_aug_range": _face_range_text(o.face_crop_aug_range),
        "ss_resize_interpolation": str(o.resize_interpolation),  # kohya: the run-wide option ("None" unset)
    }
    if o.min_timestep is not None or o.max_timestep is not None:  # kohya: sai_model_spec's timestep_range
        meta["modelspec.timestep_range"] = f"{o.min_timestep or 0},{1000 if o.max_timestep is None else o.max_timestep}"
    meta["ss_training_finished_at"] = str(int(time.time())) if info.final else "None"
    if run is not None:
        meta.update(
            {
                "ss_training_started_at": str(int(run.started_at)),
                "ss_max_train_steps": str(run.total_steps),
                "ss_num_epochs": str(run.epochs),
                "ss_num_batches_per_epoch": str(run.batches_per_epoch),
                "ss_num_train_images": str(sum(e.repeats for e in entries if not e.is_class)),
                "ss_num_reg_images": str(sum(e.repeats for e in entries if e.is_class)),
                "ss_num_validation_images": str(run.validation_images),
                "ss_v2": str(run.family == "sd2"),
                "ss_dataset_dirs": json.dumps(folder_counts(entries)),
                "ss_tag_frequency": json.dumps(folder_tag_frequency(entries)),
                **folder_bucket_metadata(entries),
                # the rule that built the buckets (or the square crop): kohya's keys cannot say it
                "sdcore_bucket_rule": bucket_rule(entries),
            }
        )
        strengths = _dataset_strengths(entries)
        if strengths:
            meta["sdcore_dataset_strengths"] = json.dumps(strengths)
        if from_dataset_config(entries):
            meta.update(_dataset_config_metadata(o, entries))
            for key in PER_DATASET_KEYS:  # kohya writes them per dataset in ss_datasets instead
                meta.pop(key, None)
            reg = [e for e in entries if getattr(e.subset, "run_class", False)]
            if reg:  # --reg-data beside the config: in no [[datasets]], so kohya's own key for reg folders
                meta["ss_reg_dataset_dirs"] = json.dumps(folder_counts(reg))
        else:
            # datasets batching at their own sizes without a kohya config (none today, but SubsetOptions
            # allows it): no one size per device, so the key is left out rather than holding --batch-size
            sizes = {o.batch_size if e.subset.batch_size is None else e.subset.batch_size for e in entries}
            if sizes and sizes != {o.batch_size}:
                del meta["ss_batch_size_per_device"]
    return meta


def _dataset_config_metadata(o: LoraOptions, entries: tuple[Any, ...]) -> dict[str, str]:
    """kohya's keys of a dataset-config run: ``ss_datasets`` and the merged folders and tag frequency."""
    import json

    datasets, tags, dirs = kohya_datasets(entries, batch_size=o.batch_size)
    return {
        "ss_datasets": json.dumps(datasets),
        "ss_tag_frequency": json.dumps(tags),
        "ss_dataset_dirs": json.dumps(dirs),
    }


def _dataset_strengths(entries: tuple[Any, ...]) -> dict[str, float]:
    """Each image folder's strength (the dataset TOML's ``network_multiplier``), by its name in
    ``ss_dataset_dirs`` (two folders of one name in different places: the second gets `` (2)``, so no
    value is lost), when any is not 1; else empty. kohya writes the value nowhere in its metadata (``ss_datasets`` has no such
    field), so the key is sdcore's own: a slider LoRA's file still says which folder was trained at -1."""
    # one folder per subset; the copies --resolutions makes of a subset (one per resolution) are that subset
    subsets = list({subset_identity(e.subset): e.subset for e in entries}.values())
    values = [float(getattr(s, "network_strength", 1.0)) for s in subsets]
    if all(value == 1.0 for value in values):
        return {}
    out: dict[str, float] = {}
    for subset, value in zip(subsets, values, strict=True):
        out[unique_name(subset_dir_name(subset), out)] = value
    return out


def _face_range_text(value: str | None) -> str:
    """kohya records the parsed tuple: ``(2.0, 4.0)``, or ``None`` when off."""
    from sdcore.data.augment import face_crop_range

    try:
        return str(face_crop_range(value))
    except ValueError:  # refused by the pre-flight before any save
        return str(value)


class LoconMethod(LoraMethod):
    """LoRA with conv modules (kohya C3Lier / LyCORIS LoCon); same file format."""

    name: ClassVar[str] = "locon"
    options_class: ClassVar[type[TrainOptions]] = LoconOptions


__all__ = ["LoconMethod", "LoconOptions", "LoraMethod", "LoraOptions", "kohya_training_metadata"]
