"""The shipped base model (``toyworld:``): loads in sdcore and diffusers, draws what it is asked."""

from __future__ import annotations

import os

import pytest
import torch
from sdcore.models.load import load_model, toyworld_model_dir
from sdcore.testing.toyworld import IMAGE_SIZE
from sdcore.testing.toyworld import evaluate as ev

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Measured on the shipped build (N=64, DDIM 10 steps, CFG 5; README "The toy world"); the check
# runs a smaller N, so it sits below those figures by a margin for sampling noise.
MIN_COLOUR = 0.75
MIN_SHAPE = 0.5


@pytest.fixture(scope="module")
def base():
    return load_model("toyworld:")


def test_toyworld_loads_as_sd1_at_32px(base):
    assert base.family == "sd1" and base.prediction_type == "epsilon"
    assert base.source == "toyworld:" and base.source_format == "toyworld"
    assert base.vae_scale_factor * base.unet.config.sample_size == IMAGE_SIZE
    assert type(base.text_encoders[0]).__name__ == "CLIPTextModel"
    assert base.tokenizers[0]("a small blue square").input_ids[:3] == [49406, 320, 2442]  # CLIP's BPE ids


def test_diffusers_reads_the_same_folder(base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toyworld_model_dir(), torch_dtype=torch.float32)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(["a small blue square", ""], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.unet(latents, 500, pipe.text_encoder(ids)[0]).sample
        ours = base.unet(latents, 500, base.text_encoders[0](ids)[0]).sample
    assert torch.allclose(theirs, ours, atol=1e-5)
    image = pipe(
        "a large red circle", num_inference_steps=3, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np"
    ).images[0]
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_accuracy_on_world_prompts(base):
    result = ev.measure(base, 24, seed=2000)
    assert result.colour >= MIN_COLOUR and result.shape >= MIN_SHAPE, str(result)


def test_cli_reads_toyworld(sd_cli):
    result = sd_cli(["model", "info", "toyworld:"])
    assert result.exit_code == 0, result.output
    assert "sd1" in result.output
    bad = sd_cli(["model", "info", "toyworld:other"])
    assert bad.exit_code != 0 and "toyworld:" in bad.output and "Traceback" not in bad.output


def test_build_is_deterministic(tmp_path):
    from sdcore.testing.toyworld.build import build

    outs = [build(tmp_path / name, vae_steps=2, unet_steps=2, images=32, log=lambda _: None) for name in "ab"]
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):  # fmt: skip
        assert (outs[0] / part).read_bytes() == (outs[1] / part).read_bytes(), part
