"""DreamBooth's options on top of the runtime's (defaults follow the reference method and kohya)."""

from __future__ import annotations

from dataclasses import dataclass

from sdcore.options import option
from sdcore.train.options import TrainOptions
from sdcore.train.te_stop import TextEncoderStopOptions


@dataclass
class DreamBoothOptions(TrainOptions, TextEncoderStopOptions):
    lr: float = option(
        2e-6,
        "Learning rate of the UNet (DreamBooth wants small rates: 1e-6 to 5e-6).",
        group="training",
        minimum=0,
        above_minimum=True,
    )
    lr_warmup_steps: float = option(
        0, "Linear warmup steps; a value below 1 is a ratio of the total steps (kohya).", group="training", minimum=0
    )
    save_dtype: str = option(
        "fp16", "Precision of the saved checkpoint.", choices=("fp16", "bf16", "fp32"), group="output"
    )
    instance_prompt: str | None = option(
        None,
        "Prompt for every instance image (e.g. 'photo of sks dog'); default: the caption files / folder names.",
        group="dreambooth",
    )
    class_data: str | None = option(
        None, "Folder of class (prior-preservation) images; generated here when short.", group="dreambooth", path=True
    )
    class_prompt: str | None = option(None, "Prompt of the class images (e.g. 'photo of a dog').", group="dreambooth")
    num_class_images: int = option(
        200,
        "Class images wanted; the shortfall is generated with the frozen model.",
        group="dreambooth",
        minimum=0,
    )
    class_batch_size: int = option(4, "Batch size when generating class images.", group="dreambooth", minimum=1)
    class_steps: int = option(30, "Sampler steps when generating class images.", group="dreambooth", minimum=1)
    class_sampler: str = option("dpm++2m", "Sampler for class images.", group="dreambooth")
    train_text_encoder: bool = option(False, "Also fine-tune the text encoder(s).", group="dreambooth")
    te_lr: float | None = option(None, "Text-encoder learning rate (default: --lr).", group="dreambooth", minimum=0)
    te1_lr: float | None = option(
        None,
        "With --train-text-encoder: learning rate of the first CLIP encoder (CLIP-L; SD2's OpenCLIP); 0 keeps it "
        "frozen (default --te-lr, else --lr; kohya --learning_rate_te1).",
        group="dreambooth",
        minimum=0,
    )
    te2_lr: float | None = option(
        None,
        "With --train-text-encoder: learning rate of CLIP-G (SDXL, SD3); 0 keeps it frozen (default --te-lr, else "
        "--lr; kohya --learning_rate_te2).",
        group="dreambooth",
        minimum=0,
    )
    te3_lr: float | None = option(
        None,
        "With --train-t5: learning rate of T5 (SD3, Flux); 0 keeps it frozen (default --te-lr, else --lr; kohya "
        "--learning_rate_te3).",
        group="dreambooth",
        minimum=0,
    )
    num_last_block_to_freeze: int = option(
        0,
        "SD3: keep the last N tensors of the MMDiT's image-stream (x_block) layers frozen, counted in kohya's "
        "order (kohya sd3_train.py --num_last_block_to_freeze, which counts tensors, not blocks: 2 = the last "
        "block's adaLN modulation weight and bias). 0 = off.",
        group="dreambooth",
        minimum=0,
    )
    train_t5: bool = option(
        False,
        "SD3/Flux: with --train-text-encoder, also train the T5 encoder (kohya sd3_train.py --train_t5xxl); "
        "without it T5 stays frozen, as in kohya.",
        group="dreambooth",
    )
    no_token_padding: bool = option(
        False,
        "SD1/SD2: encode each batch's captions padded only to its longest caption (at most 77 tokens), "
        "not to 77 (kohya train_db.py's --no_token_padding, diffusers' 2022 DreamBooth).",
        group="dreambooth",
    )
    block_lr: str | None = option(
        None,
        "SDXL: 23 comma-separated learning rates, one per U-Net block in kohya's numbering (time/label "
        "embeddings, input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out); they replace --lr for the "
        "U-Net and 0 freezes a block (kohya sdxl_train.py --block_lr).",
        group="dreambooth",
    )
    save_format: str | None = option(
        None,
        "single-file or diffusers (default from --output: *.safetensors is a single file).",
        choices=("single-file", "diffusers"),
        group="output",
    )
