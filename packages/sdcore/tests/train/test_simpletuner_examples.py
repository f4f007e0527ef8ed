"""The keys and values of SimpleTuner's own example configs (``simpletuner/examples/*/config.json`` and the
``multidatabackend-*.json`` data backends, bghira/SimpleTuner bc8e6ab) as ``--config``.

The configs are written here with the examples' key sets (SimpleTuner is AGPL-3.0: none of its files is
copied); each expected value cites the SimpleTuner code it comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.testing.datasets import make_tiny_dataset


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _backend(tmp_path: Path, images: Path, **keys: object) -> Path:
    """The examples' multidatabackend-small-dreambooth-*.json with type local: one square-cropped image dataset
    captioned by instance_prompt, and a text-embed cache."""
    image = {
        "id": "dreambooth", "type": "local", "instance_data_dir": str(images), "crop": True, "crop_style": "random",
        "crop_aspect": "square", "resolution": 64, "resolution_type": "pixel", "caption_strategy": "instanceprompt",
        "instance_prompt": "sks", "cache_dir_vae": "cache/vae", **keys,
    }  # fmt: skip
    embeds = {"id": "alt-embed-cache", "dataset_type": "text_embeds", "default": True, "type": "local",
              "cache_dir": "cache/text"}  # fmt: skip
    return _write(tmp_path / "backend.json", [image, embeds])


def _config(tmp_path: Path, backend: Path, **keys: object) -> Path:
    """The flux.peft-lora example's key set, with a local model, backend and output."""
    config = {
        "base_model_precision": "int8-quanto", "checkpoint_step_interval": 10, "controlnet": False,
        "data_backend_config": str(backend), "disable_bucket_pruning": True, "flow_schedule_shift": 3,
        "fuse_qkv_projections": False, "grad_clip_method": "value", "gradient_checkpointing": True,
        "hub_model_id": "example-flux-lora", "learning_rate": 1e-4, "lora_alpha": 4, "lora_rank": 4,
        "lora_type": "standard", "lr_scheduler": "constant", "max_train_steps": 2, "mixed_precision": "no",
        "model_family": "flux", "model_type": "lora", "num_eval_images": 25, "num_train_epochs": 0,
        "optimizer": "adamw_bf16", "output_dir": str(tmp_path / "out"), "push_checkpoints_to_hub": False,
        "push_to_hub": False, "quantize_via": "cpu", "report_to": "none", "seed": 42,
        "tracker_project_name": "lora-training", "tracker_run_name": "example", "train_batch_size": 1,
        "use_ema": False, "vae_batch_size": 1, "validation_disable_unconditional": True, "validation_guidance": 4.0,
        "validation_guidance_rescale": 0.0, "validation_negative_prompt": "ugly",
        "validation_num_inference_steps": 2, "validation_prompt": "sks holding a sign",
        "validation_prompt_library": False, "validation_resolution": "64x64", "validation_seed": 42,
        "validation_steps": 50, "pretrained_model_name_or_path": "tiny:flux", **keys,
    }  # fmt: skip
    return _write(tmp_path / "config.json", {k: v for k, v in config.items() if v is not None})


def _images(tmp_path: Path, size: int = 64) -> Path:
    return make_tiny_dataset(tmp_path / "data", n=2, size=size) / "1_sks"


def _lora(path: Path, notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=[] if notes is None else notes)


