"""The runtime's options, shared by every ``sdcore train <method>``.

A method's options class subclasses :class:`TrainOptions` and adds its own fields with
:func:`sdcore.options.option`. Keep flag names identical across methods: users switch methods
and keep their configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..builtin.part_options import PART_OPTIONS
from ..data.buckets import BUCKET_RULES
from ..data.captions import FILENAME_CAPTION_RULES
from ..data.resolutions import RESOLUTION_DRAWS
from ..errors import ConfigError
from ..options import option
from .ema import EMA_DEVICES, EMA_WARMUPS
from .fused import FUSED_CLIPS
from .loss import HUBER_SCHEDULES, SDCORE_LOSS_TYPES, TIMESTEP_LOSS_WEIGHTS
from .optim import LR_SCHEDULES, OPTIMIZER_TABLE
from .timestep_distributions import TIMESTEP_DISTRIBUTIONS

#: the flow-matching timestep samplings (see :mod:`sdcore.train.objectives`; kohya's/diffusers' names, and
#: ai-toolkit's training tables linear_table/shift_table/lognorm_blend_table)
#: the SD3 paper's bounds for the mode sampling's scale (--mode-scale, OneTrainer's HEAVY_TAIL scale): outside
#: them f_mode is not monotone, so it would not map [0, 1] onto [0, 1]
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))
TIMESTEP_SAMPLINGS = (
    "uniform",
    "logit_normal",
    "mode",
    "sigmoid",
    "sigma",
    "flux_shift",
    "linear_table",
    "shift_table",
    "lognorm_blend_table",
    "sigmoid_table",
)
#: how the flow-matching denoiser's output is read (kohya's --model_prediction_type, plus SD3's "x0")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled", "x0")
#: ``--prediction-type``: ``auto`` reads the model (:mod:`sdcore.models.detect`), the others override it
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
#: kohya's --weighting_scheme: the density of the "sigma" sampling, or a loss weight (sigma_sqrt, cosmap)
WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap")

MIXED_PRECISION = ("no", "fp16", "bf16")
#: ``--base-weights-dtype`` (the formats of :mod:`sdcore.train.base_weights`; ``none``: the compute dtype)
BASE_WEIGHTS_DTYPES = ("none", "fp8", "nf4", "int8")
#: kohya's ``resize_interpolation`` names -> the PIL filter sdcore resizes with. kohya resizes with PIL
#: for ``lanczos`` and ``box`` (the same pixels) and with OpenCV for the others (``nearest``:
#: INTER_NEAREST_EXACT, which OpenCV documents as PIL's nearest; ``bilinear``/``linear``: INTER_LINEAR;
#: ``bicubic``/``cubic``: INTER_CUBIC; ``area``: INTER_AREA, whose shrinking PIL's BOX reproduces):
#: those can differ from OpenCV's by a few levels per pixel (PIL's bilinear/bicubic also antialias
#: when shrinking, OpenCV's do not)
RESIZE_FILTERS: dict[str, str] = {
    "lanczos": "LANCZOS",
    "nearest": "NEAREST",
    "bilinear": "BILINEAR",
    "linear": "BILINEAR",
    "bicubic": "BICUBIC",
    "cubic": "BICUBIC",
    "area": "BOX",
    "box": "BOX",
}
#: kohya's resize_interpolation names (``--resize-interpolation`` and the dataset TOML's key)
RESIZE_INTERPOLATIONS = tuple(RESIZE_FILTERS)
#: the optimizers by name (``sdcore.train.optim.OPTIMIZER_TABLE``); a class path (``came_pytorch.CAME``) works too
OPTIMIZERS = tuple(OPTIMIZER_TABLE)
LR_SCHEDULERS = LR_SCHEDULES
SAVE_DTYPES = ("fp16", "bf16", "fp32")
#: where an inpainting model's training masks come from (``--inpainting-masks``: :mod:`sdcore.train.inpainting`)
INPAINTING_MASKS = ("dataset", "random")
#: how a ``--masked-loss`` mask image becomes loss weights (``--mask-kind``, the dataset TOML's ``mask_kind``:
#: :func:`sdcore.train.data.load_mask`): ``red`` its R channel as it is (kohya, SimpleTuner's ``mask``),
#: ``segmentation`` the mean of its channels, 1 wherever a latent cell is not all black (SimpleTuner's)
MASK_KINDS = ("red", "segmentation")
#: ``--filename-captions``: ``none`` (off) or a file-name rule (:data:`sdcore.data.captions.FILENAME_CAPTION_RULES`)
#: that captions the images without a caption file
FILENAME_CAPTIONS = ("none", *FILENAME_CAPTION_RULES)
#: intermediate results kept by default (``--save-every`` without ``--save-limit``)
DEFAULT_SAVE_LIMIT = 5


def _part(name: str) -> Any:
    """A model-part option (``--clip-l``, ``--t5xxl``/``--t5``, ``--vae``/``--ae``...): the flags and help of
    :data:`sdcore.builtin.part_options.PART_OPTIONS`, the one table ``generate`` and ``model info/convert`` use."""
    from ..builtin.part_options import name_help

    flags, text = next((flags, text) for flags, field_name, text in PART_OPTIONS if field_name == name)
    named = name_help(name)  # with --models-dir, as generate's
    metavar = "PATH|NAME" if named else "PATH"
    return option(None, text + named, flag=flags[0], aliases=flags[1:], group="model", metavar=metavar, path=True)


@dataclass
class TrainOptions:
    """Options every training method accepts (the runtime owns their meaning)."""

    # what and where
    model: str = option(
        "",
        "Base model: diffusers folder, single .safetensors/.ckpt file, hub id, tiny:<family>, or with --models-dir "
        "a model's name there (ComfyUI's ckpt_name, as sdcore generate's --model).",
        group="model",
        path=True,
    )
    models_dir: str = option(
        "",
        "A1111's or ComfyUI's models folder: --model and the part options may then be a file's name there "
        "(checkpoints/, Stable-diffusion/, unet/, diffusion_models/, the folders of diffusers/; vae/, VAE/; "
        "text_encoders/, clip/, text_encoder/), looked up before anything loads as sdcore generate does; an extra_model_paths.yaml beside "
        "it (ComfyUI's root) is read too. Default: none (paths only).",
        group="model",
        metavar="DIR",
        path=True,
    )
    extra_model_paths: tuple[str, ...] = option(
        (),
        "ComfyUI's extra_model_paths.yaml (repeatable; needs --models-dir): the checkpoints, diffusion_models, "
        "diffusers, vae and text_encoders folders it lists are searched for names too, in ComfyUI's order.",
        group="model",
        metavar="FILE.yaml",
        path=True,
    )
    prediction_type: str = option(
        "auto",
        "What the DDPM families' (SD1/SD2/SDXL) denoiser predicts: auto (what the model declares: the A1111 "
        "model.yaml beside a single file, modelspec, its scheduler config, the v_pred key; SD2 files without one are v), epsilon or v_prediction (kohya's "
        "--v_parameterization, diffusers' --prediction_type), for files that do not say it; the trained files "
        "say what was trained. Flow-matching families refuse it.",
        choices=PREDICTION_TYPES,
        group="model",
    )
    # parts of a model file that lacks them (SD3 without text encoders/VAE, BFL's flux1-dev.safetensors)
    clip_l: str | None = _part("clip_l")
    clip_g: str | None = _part("clip_g")
    t5xxl: str | None = _part("t5xxl")
    vae: str | None = _part("vae")
    t5_tokenizer: str | None = _part("t5_tokenizer")
    data: str = option(
        "",
        "Dataset folder (kohya N_name subfolders or plain images), a TOML dataset config, a OneTrainer "
        "concepts .json, or a diffusers .jsonl of image / control image / caption rows (diffusers' "
        "--jsonl_for_train; see --image-column).",
        group="data",
        path=True,
    )
    image_column: str = option(
        "image", "A .jsonl --data: the column of each row's image path (diffusers' --image_column).", group="data"
    )
    conditioning_image_column: str = option(
        "conditioning_image",
        "A .jsonl --data: the column of each row's control image path (diffusers' --conditioning_image_column); "
        "'' for none (an imagefolder metadata.jsonl).",
        group="data",
    )
    caption_column: str = option(
        "text",
        "A .jsonl --data: the column of each row's caption, or list of captions of which the longest is used "
        "(diffusers' --caption_column).",
        group="data",
    )
    output: str = option("", "Where to write the result (a file or a folder, per method).", group="output", path=True)
    reg_data: str | None = option(
        None, "Regularisation/class images folder (kohya N_name subfolders).", group="data", path=True
    )
    metadata_file: str | None = option(
        None,
        "kohya fine-tuning metadata JSON/JSONL (captions and tags per image, from kohya's finetune/ scripts; "
        "kohya's --in_json): --data is then the folder its image keys are in.",
        group="data",
        metavar="FILE",
        path=True,
    )
    dataset_repeats: int = option(
        1,
        "Repeats of a --metadata-file dataset, and of dataset-TOML subsets without num_repeats (kohya).",
        group="data",
        minimum=1,
    )
    prior_loss_weight: float = option(
        1.0,
        "Loss weight of regularisation/class images (prior preservation).",
        group="loss",
        minimum=0,
    )
    # data handling
    resolution: int = option(
        0,
        "Training resolution (side of the square area buckets are built around); 0 = the model's native size "
        "(SD1 512, SD2-768 768, SDXL 1024, tiny models 64, toyworld: 32). kohya's W,H (e.g. 768,512) is accepted: "
        "buckets then use the area W*H and, with buckets off, images are cropped to W x H, as kohya does; this option "
        "is then the side of the same area (isqrt(W*H): memory plan, sample size).",
        group="data",
    )
    #: kohya's non-square ``(width, height)``, filled from ``--resolution W,H`` (or ``resolution = [W, H]`` /
    #: ``"W,H"`` in a config) by :func:`sdcore.train.config.load_options`, with ``resolution`` its side
    #: ``isqrt(W*H)``; config-only so that the one ``--resolution`` flag stays the way to give it. ``None``: square
    resolution_size: tuple[int, int] | None = option(
        None,
        "kohya's non-square resolution (W, H): set by --resolution W,H, with --resolution the side of the same area.",
        group="data",
        cli=False,
    )
    resolutions: str = option(
        "",
        "Several training resolutions, e.g. 512,768,1024 (OneTrainer's resolution list): each image trains at "
        "one of them (a uniform draw; a value listed twice weighs double), in that resolution's buckets, so "
        "every batch is one resolution; --resolution is then the largest (the memory plan's) or left at 0.",
        group="data",
        metavar="LIST",
    )
    resolution_draw: str = option(
        "epoch",
        "With --resolutions: draw each image's resolution again every epoch (OneTrainer without latent "
        "caching) or once for the whole run (OneTrainer with its cached latents and one image variation).",
        choices=RESOLUTION_DRAWS,
        group="data",
    )
    caption_extension: str = option(".txt", "Caption file extension (.txt or .caption).", group="data")
    caption_fallback: bool = option(
        True,
        "An image without a caption file of --caption-extension reads its .txt/.caption twin instead (a safety "
        "net: a wrong extension would train uncaptioned). kohya reads only its caption_extension, so a run "
        "written in kohya's names turns this off, and the pre-flight names the twins it leaves unread.",
        group="data",
    )
    filename_captions: str = option(
        "none",
        "Caption an image that has no caption file from its file name: a1111 as A1111's Train tab (TI, "
        "hypernetworks) does, the name without its leading numbers and dashes ('00001-0-a circle.png' -> 'a "
        "circle'); stem the name as it is; spaces with '_' as spaces. A caption file always wins; the name comes "
        "before a kohya folder's class tokens (10_name), which a name that gives no text (0001.png) still gets.",
        choices=FILENAME_CAPTIONS,
        group="data",
    )
    filename_word_regex: str = option(
        "",
        "With --filename-captions: keep only this regex's matches in a caption made from a file name, joined with "
        "--filename-join-string (A1111's 'Filename word regex' setting: '00012-3-a_red circle.png' with "
        "--filename-captions a1111 and [a-z]+ -> 'a red circle'). With stem/spaces it filters their text (sdcore's own). Empty (the default): the name's text as it is. "
        "Captions from caption files are never touched.",
        group="data",
        metavar="REGEX",
    )
    filename_join_string: str = option(
        " ",
        "With --filename-word-regex: the text between the words it finds (A1111's 'Filename join string' "
        "setting; default: one space).",
        group="data",
        metavar="TEXT",
    )
    shuffle_caption: bool = option(False, "Shuffle comma-separated tags each time a caption is used.", group="data")
    keep_tokens: int = option(0, "Keep the first N tags in place when shuffling or dropping.", group="data", minimum=0)
    caption_dropout: float = option(
        0.0, "Probability of training a sample with an empty caption.", group="data", minimum=0, maximum=1
    )
    tag_dropout: float = option(
        0.0, "Probability of dropping each tag (after keep_tokens).", group="data", minimum=0, maximum=1
    )
    caption_dropout_every_n_epochs: int = option(
        0,
        "Drop every caption (train uncaptioned) in every N-th epoch (kohya; 0 = off).",
        group="data",
        minimum=0,
    )
    caption_prefix: str = option(
        "", "Text put before every caption, joined with a space (kohya; counts for --keep-tokens).", group="data"
    )
    caption_suffix: str = option("", "Text put after every caption, joined with a space (kohya).", group="data")
    secondary_separator: str | None = option(
        None,
        "Tags joined by this (e.g. ';;;') shuffle and drop as one tag; it becomes --caption-separator (',') "
        "afterwards (kohya).",
        group="data",
    )
    caption_separator: str = option(
        ",",
        "What separates a caption's tags for --shuffle-caption, --keep-tokens and --tag-dropout (used as given; "
        "processed captions are joined with ', ', as kohya does; kohya's --caption_separator).",
        group="data",
    )
    keep_tokens_separator: str | None = option(
        None,
        "Tags before this (e.g. '|||') stay first and those after a second one stay last while the rest is "
        "shuffled or dropped; replaces --keep-tokens in captions that contain it (kohya).",
        group="data",
    )
    enable_wildcard: bool = option(
        False,
        "Captions pick one of '{a|b|c}' and one line of a multi-line caption file each time they are used (kohya).",
        group="data",
    )
    token_warmup_min: int = option(
        1, "Token warm-up: tags (after the fixed ones) kept at step 0 (kohya).", group="data", minimum=0
    )
    token_warmup_step: float = option(
        0.0,
        "Token warm-up: the step where captions reach all their tags (below 1: a fraction of the run; 0 = off; kohya).",
        group="data",
        minimum=0,
    )
    weighted_captions: bool = option(
        False,
        "Captions' A1111 emphasis '(word:1.3)' / '[word]' scales those tokens' text-encoder outputs (kohya; SD1/SD2/SDXL).",
        group="data",
    )
    resize_interpolation: str | None = option(
        None,
        "Filter that resizes images to their bucket: lanczos, nearest, bilinear/linear, bicubic/cubic, area/box "
        "(PIL's filters; kohya's --resize_interpolation). Default: area when shrinking, lanczos when enlarging.",
        choices=RESIZE_INTERPOLATIONS,
        group="data",
    )
    flip: bool = option(False, "Random horizontal flips (cached latents are kept for both orientations).", group="data")
    random_crop: bool = option(
        False,
        "Crop at a random position (per sample) instead of the centre after resizing to the bucket "
        "(kohya; needs --no-cache-latents).",
        group="data",
    )
    color_aug: bool = option(
        False,
        "kohya's weak colour augmentation: 1 sample in 3 gets a hue shift (up to 16 degrees) or kohya's "
        "gamma (0.95..1.05 on 0..255 values) (needs --no-cache-latents).",
        group="data",
    )
    mask_shrink: bool = option(
        False,
        "OneTrainer's random circular mask shrink: each sample's mask is cut to a disc around a random masked "
        "point (radius 0.2..1 of the farthest masked pixel); with mask images (--masked-loss, alpha_mask) or an "
        "inpainting model (needs --no-cache-latents). Per subset: mask_shrink.",
        group="data",
    )
    mask_rotate_crop: bool = option(
        False,
        "OneTrainer's random mask rotate-crop: the image and its mask are rotated up to 20 degrees about the "
        "mask and cropped around it with 10 to 30 percent padding (at least the lowest resolution square) before the "
        "bucket's resize; with mask images or an inpainting model (needs --no-cache-latents). Per subset: "
        "mask_rotate_crop.",
        group="data",
    )
    face_crop_aug_range: str | None = option(
        None,
        "kohya's face-centred crop with --no-buckets: 'low,high' (e.g. '2.0,4.0'), the face's larger side "
        "becomes 1/low..1/high of the image side; faces come from names like img_<cx>_<cy>_<w>_<h>.png.",
        group="data",
    )
    alpha_mask: bool = option(
        False, "Weight the loss by each image's alpha channel (kohya; transparent = not learned).", group="loss"
    )
    masked_loss: bool = option(
        False,
        "Weight the loss by mask images (R channel, 0..255 -> 0..1) named like the images in "
        "--conditioning-data-dir or the dataset TOML's conditioning_data_dir (kohya); with a OneTrainer "
        "concepts file, by each image's <name>-masklabel.png (grey, missing = whole image).",
        group="loss",
    )
    conditioning_data_dir: str | None = option(
        None, "Folder of --masked-loss mask images, same base names as the images (kohya).", group="data", path=True
    )
    control_dir: str | None = option(
        None,
        "FLUX.1 Kontext training: folder of control (reference) images, one per training image with the same "
        "base name (musubi-tuner's control_directory, ai-toolkit's control_path); the images are the edited results. "
        "With --control-lora: the control images (poses, edges, depth maps) a FLUX.1 dev control LoRA learns from.",
        group="data",
        metavar="DIR",
        path=True,
    )
    masked_loss_unmasked_weight: float = option(
        0.0,
        "Loss masks are clamped to [this, 1] before they weight the loss (OneTrainer's unmasked_weight; "
        "0 = kohya's mask as it is).",
        group="loss",
        minimum=0,
        maximum=1,
    )
    masked_loss_normalize: bool = option(
        False,
        "Divide each sample's masked loss by its mask's mean (OneTrainer's normalize_masked_area_loss; "
        "kohya does not).",
        group="loss",
    )
    mask_kind: str = option(
        "red",
        "How --masked-loss mask images weigh the loss: 'red' (the R channel, 0..255 -> 0..1: kohya, SimpleTuner's "
        "mask datasets) or 'segmentation' (SimpleTuner's: the mean of the three channels, 1 for every latent cell "
        "not all black, 0 elsewhere). Per subset: mask_kind.",
        choices=MASK_KINDS,
        group="loss",
    )
    masked_loss_probability: float = option(
        1.0,
        "The share of batches whose segmentation masks (--mask-kind segmentation) weigh the loss; the others train "
        "unmasked (SimpleTuner's masked_loss_probability). One draw per batch, seeded by --seed.",
        group="loss",
        metavar="P",
        minimum=0,
        maximum=1,
    )
    inpainting_unmasked_probability: float = option(
        0.0,
        "Inpainting models: the share of samples trained with a full mask and a blank masked image "
        "(OneTrainer's unmasked_probability; its default is 0.1).",
        group="data",
        metavar="P",
        minimum=0,
        maximum=1,
    )
    inpainting_masks: str = option(
        "dataset",
        "Inpainting models: the masks their mask input is trained on: 'dataset' (each image's mask image or "
        "alpha_mask, else a full mask: OneTrainer's) or 'random' (kohya's --train_inpainting: a new cloud, polygon "
        "or shape mask for each sample every step, seeded by --seed; needs --no-cache-latents).",
        choices=INPAINTING_MASKS,
        group="data",
    )
    inpainting_conditioning_images: bool = option(
        False,
        "Inpainting models: the '<stem>-condlabel.png' beside an image is its masked image, used as it is "
        "(OneTrainer's custom conditioning image, e.g. the scene with the object removed); an image without one gets "
        "the masked image made from its mask. The -condlabel files are not trained on.",
        group="data",
    )
    buckets: bool = option(True, "Aspect-ratio buckets; off means center-crop to a square.", group="data")
    bucket_rule: str = option(
        "kohya",
        "How buckets are built and images put in them: 'kohya' (sd-scripts) or 'onetrainer' (OneTrainer's "
        "aspect ratios 1:1 to 1:4 scaled to the resolution's area, sides rounded to --bucket-step, its grid: 8 for "
        "SD1/SD2, 64 for SDXL and the flow models; no smallest or largest side, small images upscaled).",
        choices=BUCKET_RULES,
        group="data",
    )
    min_bucket_reso: int = option(256, "Smallest bucket side.", group="data", minimum=0, above_minimum=True)
    max_bucket_reso: int = option(1024, "Largest bucket side.", group="data", minimum=0, above_minimum=True)
    bucket_step: int = option(64, "Bucket side step in pixels.", group="data", minimum=0, above_minimum=True)
    bucket_no_upscale: bool = option(False, "Never upscale an image to reach its bucket.", group="data")
    debug_dataset: bool = option(
        False,
        "Load no model: walk the first --debug-dataset-steps optimizer steps of the real data pipeline, print "
        "what each sample becomes (bucket, crop, flip, caption) and write its augmented image, then stop (kohya).",
        group="data",
    )
    debug_dataset_steps: int = option(10, "Optimizer steps --debug-dataset walks.", group="data", minimum=1)
    debug_dataset_dir: str = option(
        "",
        "Folder for the --debug-dataset images (default: debug_dataset/ beside the output).",
        group="data",
        path=True,
    )
    cache_latents: bool = option(True, "Encode images once with the VAE and reuse the latents.", group="cache")
    cache_latents_to_disk: bool = option(
        False, "Keep latents in .npz files beside the images, reused across runs.", group="cache"
    )
    cache_text_encoder_outputs: bool = option(
        True,
        "Cache text-encoder outputs when the text encoder is frozen (SD3/FLUX.1 training CLIP: T5's outputs alone, "
        "as kohya).",
        group="cache",
    )
    cache_text_encoder_outputs_to_disk: bool = option(
        False,
        "Also keep the cached text-encoder outputs in a .safetensors file per dataset folder, reused by later runs "
        "with the same text encoders and settings (SD3/FLUX.1: no T5 pass over the captions again).",
        group="cache",
    )
    cache_dir: str | None = option(
        None, "Folder for latent and text-encoder cache files (default: beside each image).", group="cache", path=True
    )
    caption_variants: int = option(
        4, "Cached caption variants per image when shuffling/dropping tags.", group="cache", minimum=1
    )
    # schedule
    batch_size: int = option(1, "Images per step per device.", group="training", minimum=1)
    max_steps: int | None = option(
        None,
        "Stop after this many optimizer steps (with --epochs too: whichever comes first).",
        group="training",
        minimum=1,
    )
    epochs: int | None = option(
        None,
        "Stop after this many epochs (one pass over repeats; default 1 when --max-steps is not given either).",
        group="training",
        minimum=1,
    )
    # "0 or more": --lr 0 is legal where a method gives every trained part its own rate (LoRA's --unet-lr/--te-lr,
    # kohya's learning_rate = 0 beside unet_lr); the pre-flight refuses it otherwise (TrainingMethod.lr_fallback_parts)
    lr: float = option(1e-4, "Learning rate.", group="training", minimum=0)
    lr_scheduler: str = option("constant", "LR schedule.", choices=LR_SCHEDULERS, group="training")
    lr_warmup_steps: float = option(
        0,
        "Linear warmup steps; a value below 1 is a ratio of the total steps (kohya).",
        group="training",
        minimum=0,
    )
    lr_power: float = option(1.0, "Power of the polynomial schedule.", group="training", minimum=0)
    lr_cycles: int = option(
        1,
        "cosine_with_restarts: number of hard restarts; cosine_with_min_lr/warmup_stable_decay: cycles/2 "
        "cosine half-waves (kohya's lr_scheduler_num_cycles); at least 1 there, unread by other schedules.",
        group="training",
    )  # no declared range: a range is checked whether or not the schedule reads it (optim.cycles_problems)
    lr_min_ratio: float | None = option(
        None,
        "cosine_with_min_lr/warmup_stable_decay: the floor as a ratio of --lr (kohya's lr_scheduler_min_lr_ratio).",
        group="training",
        minimum=0,
        maximum=1,
    )
    lr_decay_steps: float = option(
        0,
        "warmup_stable_decay: decay steps; below 1 a ratio of the total steps (kohya).",
        group="training",
        minimum=0,
    )
    lr_timescale: int | None = option(
        None,
        "inverse_sqrt: the timescale (default: the warmup steps, else 10000; kohya's lr_scheduler_timescale).",
        group="training",
        minimum=1,
    )
    lr_scheduler_type: str = option(
        "",
        "A scheduler class instead of --lr-scheduler: a torch.optim.lr_scheduler name or module.Class "
        "(kohya), stepped once per optimizer step.",
        group="training",
    )
    lr_scheduler_args: str = option(
        "",
        "Arguments of the schedule or --lr-scheduler-type class, e.g. 'T_max=100' or "
        "'step_rules=1:10,0.1:20,0.01' (piecewise_constant).",
        group="training",
    )
    optimizer: str = option(
        "adamw",
        f"Optimizer: {', '.join(OPTIMIZERS)} (kohya's names), a torch.optim class (RAdam) or a class path "
        "(came_pytorch.CAME, prodigyplus.ProdigyPlusScheduleFree).",
        group="training",
    )
    optimizer_args: str = option(
        "", "Extra optimizer arguments, e.g. 'weight_decay=0.01 betas=0.9,0.99'.", group="training"
    )
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", group="training", minimum=0)
    grad_clip_method: str = option(
        "norm",
        "How --max-grad-norm clips: norm (scale all gradients down to that global L2 norm: kohya, diffusers) or "
        "value (clamp each gradient element to +-max-grad-norm: SimpleTuner's default grad_clip_method, torch's "
        "clip_grad_value_), after the gradients are summed over processes and unscaled.",
        choices=("norm", "value"),
        group="training",
    )
    gradient_accumulation: int = option(1, "Micro-batches per optimizer step.", group="training", minimum=1)
    fused_backward_pass: bool = option(
        False,
        "Step each trained tensor inside backward as soon as its gradient is ready and free that gradient, so a "
        "full fine-tune never holds every gradient (kohya --fused_backward_pass): the same weights with adafactor, "
        "adamw, sgd, sgdnesterov; --max-grad-norm clips per tensor (kohya; see --fused-clip); with "
        "--gradient-accumulation the tensors step in the last micro-batch's backward (OneTrainer; every gradient "
        "is then held); no fp16 mixed precision or multi-process; methods that train whole models (DreamBooth).",
        group="training",
    )
    fused_clip: str = option(
        "kohya",
        "Where a fused backward pass may clip each tensor by its own norm (--max-grad-norm above 0): kohya (only on "
        "the families whose kohya script steps in backward, SDXL/SD3/Flux, SDXL for --fused-optimizer-groups; "
        "elsewhere kohya clips all gradients together, so the pre-flight asks for --max-grad-norm 0) or per-tensor "
        "(on every family, as OneTrainer's fused_back_pass; set by a OneTrainer config).",
        choices=FUSED_CLIPS,
        group="training",
    )
    fused_optimizer_groups: int = option(
        0,
        "Like --fused-backward-pass, but the tensors are split into about N groups (kohya's split) and a group "
        "steps when its last gradient is ready: the same weights, a group's gradients held until then "
        "(kohya --fused_optimizer_groups, sdxl_train.py). 0 = off.",
        group="training",
        minimum=0,
    )
    blockwise_fused_optimizers: bool = option(
        False,
        "Like --fused-backward-pass, but each transformer block (and the rest of the transformer, and each "
        "trained text encoder) steps when its last gradient is ready: the same weights (kohya "
        "--blockwise_fused_optimizers, SD3/Flux).",
        group="training",
    )
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet/text encoder.", group="training")
    mixed_precision: str = option(
        "no", "Mixed precision through accelerate.", choices=MIXED_PRECISION, group="training"
    )
    full_bf16: bool = option(
        False,
        "Keep the trained weights themselves, their gradients and the optimizer state in bf16 (no fp32 master "
        "copy; needs --mixed-precision bf16; kohya --full_bf16).",
        group="training",
    )
    full_fp16: bool = option(
        False,
        "Keep the trained weights themselves, their gradients and the optimizer state in fp16 (no fp32 master "
        "copy; needs --mixed-precision fp16, so a CUDA GPU; kohya --full_fp16).",
        group="training",
    )
    fp8_base: bool = option(
        False,
        "Store the denoiser's frozen Linear/Conv2d weights in float8 (1 byte each, upcast per layer in forward); "
        "trained adapters keep their dtype (kohya --fp8_base; the same as --base-weights-dtype fp8).",
        group="training",
    )
    base_weights_dtype: str = option(
        "none",
        "Store the denoiser's frozen Linear/Conv2d weights as fp8 (1 byte each), nf4 (QLoRA's 4-bit NormalFloat "
        "in blocks of 64: 0.5625 bytes) or int8 (absmax per output row: about 1 byte), dequantised per layer in "
        "forward; trained adapters keep their dtype (OneTrainer's weight_dtype, ai-toolkit's quantize).",
        choices=BASE_WEIGHTS_DTYPES,
        group="training",
    )
    text_encoder_weights_dtype: str = option(
        "none",
        "Store the frozen text encoders' Linear weights as --base-weights-dtype stores the denoiser's: fp8, nf4 or "
        "int8 (embeddings, norms and biases keep their dtype; a text encoder's LoRA stays float). One value for "
        "every encoder, or one per encoder in the family's order, comma-separated (FLUX.1: 'none,fp8' keeps CLIP-L "
        "and stores T5-XXL in fp8). Applied before text-encoder outputs are cached (kohya --fp8_base's text "
        "encoders, OneTrainer's text_encoder weight_dtype, SimpleTuner's text_encoder_N_precision, ai-toolkit's "
        "quantize_te).",
        group="training",
    )
    base_weights_exclude: str | None = option(
        None,
        "With --fp8-base / --base-weights-dtype: comma-separated glob patterns of the denoiser's module names "
        "(e.g. '*time_text_embed*') whose frozen weights keep their dtype (ai-toolkit's quantize_kwargs exclude, "
        "matched as optimum-quanto matches it); a pattern matching no layer is an error.",
        group="training",
    )
    blocks_to_swap: int = option(
        0,
        "Keep the frozen weights of the denoiser's last N transformer blocks in CPU memory; each block's weights "
        "visit the GPU only while it computes (SD3/Flux; kohya --blocks_to_swap).",
        group="training",
        minimum=0,
    )
    tread_route: tuple[str, ...] = option(
        (),
        "TREAD token routing, repeatable: RATIO:START:END sends only 1 - RATIO of the image tokens through "
        "transformer blocks START to END (inclusive; negative from the end; FLUX.1 counts its double then single "
        "blocks), the others skip them; tokens inside a loss mask never do; faster steps on large images "
        "(SD3/FLUX.1/Chroma; SimpleTuner's tread_config).",
        group="training",
        metavar="RATIO:START:END",
    )
    cpu_offload_checkpointing: bool = option(
        False,
        "Gradient checkpointing (turned on) whose kept block inputs live in CPU memory; each transformer block "
        "copies them to the GPU to compute (SD3/Flux/Chroma; not with --blocks-to-swap; kohya "
        "--cpu_offload_checkpointing).",
        group="training",
    )
    ddp_timeout: int | None = option(
        None,
        "Several processes: minutes a process waits for the others before giving up (default: accelerate's; "
        "kohya's --ddp_timeout).",
        group="training",
        minimum=1,
    )
    ddp_static_graph: bool = option(
        False,
        "Several processes: tell DDP the same parameters get gradients every step (faster; not with LoRA "
        "module/rank dropout or a text-encoder stop; kohya's --ddp_static_graph).",
        group="training",
    )
    ddp_gradient_as_bucket_view: bool = option(
        False,
        "Several processes: gradients are views into DDP's all-reduce buckets (less memory; kohya's "
        "--ddp_gradient_as_bucket_view).",
        group="training",
    )
    cudnn_attention: bool = option(
        False,
        "Let torch use cuDNN's attention kernels on a GPU (its first choice on Hopper since torch 2.11). Off by "
        "default: on an H200 they gave wrong Flux gradients (docs/training.md).",
        group="training",
    )
    seed: int = option(42, "Seed for weights init, noise, data order and augmentations.", group="training")
    # an exponential moving average of the trained weights (sdcore.train.ema)
    ema: bool = option(
        False,
        "Keep an exponential moving average of the trained weights: saved results, samples and the validation "
        "loss use it, the raw weights train on unchanged (OneTrainer ema, ai-toolkit ema_config.use_ema).",
        group="ema",
    )
    ema_decay: float = option(
        0.999,
        "EMA decay per update (OneTrainer's and ai-toolkit's default).",
        group="ema",
        minimum=0,
        maximum=1,
        above_minimum=True,
        below_maximum=True,
    )
    ema_update_every: int = option(
        1,
        "Update the EMA every N optimizer steps (OneTrainer's ema_update_step_interval).",
        group="ema",
        minimum=1,
    )
    ema_warmup: str = option(
        "onetrainer",
        "Decay warm-up: onetrainer = min(decay, (1+u)/(10+u)) at the update after u earlier steps; diffusers = "
        "the same but the first update copies the weights; none = the decay from the start (ai-toolkit); copy = "
        "the updates before step --ema-warmup-steps copy the weights, then the decay (SimpleTuner ema_warmup_steps).",
        choices=EMA_WARMUPS,
        group="ema",
    )
    ema_warmup_steps: int = option(
        0,
        "With --ema-warmup copy: the optimizer step from which the decay applies; the updates before it copy the "
        "weights (SimpleTuner's ema_warmup_steps).",
        group="ema",
        minimum=0,
    )
    ema_device: str = option(
        "same",
        "Where the fp32 EMA copy lives: same = beside the trained weights, cpu = host memory (saves accelerator "
        "memory; OneTrainer's CPU EMA).",
        choices=EMA_DEVICES,
        group="ema",
    )
    # loss
    noise_offset: float = option(0.0, "Noise offset (adds per-channel constant noise).", group="loss", minimum=0)
    min_snr_gamma: float | None = option(
        None, "Min-SNR loss weighting gamma (5 is typical).", group="loss", minimum=0, above_minimum=True
    )
    # kohya's loss options (sdcore.train.loss has the formulas)
    loss_type: str = option(
        "l2",
        "Per-element loss: l2 (squared error), l1, huber (pseudo-Huber 2c(sqrt(d^2+c^2)-c)) or smooth_l1 "
        "(2(sqrt(d^2+c^2)-c)), with c from --huber-schedule (kohya's --loss_type); mix = OneTrainer's sum "
        "--mse-strength*MSE + --mae-strength*MAE + --log-cosh-strength*log-cosh + --huber-strength*Huber.",
        choices=SDCORE_LOSS_TYPES,
        group="loss",
    )
    huber_schedule: str = option(
        "snr",
        "huber/smooth_l1: the threshold c per timestep: constant (huber_c*huber_scale), exponential "
        "(huber_scale*huber_c^(t/T)) or snr ((1-huber_c)/(1+sigma_t)^2+huber_c; DDPM families only). kohya's default.",
        choices=HUBER_SCHEDULES,
        group="loss",
    )
    huber_c: float = option(
        0.1,
        "huber/smooth_l1: the threshold parameter c (kohya's --huber_c).",
        group="loss",
        minimum=0,
        above_minimum=True,
    )
    huber_scale: float = option(
        1.0,
        "huber/smooth_l1: scale of the constant and exponential thresholds (kohya's --huber_scale).",
        group="loss",
        minimum=0,
        above_minimum=True,
    )
    # OneTrainer's loss sum (--loss-type mix; sdcore.train.loss): its field names and defaults
    mse_strength: float = option(
        1.0, "--loss-type mix: weight of the squared error (OneTrainer's).", group="loss", minimum=0
    )
    mae_strength: float = option(
        0.0, "--loss-type mix: weight of the absolute error (OneTrainer's).", group="loss", minimum=0
    )
    log_cosh_strength: float = option(
        0.0,
        "--loss-type mix: weight of log(cosh(d)) (OneTrainer's log-cosh loss).",
        group="loss",
        minimum=0,
    )
    huber_strength: float = option(
        0.0,
        "--loss-type mix: weight of torch's Huber loss (d^2/2 below --huber-delta, delta*(|d|-delta/2) above; "
        "OneTrainer's, not kohya's pseudo-Huber).",
        group="loss",
        minimum=0,
    )
    huber_delta: float = option(
        1.0, "--loss-type mix: the Huber loss's delta (OneTrainer's).", group="loss", minimum=0, above_minimum=True
    )
    p2_loss_gamma: float | None = option(
        None,
        "P2 loss weight (1+SNR)^-gamma, (2+SNR)^-gamma on v-prediction models (OneTrainer's P2 with "
        "loss_weight_strength; DDPM families).",
        group="loss",
        minimum=0,
        above_minimum=True,
    )
    sigma_loss_weight: bool = option(
        False, "Flow-matching families: weigh the loss by the noise level sigma (OneTrainer's SIGMA).", group="loss"
    )
    debiased_estimation_loss: bool = option(
        False,
        "Weigh the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), SNR clamped at 1000 (kohya; DDPM families only).",
        group="loss",
    )
    debiased_estimation_sqrt: bool = option(
        False,
        "With --debiased-estimation-loss on a v-prediction model: weigh by 1/sqrt(SNR+1) as OneTrainer does "
        "instead of kohya's 1/(SNR+1) (epsilon models: 1/sqrt(SNR) either way).",
        group="loss",
    )
    scale_v_pred_loss_like_noise_pred: bool = option(
        False,
        "v-prediction models: weigh the loss by SNR/(SNR+1) so it scales like an epsilon loss (kohya).",
        group="loss",
    )
    v_pred_like_loss: float = option(
        0.0,
        "Epsilon models: add this multiple of a v-prediction-like loss, loss*(SNR+1)/SNR (kohya; 0 = off).",
        group="loss",
        minimum=0,
    )
    # noise and timestep draws (kohya's meanings; docs/training.md)
    noise_offset_random_strength: bool = option(
        False, "Scale the noise offset by U(0, 1) drawn per sample (kohya's random strength).", group="loss"
    )
    adaptive_noise_scale: float | None = option(
        None,
        "Add this times |mean of the latent's channel| to the noise offset (needs --noise-offset; DDPM families).",
        group="loss",
    )
    multires_noise_iterations: int | None = option(
        None,
        "Multires (pyramid) noise with this many levels (6-10 typical; DDPM families).",
        group="loss",
        minimum=0,
    )
    multires_noise_discount: float = option(
        0.3,
        "Weight decay per level of the multires noise (kohya's default 0.3).",
        group="loss",
        minimum=0,
    )
    ip_noise_gamma: float | None = option(
        None,
        "Input perturbation: the noisy input uses noise + gamma * N(0, 1), the target the plain noise "
        "(0.1 typical; not on SD3, as kohya).",
        group="loss",
        minimum=0,
    )
    ip_noise_gamma_random_strength: bool = option(
        False, "Scale --ip-noise-gamma by U(0, 1) drawn per sample.", group="loss"
    )
    min_timestep: int | None = option(
        None,
        "Draw DDPM timesteps from [this, --max-timestep) (default 0; SD3 as kohya's script).",
        group="loss",
        minimum=0,
    )
    max_timestep: int | None = option(
        None, "Upper end (excluded) of the DDPM timesteps (default the schedule's 1000).", group="loss", minimum=1
    )
    zero_terminal_snr: bool = option(
        False,
        "Rescale the DDPM noise schedule to zero SNR at the last timestep (Lin et al. 2023; best with "
        "v-prediction; DDPM families).",
        group="loss",
    )
    # OneTrainer's timestep distributions (sdcore.train.timestep_distributions), every family
    timestep_distribution: str | None = option(
        None,
        "Draw timesteps as OneTrainer does, on every family (replaces uniform DDPM timesteps and "
        "--timestep-sampling): uniform, logit_normal (sigmoid of N(bias, weight+1)), heavy_tail (SD3's mode with "
        "scale weight), beta (Beta(weight, bias)), or weighted buckets: sigmoid, cos_map, inverted_parabola. "
        "Flow matching shifts by --discrete-flow-shift.",
        choices=TIMESTEP_DISTRIBUTIONS,
        group="loss",
    )
    noising_weight: float = option(0.0, "--timestep-distribution: OneTrainer's noising_weight.", group="loss")
    noising_bias: float = option(0.0, "--timestep-distribution: OneTrainer's noising_bias.", group="loss")
    min_noising_strength: float = option(
        0.0,
        "--timestep-distribution: lowest noise level as a share of the timesteps (narrowed before the shift).",
        group="loss",
        minimum=0,
        maximum=1,
    )
    max_noising_strength: float = option(
        1.0,
        "--timestep-distribution: highest noise level as a share of the timesteps (excluded).",
        group="loss",
        minimum=0,
        maximum=1,
    )
    timestep_shift: float | None = option(
        None,
        "--timestep-distribution: OneTrainer's timestep_shift t' = T*s*t/((s-1)*t+T) of the drawn timestep, on every "
        "family (default: --discrete-flow-shift on flow-matching families, 1 = none on SD1/SD2/SDXL).",
        group="loss",
        minimum=0,
        above_minimum=True,
    )
    dynamic_timestep_shift: bool = option(
        False,
        "Flow-matching families, with --timestep-distribution or --timestep-sampling shift_table: shift by the "
        "batch's resolution (Flux's exp(mu), as OneTrainer's dynamic_timestep_shifting and ai-toolkit's Flux "
        "scheduler do) instead of a fixed shift.",
        group="loss",
    )
    # flow matching (SD3, Flux): kohya's flag names
    timestep_sampling: str = option(
        "logit_normal",
        "Flow-matching families: how the noise level is drawn (logit_normal = sigmoid of N(--logit-mean, "
        "--logit-std), SD3's default; mode = SD3's f_mode with --mode-scale; sigmoid = sigmoid of "
        "--sigmoid-scale * N(0, 1); uniform; kohya Flux's sigma = a sigma of its shifted 1000-step table, "
        "drawn with --weighting-scheme's density; flux_shift = sigmoid sampling with Flux's "
        "resolution-dependent shift instead of --discrete-flow-shift; ai-toolkit's tables, an index drawn "
        "uniformly from the first 999 of 1000 timesteps: linear_table = 1000, 999, ..., 1, shift_table = "
        "diffusers' flow-matching schedule shifted by --discrete-flow-shift or --dynamic-timestep-shift, "
        "lognorm_blend_table = a table drawn per sample, 3/4 log-normal and 1/4 linear, sigmoid_table = a table "
        "drawn per sample, 1000 sorted sigmoid(N(0, 1)) values).",
        choices=TIMESTEP_SAMPLINGS,
        group="loss",
    )
    discrete_flow_shift: float | None = option(
        None,
        "Flow-matching families: time shift s' = shift*s/(1+(shift-1)*s) applied to the sampled noise level "
        "(every sampling but flux_shift; 1 = none; default: the family's flow_shift, 1 for SD3, Flux and Chroma; "
        "SD3 uses 3.0 at 1024px).",
        group="loss",
        minimum=0,
        above_minimum=True,
    )
    min_table_index: int = option(
        0,
        "Flow matching, ai-toolkit's tables (--timestep-sampling *_table): the lowest index drawn (index 0 is the "
        "noisiest entry; ai-toolkit's min_denoising_steps).",
        group="loss",
        minimum=0,
    )
    max_table_index: int = option(
        999,
        "Flow matching, ai-toolkit's tables: the index is drawn from [--min-table-index, this) (ai-toolkit's "
        "max_denoising_steps; its default 999 leaves out the table's last entry).",
        group="loss",
        minimum=1,
    )
    timestep_loss_weight: str = option(
        "none",
        "Flow-matching families: ai-toolkit's loss weight per noise level sigma: bell (its linear_timesteps) = "
        "exp(-2 (sigma - 0.5)^2) minus its lowest value on the 1000-step table, scaled to mean 1 there; half_bell "
        "(linear_timesteps2) = the same, held at its peak for sigma <= 0.5; weighted_table (its timestep_type "
        "weighted, meant for --timestep-sampling linear_table) = entry 1000 (1 - sigma) of its 1000 weights "
        "measured on Flex.1-alpha (with another sampling the entry nearest sigma).",
        choices=TIMESTEP_LOSS_WEIGHTS,
        group="loss",
    )
    logit_mean: float = option(0.0, "Flow matching, logit_normal sampling: mean of the normal.", group="loss")
    logit_std: float = option(
        1.0, "Flow matching, logit_normal sampling: standard deviation.", group="loss", minimum=0, above_minimum=True
    )
    mode_scale: float = option(
        1.29,
        "Flow matching, mode sampling: the SD3 paper's scale s.",
        group="loss",
        minimum=MODE_SCALE_RANGE[0],
        maximum=MODE_SCALE_RANGE[1],
    )
    sigmoid_scale: float = option(
        1.0,
        "Flow matching, sigmoid/flux_shift sampling: scale of the normal.",
        group="loss",
        minimum=0,
        above_minimum=True,
    )
    model_prediction_type: str = option(
        "raw",
        "Flow-matching families: how the denoiser's output o is compared (kohya's meanings): raw (o against "
        "noise - latents), additive (o + noisy input), sigma_scaled (noisy input - sigma*o, still against "
        "noise - latents, with --weighting-scheme's loss weight; kohya's Flux default), x0 (noisy input - "
        "sigma*o against the latents, with the loss weight; kohya's SD3 script).",
        choices=MODEL_PREDICTION_TYPES,
        group="loss",
    )
    weighting_scheme: str = option(
        "uniform",
        "Flow-matching families (kohya's --weighting_scheme): the density of --timestep-sampling sigma "
        "(uniform, logit_normal, mode), or with --model-prediction-type sigma_scaled/x0 a loss weight per "
        "noise level: sigma_sqrt (1/sigma^2) or cosmap (2/(pi(1-2s+2s^2))).",
        choices=WEIGHTING_SCHEMES,
        group="loss",
    )
    guidance_scale: float | None = option(
        None,
        "Flux dev: the value its guidance embedding gets while training (kohya's --guidance_scale; default 1.0 as "
        "kohya's examples use, with --control-lora 30 as diffusers' train_control_lora_flux.py; schnell has no "
        "guidance embedding).",
        group="loss",
    )
    bypass_guidance_embedding: bool = option(
        False,
        "Flux dev (and Flex.1): train with the time/text embedding = timestep embedding + pooled-text embedding, "
        "the guidance embedding left out (ai-toolkit's bypass_guidance_embedding, which Flex.1 needs); samples "
        "keep the guidance. Refused on models without a guidance embedding (schnell, SD3, Chroma, SD).",
        group="loss",
    )
    t5xxl_max_token_length: int | None = option(
        None, "T5 tokens per caption (default: the family's, Flux dev 512, schnell 256).", group="loss", minimum=1
    )
    apply_t5_attn_mask: bool = option(
        False, "Mask T5's padding tokens in T5 and in the denoiser's attention (kohya's flag).", group="loss"
    )
    # SD3 conditioning (kohya's sd3 scripts; sdcore.train.encoder_dropout)
    apply_lg_attn_mask: bool = option(
        False,
        "SD3: CLIP-L and CLIP-G ignore their padding tokens (attention mask inside the CLIP encoders; the MMDiT "
        "gets no mask, as in kohya).",
        group="loss",
    )
    clip_l_dropout_rate: float = option(
        0.0,
        "SD3: per-sample probability of zeroing CLIP-L's output (context and pooled part; kohya).",
        group="loss",
        minimum=0,
        maximum=1,
    )
    clip_g_dropout_rate: float = option(
        0.0,
        "SD3: per-sample probability of zeroing CLIP-G's output (context and pooled part; kohya).",
        group="loss",
        minimum=0,
        maximum=1,
    )
    t5_dropout_rate: float = option(
        0.0, "SD3: per-sample probability of zeroing T5's output (kohya).", group="loss", minimum=0, maximum=1
    )
    enable_scaled_pos_embed: bool = option(
        False,
        "SD3: kohya's scaled positional embedding, one sin-cos table per training resolution instead of the "
        "centre crop of the model's (kohya: for SD3.5M; sdcore.models.sd3.pos_embed).",
        group="loss",
    )
    pos_emb_random_crop_rate: float = option(
        0.0,
        "SD3: per-sample probability of cropping the positional embedding at a random place instead of its "
        "centre (kohya: for SD3.5M).",
        group="loss",
        minimum=0,
        maximum=1,
    )
    clip_skip: int = option(
        1,
        "Use the output of the N-th from last text-encoder layer (2 = A1111 clip skip 2).",
        group="loss",
        minimum=1,
    )
    # saving and logs
    save_every: int | None = option(
        None,
        "Save a checkpoint of the result and the resumable state every N steps.",
        group="output",
        minimum=1,
    )
    save_every_epochs: int | None = option(None, "Save every N epochs.", group="output", minimum=1)
    save_limit: int | None = option(
        DEFAULT_SAVE_LIMIT,
        "Keep only the newest N intermediate results (the final result is always kept; 0 keeps all).",
        group="output",
        minimum=0,
    )
    save_n_epoch_ratio: int | None = option(
        None,
        "Save about N intermediate results over the run: every floor(epochs/N) epochs, at least 1 (kohya's "
        "--save_n_epoch_ratio; replaces --save-every-epochs).",
        group="output",
        minimum=1,
    )
    save_dtype: str = option("fp16", "Precision of saved weights.", choices=SAVE_DTYPES, group="output")
    save_state: bool = option(
        True, "Write a resumable state folder with each save, on Ctrl-C and at the end.", group="output"
    )
    keep_states: int = option(
        1,
        "Keep only the newest N resumable state folders (a state can be several times the result's size; 0 keeps all).",
        group="output",
        minimum=0,
    )
    resume: str | None = option(
        None, "Resume from a state folder (or 'latest' in the output's state dir).", group="output", path=True
    )
    initial_step: int | None = option(
        None,
        "Start at this optimizer step (kohya's --initial_step; overrides --initial-epoch and a --resume state's "
        "step). Without --skip-until-initial-step only the start epoch moves and steps count from 0; the LR "
        "schedule moves only with --resume (kohya).",
        group="output",
        minimum=0,
    )
    initial_epoch: int | None = option(
        None,
        "Start at this epoch, 1 = the first (kohya's --initial_epoch): --initial-step (E-1) x steps per epoch.",
        group="output",
        minimum=1,
    )
    skip_until_initial_step: bool = option(
        False,
        "Skip the steps before --initial-step/--initial-epoch (or a resumed state's step) without loading their "
        "images, so the same batches and noise follow as in an uninterrupted run (kohya).",
        group="output",
    )
    sample_prompts: str | None = option(
        None,
        "A prompt, or a prompt file (.txt one per line with kohya's --n --w --h --s --d --l --ss options; "
        ".json/.toml as kohya), to render while training.",
        group="output",
        path=True,
    )
    sample_at_first: bool = option(
        False, "Also render the sample prompts before the first step (kohya's --sample_at_first).", group="output"
    )
    sample_every: int | None = option(None, "Render the sample prompts every N steps.", group="output", minimum=1)
    sample_every_epochs: int | None = option(
        None, "Render the sample prompts every N epochs.", group="output", minimum=1
    )
    sample_steps: int = option(
        20, "Sampler steps for sample images (a prompt's --s overrides).", group="output", minimum=1
    )
    sample_sampler: str | None = option(
        None,
        "Sampler for sample images (sdcore or kohya names; a prompt's --ss overrides). Default: the family's own, "
        "as sdcore generate's (euler_a; the flow-matching Euler on FLUX.1 and Chroma).",
        group="output",
    )
    sample_resolution: int | None = option(
        None,
        "Width and height of sample images where a prompt gives no --w/--h. Default: --resolution (a run written "
        "in kohya's names: kohya's 512).",
        group="output",
        minimum=1,
    )
    sample_cfg: float | None = option(
        None,
        "CFG scale of sample images where a prompt gives no --l (FLUX.1: the embedded guidance where it gives no "
        "--g). Default: the family's own, as sdcore generate's (a run written in kohya's names: kohya's 7.5; "
        "Chroma 1, no CFG).",
        group="output",
        minimum=0,
        above_minimum=True,
    )
    validation_split: float = option(
        0.0,
        "Hold out this fraction of each training subset's images (kohya's rule: a seeded shuffle, the last "
        "round(n*split) held out) and report their loss instead of training on them (0 = off; kohya).",
        group="validation",
        minimum=0,
        maximum=1,
        below_maximum=True,
    )
    validation_seed: int | None = option(
        None, "Seed of the validation split and of the validation noise (default: --seed).", group="validation"
    )
    validate_every_n_steps: int | None = option(
        None,
        "Also compute the validation loss every N optimizer steps (needs --validation-split).",
        group="validation",
        minimum=1,
    )
    validate_every_n_epochs: int | None = option(
        None,
        "Compute the validation loss every N epochs (default: every epoch when --validation-split is given).",
        group="validation",
        minimum=1,
    )
    max_validation_steps: int | None = option(
        None,
        "Validate on at most this many batches of held-out images (default: all of them).",
        group="validation",
        minimum=0,
    )
    # ModelSpec metadata of the saved .safetensors (kohya's --metadata_* options, library/sai_model_spec.py)
    metadata_title: str | None = option(
        None, "modelspec.title of the saved file (default: the output file's name).", group="metadata"
    )
    metadata_author: str | None = option(None, "modelspec.author of the saved file.", group="metadata")
    metadata_description: str | None = option(None, "modelspec.description of the saved file.", group="metadata")
    metadata_license: str | None = option(None, "modelspec.license of the saved file.", group="metadata")
    metadata_tags: str | None = option(
        None, "modelspec.tags of the saved file, comma-separated, written as given.", group="metadata"
    )
    metadata_usage_hint: str | None = option(None, "modelspec.usage_hint of the saved file.", group="metadata")
    metadata_thumbnail: str | None = option(
        None,
        "modelspec.thumbnail: an image file (written as a base64 data: URL, as kohya does) or a data: URL.",
        group="metadata",
        metavar="FILE",
        path=True,
    )
    metadata_merged_from: str | None = option(None, "modelspec.merged_from of the saved file.", group="metadata")
    metadata_trigger_phrase: str | None = option(None, "modelspec.trigger_phrase of the saved file.", group="metadata")
    metadata_preprocessor: str | None = option(None, "modelspec.preprocessor of the saved file.", group="metadata")
    metadata_is_negative_embedding: str | None = option(
        None, "modelspec.is_negative_embedding of the saved file (text, e.g. 'true').", group="metadata"
    )
    training_comment: str | None = option(
        None, "Free text stored as ss_training_comment in the saved file (kohya).", group="metadata"
    )
    log_dir: str | None = option(
        None, "TensorBoard log folder (when tensorboard is installed).", group="output", path=True
    )
    progress: bool = option(True, "Show a progress bar.", group="output")


def apply_model_defaults(options: TrainOptions, bundle: Any = None) -> bool:
    """Fill the options whose default depends on the model: ``resolution`` 0 becomes the model's
    native size (from ``bundle`` when loaded, else peeked from ``options.model`` without loading).

    When that size is below ``min_bucket_reso`` or above ``max_bucket_reso``, those follow it (half
    and twice the size, on the bucket step), and a bucket step above it becomes the size (else no bucket
    fits). Returns ``False`` when the model must be loaded first.
    """
    if not options.resolution and options.resolutions:
        import contextlib

        from ..data.resolutions import parse_resolutions

        with contextlib.suppress(ConfigError):  # the pre-flight reports a bad list
            options.resolution = max(parse_resolutions(options.resolutions))
    if options.resolution:
        return True
    from ..models.native import bundle_native_resolution, peek_native_resolution

    chosen = None if options.prediction_type == "auto" else options.prediction_type
    native = bundle_native_resolution(bundle) if bundle is not None else peek_native_resolution(options.model, chosen)
    if native is None:
        return False
    options.resolution = native
    step = max(1, options.bucket_step)
    if step > native:  # a model smaller than kohya's 64 (the toy world's 32): one step a side, not an error
        options.bucket_step = step = native
    if options.min_bucket_reso > native:
        options.min_bucket_reso = max(step, (native // 2) // step * step)
    if options.max_bucket_reso < native:
        options.max_bucket_reso = -(-2 * native // step) * step
    return True
