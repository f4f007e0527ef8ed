"""Inpainting models trained end to end: `sdcore train lora` on a tiny SD1 inpainting model and a tiny FLUX.1
Fill (files the test saves), OneTrainer configs of each inpainting model type imported (and refused in one line
on a model of the other kind), and a learning check (kohya's --train_inpainting: test_kohya_inpainting.py): a
LoRA on an inpainting model learns to read the masked image (the loss inside the hole with each sample's own
masked image falls below the loss with another sample's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sd1_inpainting(tmp_path: Path) -> Path:
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1", variant="inpainting")  # conv_in takes 9 channels
    return Path(bundle.save(tmp_path / "sd1-inpainting.safetensors"))


def _flux_fill(tmp_path: Path) -> Path:
    from diffusers import FluxTransformer2DModel
    from sdcore.models.load import load_model

    bundle = load_model("tiny:flux")
    config = {k: v for k, v in bundle.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    bundle.transformer = FluxTransformer2DModel.from_config({**config, "in_channels": 384, "out_channels": 64})
    return Path(bundle.save(tmp_path / "flux-fill", format="diffusers"))


def _colours(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` images of one random colour each, one caption for all, and a mask per image (kohya's mask images:
    white = the hole, the left half): only the right half, seen through the masked image, tells the colour."""
    from PIL import Image

    data, masks = root / "data" / "1_colours", root / "masks"
    data.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(seed)
    hole = np.zeros((64, 64, 3), dtype=np.uint8)
    hole[:, :32] = 255
    for i in range(n):
        Image.fromarray(np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (64, 64, 3)).copy()).save(
            data / f"c{i}.png"
        )
        (data / f"c{i}.txt").write_text("a colour", encoding="utf-8")
        Image.fromarray(hole).save(masks / f"c{i}.png")
    return data.parent


@pytest.mark.parametrize("kind", ["sd1", "fill"])
def test_sdcore_train_lora_on_an_inpainting_model(tmp_path, sd_cli, pm, kind):
    """The CLI path with mask images (--masked-loss): the LoRA trains and keeps kohya's key names; the same run
    with --sample-prompts renders its samples on the SD inpainting model (A1111's txt2img on an inpainting model,
    as OneTrainer's samples without sample_inpainting) and stops before loading with one line on FLUX.1 Fill
    (generate renders Fill only from an init image and a mask)."""
    from sdplugin_lora.format import read_lora

    model = _sd1_inpainting(tmp_path) if kind == "sd1" else _flux_fill(tmp_path)
    data = _colours(tmp_path, 2)
    out = tmp_path / "inpaint.safetensors"
    args = ["train", "lora", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "2",
            "--resolution", "64", "--min-bucket-reso", "64", "--no-progress", "--save-dtype", "fp32", "--seed", "0",
            "--rank", "2", "--lr", "1e-2", "--cache-latents", "--masked-loss", "--conditioning-data-dir",
            str(tmp_path / "masks"), "--inpainting-unmasked-probability", "0.1"]  # fmt: skip
    if kind == "fill":
        args += ["--t5xxl-max-token-length", "8"]
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    lora = read_lora(out)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in" if kind == "sd1" else "lora_unet_double_blocks_0_img_attn_qkv"
    assert name in lora.modules
    assert any(float(m.up.abs().max()) > 0 for m in lora.modules.values())  # it trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a colour\n", encoding="utf-8")
    result = sd_cli([*args, "--sample-prompts", str(prompts), "--sample-every", "1"], pm=pm)
    if kind == "fill":
        assert result.exit_code != 0 and "Traceback" not in result.output
        # a kohya-format Fill sample needs its image (--i; kohya trains no Fill model): one line, exit 2
        assert "a FLUX.1 Fill sample in kohya's prompt format needs an image to inpaint" in result.output
        assert "1 of 1 prompt(s) have none (the first: 'a colour')" in result.output
        return
    assert result.exit_code == 0, result.output + repr(result.exception)
    samples = sorted((tmp_path / "inpaint-samples").glob("*.png"))
    assert len(samples) >= 2  # step 1, step 2 (and the end)
    from PIL import Image

    image = Image.open(samples[-1])
    assert image.size == (64, 64)
    # A1111 writes the weight whenever an inpainting model's conditioning is used (txt2img too)
    assert ", Conditional mask weight: 1, RNG: CPU, " in image.info["parameters"]  # as sdcore generate writes it