def _problems(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        _lora(path)
    return str(info.value)


#: every value of SimpleTuner's base_model_precision (helpers/training/__init__.py quantised_precision_levels)
#: -> sdcore's --base-weights-dtype ("none": the compute dtype; None: refused)
LEVELS = {
    "int8-quanto": "int8", "int4-quanto": "nf4", "int2-quanto": None, "int8-torchao": "int8",
    "int8dq-torchao": "int8", "int8dq-int4-torchao": "nf4", "int8-sdnq": "int8", "uint8-sdnq": "int8",
    "int16-sdnq": "none", "uint16-sdnq": "none", "fp16-sdnq": "none", "fp8-sdnq": "fp8", "int6-sdnq": "int8",
    "int5-sdnq": "int8", "uint5-sdnq": "int8", "uint4-sdnq": "nf4", "uint3-sdnq": None, "uint2-sdnq": None,
    "nf4-bnb": "nf4", "int4-torchao": "nf4", "fp8-quanto": "fp8", "fp8uz-quanto": "fp8", "fp8-native": "fp8",
    "fp8-torchao": "fp8", "fp8wo-torchao": "fp8", "fp8-int4-torchao": "nf4", "fp8-transformerengine": "fp8",
    "no_change": "none",
}  # fmt: skip


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_base_model_precision_is_the_frozen_weights_storage(tmp_path, level):
    path = _config(tmp_path, _backend(tmp_path, _images(tmp_path)), base_model_precision=level)
    if LEVELS[level] is None:  # below 4 bits: sdcore's nf4 rounds far less
        assert f"base_model_precision {level!r}: sdcore stores frozen weights in 4 bits at the fewest" in _problems(
            path
        )
        return
    notes: list[str] = []
    assert _lora(path, notes).base_weights_dtype == LEVELS[level]
    assert any(f"base_model_precision {level}:" in n for n in notes) == (level != "no_change")


def test_bucket_pruning_true_is_sdcores_and_false_is_noted_with_batches_over_one(tmp_path):
    """metadata/backends/base.py _prune_small_buckets: a bucket with images x (repeats + 1) under the batch size is
    dropped unless disable_bucket_pruning; sdcore keeps a short last batch (sdcore.data.sampler)."""
    backend = _backend(tmp_path, _images(tmp_path))
    for pruning, batch, noted in ((True, 2, False), (None, 2, True), (False, 2, True), (None, 1, False)):
        notes: list[str] = []
        path = _config(tmp_path, backend, disable_bucket_pruning=pruning, train_batch_size=batch)
        assert _lora(path, notes).batch_size == batch
        assert any("disable_bucket_pruning false: SimpleTuner leaves out" in n for n in notes) == noted, notes


def test_pixel_resolution_with_a_square_crop_is_that_square(tmp_path):
    """training_sample.py calculate_target_size: crop_aspect square -> target (pixel_resolution,) * 2, the square
    of the area pixel_area gives; without the square crop pixel sizes the shorter edge (noted)."""
    from sdcore.data.dataset import scan_dataset

    images = _images(tmp_path)
    notes: list[str] = []
    o = _lora(_config(tmp_path, _backend(tmp_path, images)), notes)
    (subset,) = scan_dataset(o).subsets
    assert (subset.resolution, subset.buckets) == (64, False)
    assert not any("resolution_type pixel" in n for n in notes)

    notes = []
    o = _lora(_config(tmp_path, _backend(tmp_path, images, crop=False)), notes)
    (subset,) = scan_dataset(o).subsets
    assert (subset.resolution, subset.buckets) == (64, True)  # the area 64x64
    assert any("resolution_type pixel: SimpleTuner sizes each image's shorter edge to 64" in n for n in notes)


def test_size_limits_of_the_examples_backends(tmp_path):
    """minimum_image_size: the folder's images are checked (SimpleTuner leaves smaller ones out:
    base.py meets_resolution_requirements); maximum_image_size + target_downsample_size = the resolution with a
    square crop resize to the resolution before cropping, as sdcore does (training_sample.py
    _downsample_before_crop); another target_downsample_size is refused."""
    images = _images(tmp_path, size=64)
    fine = {"minimum_image_size": 32, "maximum_image_size": 64, "target_downsample_size": 64}
    assert _lora(_config(tmp_path, _backend(tmp_path, images, **fine))).data
    # pixel_area: an edge over 10 becomes edge**2 / 1e6 megapixels (data_backend/config/image.py)
    area = {**fine, "resolution_type": "pixel_area"}
    assert _lora(_config(tmp_path, _backend(tmp_path, images, **area))).data

    text = _problems(_config(tmp_path, _backend(tmp_path, images, minimum_image_size=128)))
    assert "minimum_image_size 128: SimpleTuner leaves out 000.png, 001.png; sdcore filters no image" in text
    # area 0.005 megapixels > 64 * 64 = 4096 pixels
    text = _problems(_config(tmp_path, _backend(tmp_path, images, minimum_image_size=0.005, resolution_type="area",
                                                resolution=0.004096)))  # fmt: skip
    assert "minimum_image_size 0.005: SimpleTuner leaves out" in text
    text = _problems(_config(tmp_path, _backend(tmp_path, images, maximum_image_size=64, target_downsample_size=128)))
    assert "target_downsample_size 128: SimpleTuner resizes each image to it before cropping" in text


@pytest.mark.parametrize(
    ("name", "sdcore", "args"),
    [
        # optimizer_param.py:315,327,382,395 default_settings
        ("optimi-lion", "lion", "betas=0.9,0.99 weight_decay=0.0"),
        ("optimi-adamw", "adamw", "betas=0.9,0.99 weight_decay=0.0 eps=1e-06"),
        ("optimi-adam", "adamw", "betas=0.9,0.99 weight_decay=0.0 eps=1e-06"),
        ("optimi-sgd", "sgd", "momentum=0.0 weight_decay=0.0"),
    ],
)
def test_torch_optimi_optimizers_with_the_same_rule(tmp_path, name, sdcore, args):
    notes: list[str] = []
    o = _lora(_config(tmp_path, _backend(tmp_path, _images(tmp_path)), optimizer=name, adam_beta2=0.95), notes)
    assert (o.optimizer, o.optimizer_args) == (sdcore, args)
    assert any(f"optimizer {name}: sdcore's --optimizer {sdcore} has torch-optimi's update rule" in n for n in notes)
    assert any("adam_beta2: not read by SimpleTuner's optimizers outside DeepSpeed" in n for n in notes)


def test_stableadamw_huggingface_and_hub_models_are_refused_with_the_way_forward_and_tread_translates(tmp_path):
    images = _images(tmp_path)
    tread = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}  # TREAD.md's
    assert _lora(_config(tmp_path, _backend(tmp_path, images), tread_config=tread)).tread_route == ("0.5:2:-2",)
    backend = _backend(tmp_path, images, type="huggingface", dataset_name="RareConcepts/Domokun")
    text = _problems(
        _config(tmp_path, backend, optimizer="optimi-stableadamw", pretrained_model_name_or_path=None,
                tread_config=tread)
    )  # fmt: skip
    assert "optimizer 'optimi-stableadamw': not in sdcore (the nearest: --optimizer adamw)" in text
    assert "tread_config" not in text
    # flux/model.py DEFAULT_MODEL_FLAVOUR krea and its HUGGINGFACE_PATHS
    assert (
        "SimpleTuner would download black-forest-labs/flux.1-krea-dev (model_family flux, model_flavour krea)" in text
    )
    assert (
        "download the dataset RareConcepts/Domokun to a folder" in text and "type local and instance_data_dir" in text
    )
    text = _problems(
        _config(tmp_path, _backend(tmp_path, images), model_family="sd3", pretrained_model_name_or_path=None)
    )
    assert "SimpleTuner would download stabilityai/stable-diffusion-3.5-medium" in text


