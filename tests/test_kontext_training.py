"""FLUX.1 Kontext LoRA training on paired images, end to end: a LoRA trained on (control -> edited) pairs learns
to use the reference (its loss with the right control images beats the loss with another sample's), and
``sdcore train lora --control-dir`` writes a LoRA file that loads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _pairs(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` pairs: a control image of one random colour, its training image the same colour with red and
    blue swapped (a fixed edit the caption does not tell), one caption for all."""
    from PIL import Image

    data, controls = root / "data" / "1_pairs", root / "controls"
    data.mkdir(parents=True)
    controls.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour = rng.integers(0, 256, 3).astype(np.uint8)
        image = np.broadcast_to(colour, (64, 64, 3)).copy()
        Image.fromarray(image).save(controls / f"p{i}.png")
        Image.fromarray(image[:, :, ::-1].copy()).save(data / f"p{i}.png")
        (data / f"p{i}.txt").write_text("swap the colours", encoding="utf-8")
    return data.parent, controls


def test_a_kontext_lora_learns_to_use_the_control_image(tmp_path):
    """After training, the fixed-noise loss at high noise (where the noisy latents hide the image) with each
    sample's own control image is clearly below the loss with the next sample's control image, and below the
    loss before training; before training the two were the same (the reference was not used yet).

    The tiny VAE is made sharp (posterior std ~0) with latents of about unit spread, as a trained Flux VAE's
    are: the random tiny VAE's posterior noise is larger than its mean, so its latents hardly carry the image."""
    from sdcore.models.load import load_model
    from sdcore.testing.conditioning import own_and_shuffled_loss
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    n = 8
    data, controls = _pairs(tmp_path, n)
    bundle = load_model("tiny:flux")
    with torch.no_grad():
        conv = bundle.vae.encoder.conv_out  # channels 16..31 are the posterior's log-variance
        conv.weight[16:].zero_()
        conv.bias[16:].fill_(-30.0)
        conv.weight[:16] *= 16.0
    options = {"data": str(data), "control_dir": str(controls), "max_steps": 400, "lr": 1e-2, "rank": 8, "alpha": 8,
               "batch_size": n, "save_state": False, "cache_latents": True, "cache_text_encoder_outputs": True,
               "t5xxl_max_token_length": 8}  # fmt: skip
    session = TrainSession(LoraMethod(contract_options(LoraMethod, tmp_path, options, family="flux")), bundle=bundle)
    session.setup()

    def losses() -> tuple[float, float]:
        return own_and_shuffled_loss(session, n, "reference_latents")

    before_right, before_shuffled = losses()
    session.run()
    right, shuffled = losses()
    print(f"right controls {before_right:.4f} -> {right:.4f}, shuffled {before_shuffled:.4f} -> {shuffled:.4f}")
    assert abs(before_right - before_shuffled) < 0.005 * before_right  # untrained: the reference hardly matters
    assert right < 0.95 * shuffled, (right, shuffled)  # it learned to read the reference
    assert right < 0.85 * before_right, (before_right, right)


def test_sdcore_train_lora_with_control_dir_writes_a_lora_that_loads(tmp_path, sd_cli, pm):
    """The CLI path: --control-dir on a tiny FLUX.1 (diffusers folder), cached latents; the LoRA file holds
    trained kohya Flux modules and merges into the model."""
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import read_lora

    folder = str(load_model("tiny:flux").save(tmp_path / "tiny-flux", format="diffusers"))
    data, controls = _pairs(tmp_path, 2)
    out = tmp_path / "kontext.safetensors"
    args = ["train", "lora", "--model", folder, "--data", str(data), "--control-dir", str(controls), "--output",
            str(out), "--max-steps", "2", "--resolution", "64", "--min-bucket-reso", "64", "--no-progress",
            "--save-dtype", "fp32", "--seed", "0", "--rank", "2", "--lr", "1e-2", "--cache-latents",
            "--t5xxl-max-token-length", "8"]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    lora = read_lora(out)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in lora.modules
    assert any(float(m.up.abs().max()) > 0 for m in lora.modules.values())  # it trained
    base = load_model(folder)
    before = base.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    apply_lora(base, out, merge=True)
    assert not torch.equal(before, base.transformer.transformer_blocks[0].attn.to_q.weight)

    missing = tmp_path / "few-controls"
    missing.mkdir()
    result = sd_cli([*args[:6], "--control-dir", str(missing), *args[8:]], pm=pm)
    assert result.exit_code != 0
    assert "control images: 2 image(s) without a control image of the same name" in result.output
    assert "Traceback" not in result.output
    assert os.path.getsize(out) > 0
