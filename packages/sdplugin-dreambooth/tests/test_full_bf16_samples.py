"""``--full-bf16`` with ``--sample-prompts``: the full fine-tune's denoiser weights are bf16 while the frozen text
encoders and the VAE stay fp32 (a DreamBooth keeps its frozen parts at full precision), so a render fed the fp32
text encodings, latents and timestep embeddings to bf16 layers and stopped ("mat1 and mat2 must have the same
dtype"). The renders now autocast to the trained weights' dtype, as the training step does and kohya's
sample_images does (``accelerator.autocast()``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sdcore.plugins import get_plugin_manager
from sdcore.testing.datasets import make_tiny_dataset

#: family -> extra options: FLUX.1 as the reviewer ran it (kohya's flux_train.py shape: block swap needs the fused
#: backward pass with Adafactor), SD1 with its text encoder trained (bf16 encodings into the fp32 VAE's decode)
RUNS = {
    "flux": ["--blocks-to-swap", "1", "--fused-backward-pass", "--optimizer", "adafactor"],
    "sd1": ["--train-text-encoder"],
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", sorted(RUNS))
def test_full_bf16_renders_its_samples_at_first_each_step_and_at_the_end(tmp_path: Path, sd_cli, family):
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 2 --d 3\n")
    out = tmp_path / "out" / "ft.safetensors"
    args = ["train", "dreambooth", "--model", f"tiny:{family}", "--data", str(data), "--output", str(out),
            "--max-steps", "2", "--resolution", "64", "--no-progress", "--seed", "0",
            "--mixed-precision", "bf16", "--full-bf16", "--sample-prompts", str(prompts), "--sample-every", "1",
            "--sample-at-first", *RUNS[family]]  # fmt: skip
    result = sd_cli(args, pm=get_plugin_manager())
    assert result.exit_code == 0, result.output + repr(result.exception)
    # kohya's names: before the first step (--sample-at-first: epoch 0's), steps 1 and 2 (the end is step 2's)
    named = {p.stem.split("_")[1]: p for p in (out.parent / "sample").glob("*.png")}
    assert sorted(named) == ["000001", "000002", "e000000"], sorted(named)
    images = [named["e000000"], named["000001"], named["000002"]]
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in images]
    for path, array in zip(images, arrays, strict=True):
        assert array.shape == (64, 64, 3) and array.std() > 5.0, path  # a picture, not a NaN-black square
    # the weights trained between the renders, and the renders use them (same seed, same prompt)
    assert np.abs(arrays[0] - arrays[2]).max() > 0


def test_the_renders_autocast_to_the_trained_weights_dtype_and_the_vae_keeps_its_own():
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.options import TrainOptions
    from sdcore.train.sampling import trained_weights_compute

    bundle = create_tiny_bundle("sd1")
    vae = bundle.vae
    latents = torch.randn(1, int(vae.config.latent_channels), 8, 8, generator=torch.Generator().manual_seed(0))
    latents = latents.to(torch.bfloat16)  # what a bf16 denoiser hands the VAE
    with torch.no_grad():
        want = vae.decode(latents.float()).sample  # the fp32 VAE on those latents, no autocast

    def seen(**kw) -> tuple[bool, torch.dtype, torch.Tensor | None]:
        options = TrainOptions(model="m", data="d", output="o", mixed_precision="bf16", **kw)
        with torch.no_grad(), trained_weights_compute(bundle, options, torch.device("cpu")):
            decoded = vae.decode(latents).sample if kw else None
            return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), decoded

    enabled, dtype, decoded = seen(full_bf16=True)
    assert (enabled, dtype) == (True, torch.bfloat16)
    assert decoded is not None and decoded.dtype == torch.float32 and torch.equal(decoded, want)
    assert "decode" not in vae.__dict__ and "encode" not in vae.__dict__  # the class's methods again
    assert seen()[0] is False  # mixed precision alone: the weights' own dtypes, as sdcore generate computes