def test_an_inpainting_lora_learns_to_read_the_masked_image(tmp_path):
    """After training, the fixed-noise loss inside the hole (the loss mask) with each sample's own masked image
    is clearly below the loss with the next sample's; before training the two were close. The tiny VAE is made
    sharp (posterior std ~0, latents of about unit spread), as a trained VAE's are."""
    from sdcore.models.load import load_model
    from sdcore.testing.conditioning import own_and_shuffled_loss
    from sdcore.testing.contract import contract_options
    from sdcore.train.data import SampleRef
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    n = 8
    data = _colours(tmp_path, n)
    bundle = load_model(_flux_fill(tmp_path))
    with torch.no_grad():
        conv = bundle.vae.encoder.conv_out  # channels 16..31 are the posterior's log-variance
        conv.weight[16:].zero_()
        conv.bias[16:].fill_(-30.0)
        conv.weight[:16] *= 16.0
    options = {"data": str(data), "masked_loss": True, "conditioning_data_dir": str(tmp_path / "masks"),
               "max_steps": 300, "lr": 1e-2, "rank": 8, "alpha": 8, "batch_size": n, "save_state": False,
               "cache_latents": True, "cache_text_encoder_outputs": True, "t5xxl_max_token_length": 8}  # fmt: skip
    o = contract_options(LoraMethod, tmp_path, options, family="flux")
    session = TrainSession(LoraMethod(o), bundle=bundle)
    session.setup()

    check = session.make_batch([SampleRef(i, 0, -1) for i in range(n)])
    assert check.masked_latents is not None and check.masks is not None

    def losses() -> tuple[float, float]:
        return own_and_shuffled_loss(session, n, "masked_latents")

    before_own, before_other = losses()
    session.run()
    own, other = losses()
    print(f"own masked image {before_own:.4f} -> {own:.4f}, another's {before_other:.4f} -> {other:.4f}")
    assert abs(before_own - before_other) < 0.05 * before_own  # untrained: the masked image hardly matters
    assert own < 0.92 * other, (own, other)  # it learned to read the masked image
    assert own < 0.8 * before_own, (before_own, own)


# --- OneTrainer configs (its ModelType: has_mask_input / has_conditioning_image_input; TrainConfig defaults
# unmasked_probability 0.1) ------------------------------------------------------------------------------------