def test_lycoris_bypass_mode_is_accepted(tmp_path):
    """sdxl.lycoris-lokr's lycoris_config: LyCORIS' bypass_forward is org_forward(x) + the adapter on x."""
    lyco = _write(tmp_path / "lycoris.json", {"bypass_mode": True, "algo": "lokr", "multiplier": 1.0,
                                             "linear_dim": 8, "linear_alpha": 1, "factor": 4,
                                             "apply_preset": {"target_module": ["Attention"],
                                                              "module_algo_map": {"Attention": {"factor": 4}}}})  # fmt: skip
    notes: list[str] = []
    path = _config(tmp_path, _backend(tmp_path, _images(tmp_path)), lora_type="lycoris", lycoris_config=str(lyco),
                   lora_rank=None, lora_alpha=None)  # fmt: skip
    o = _lora(path, notes)
    assert (o.algo, o.rank, o.alpha, o.lokr_factor) == ("lokr", 8, 1.0, 4)
    assert any("bypass_mode: LyCORIS adds the adapter's output" in n for n in notes)


def test_flux_peft_lora_example_trains_two_steps(tmp_path):
    """The flux.peft-lora example's key set, its int8-quanto base as sdcore's int8 frozen weights, on a tiny
    FLUX.1 through the CLI."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    path = _config(tmp_path, _backend(tmp_path, _images(tmp_path), minimum_image_size=32, maximum_image_size=64,
                                      target_downsample_size=64))  # fmt: skip
    assert _lora(path).base_weights_dtype == "int8"
    cli = build_cli(get_plugin_manager())
    run = CliRunner().invoke(cli, ["train", "lora", "--config", str(path), "--no-progress"])
    assert run.exit_code == 0, run.output
    weights = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in weights)
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)  # two steps moved lora_B