def _ot(tmp_path: Path, config: dict, method: str = "lora", notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_dreambooth.options import DreamBoothOptions
    from sdplugin_lora.method import LoraOptions

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    cls = LoraOptions if method == "lora" else DreamBoothOptions
    return load_options(cls, path, notes=notes if notes is not None else [])


def _inpainting_model(tmp_path: Path, family: str) -> Path:
    """A tiny inpainting single file of ``family`` (sd1, sd2, sdxl: the UNet widened to 9 channels)."""
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle(family, variant="inpainting")
    return Path(bundle.save(tmp_path / f"{family}-inpainting.safetensors"))


@pytest.mark.parametrize(
    ("model_type", "family"),
    [("STABLE_DIFFUSION_15_INPAINTING", "sd1"), ("STABLE_DIFFUSION_20_INPAINTING", "sd2"),
     ("STABLE_DIFFUSION_XL_10_BASE_INPAINTING", "sdxl"), ("FLUX_FILL_DEV_1", "flux")],
)  # fmt: skip
def test_onetrainer_inpainting_model_types_import(tmp_path, model_type, family):
    from sdcore.errors import ConfigError

    model = _flux_fill(tmp_path) if family == "flux" else _inpainting_model(tmp_path, family)
    config = {"training_method": "LORA", "model_type": model_type, "base_model_name": str(model),
              "resolution": "64", "unmasked_probability": 0.25, "output_model_format": "KOHYA_LORA"}  # fmt: skip
    notes: list[str] = []
    o = _ot(tmp_path, config, notes=notes)
    assert (o.model, o.inpainting_unmasked_probability, o.masked_loss) == (str(model), 0.25, False)
    assert not any("unmasked_probability" in n for n in notes)  # it acts: no "no effect" note
    plain = {"sd1": "tiny:sd1", "sd2": "tiny:sd2", "sdxl": "tiny:sdxl", "flux": "tiny:flux"}[family]
    with pytest.raises(ConfigError) as info:  # the inpainting type on a plain model: one line
        _ot(tmp_path, {**config, "base_model_name": plain})
    assert f"model_type '{model_type}'" in str(info.value) and "is not an inpainting model" in str(info.value)
    plain_type = {"sd1": "STABLE_DIFFUSION_15", "sd2": "STABLE_DIFFUSION_20_BASE", "sdxl": "STABLE_DIFFUSION_XL_10_BASE",
                  "flux": "FLUX_DEV_1"}[family]  # fmt: skip
    with pytest.raises(ConfigError, match="use its _INPAINTING/FILL type"):  # and the plain type on this one
        _ot(tmp_path, {**config, "model_type": plain_type})


def test_onetrainer_inpainting_options(tmp_path):
    """masked_training gives the masks of both the loss and the conditioning; custom_conditioning_image reads the
    -condlabel.png images (a note on a model without the mask input, as OneTrainer ignores it there); the depth
    models stay refused with their reason."""
    from sdcore.errors import ConfigError

    model = _inpainting_model(tmp_path, "sd1")
    config = {"training_method": "FINE_TUNE", "model_type": "STABLE_DIFFUSION_15_INPAINTING",
              "base_model_name": str(model), "resolution": "64", "masked_training": True}  # fmt: skip
    o = _ot(tmp_path, config, "dreambooth")
    assert (o.masked_loss, o.masked_loss_unmasked_weight, o.inpainting_unmasked_probability) == (True, 0.1, 0.1)
    assert o.inpainting_conditioning_images is False
    assert _ot(tmp_path, {**config, "custom_conditioning_image": True}, "dreambooth").inpainting_conditioning_images
    notes: list[str] = []
    plain = {
        **config,
        "model_type": "STABLE_DIFFUSION_15",
        "base_model_name": "tiny:sd1",
        "custom_conditioning_image": True,
    }
    assert not _ot(tmp_path, plain, "dreambooth", notes=notes).inpainting_conditioning_images
    assert any("custom_conditioning_image: accepted, no effect" in n for n in notes), notes
    with pytest.raises(ConfigError, match="custom_conditioning_image 'yes'"):
        _ot(tmp_path, {**config, "custom_conditioning_image": "yes"}, "dreambooth")
    with pytest.raises(ConfigError, match="sdcore does not train depth models"):
        _ot(tmp_path, {**config, "model_type": "STABLE_DIFFUSION_20_DEPTH"}, "dreambooth")


def test_onetrainer_inpainting_samples(tmp_path):
    """An SD inpainting type keeps its samples (rendered from text on a full mask, as OneTrainer's sampler does
    without sample_inpainting: StableDiffusionSampler.__sample_inpainting's else branch); a sample with
    sample_inpainting carries its image and mask; FLUX_FILL_DEV_1 keeps every sample: one with sample_inpainting
    renders on that image and mask, one without on a blank image under a full mask, as OneTrainer's FluxSampler
    renders it (tests/train/test_fill_samples.py)."""
    from sdcore.train.onetrainer_config import read_sample_prompts

    samples = [{"prompt": "a colour", "width": 64, "height": 64},
               {"prompt": "a door", "sample_inpainting": True, "base_image_path": "x.png", "mask_image_path": "m.png"}]  # fmt: skip
    model = _inpainting_model(tmp_path, "sd1")
    config = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15_INPAINTING", "base_model_name": str(model),
              "resolution": "64", "output_model_format": "KOHYA_LORA", "samples": samples, "sample_after": 5,
              "sample_after_unit": "STEP"}  # fmt: skip
    notes: list[str] = []
    o = _ot(tmp_path, config, notes=notes)
    assert o.sample_prompts == str(tmp_path / "config.json") and o.sample_every == 5
    assert not any("samples: left out" in n for n in notes)
    prompts = read_sample_prompts(tmp_path / "config.json")
    assert [(p.inpaint_image, p.inpaint_mask, p.ignored) for p in prompts] == [(None, None, ()),
                                                                               ("x.png", "m.png", ())]  # fmt: skip
    fill = _flux_fill(tmp_path)
    notes = []
    o = _ot(tmp_path, {**config, "model_type": "FLUX_FILL_DEV_1", "base_model_name": str(fill)}, notes=notes)
    assert o.sample_prompts == str(tmp_path / "config.json") and o.sample_every == 5
    assert not any("samples: left out" in n for n in notes)
    notes = []
    o = _ot(tmp_path, {**config, "model_type": "FLUX_FILL_DEV_1", "base_model_name": str(fill),
                       "samples": samples[1:]}, notes=notes)  # fmt: skip
    assert o.sample_prompts == str(tmp_path / "config.json") and o.sample_every == 5
    assert not any("samples: left out" in n for n in notes)
