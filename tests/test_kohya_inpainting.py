"""kohya sd-scripts' ``--train_inpainting`` (v0.10.4+, PRs #2309/#2318) as ``--inpainting-masks random``: the
random mask rule (kohya's ``mask_generator.random_mask`` draw order, kinds, shares and sizes, rewritten here from
its documented behaviour), the batch conditioning built from those masks, the kohya TOML and kohya_ss GUI
imports (latent caching refused as kohya refuses it, a plain model refused in one line), and `sdcore train lora`
end to end on a tiny SD1 inpainting model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kohya_draw(seed: int) -> tuple[str, int, int, float, str | None, int]:
    """kohya's random_mask decisions for ``seed``: two 31-bit seeds, the kind (cloud 0.40, polygon 0.35, shape
    0.25), a cloud's share uniform(max(0.05, 0.2 - 0.1), min(0.4, 0.2 + 0.1)) and a 0.33 chance of a partner
    (polygon or shape), or randint(1, max(1, 1 * 2)) polygons."""
    rng = random.Random(seed)
    noise_seed, shape_seed = rng.randint(0, 2**31), rng.randint(0, 2**31)
    kind = rng.choices(["cloud", "polygon", "shape"], weights=[0.40, 0.35, 0.25])[0]
    share, partner, count = 0.0, None, 1
    if kind == "cloud":
        share = rng.uniform(0.1, 0.3)
        if rng.random() < 0.33:
            partner = rng.choice(["polygon", "shape"])
    elif kind == "polygon":
        count = rng.randint(1, 2)
    return kind, noise_seed, shape_seed, share, partner, count


def test_the_draw_follows_kohyas_order_and_odds():
    from sdcore.train.random_masks import plan

    n = 2000
    plans = [plan(seed) for seed in range(n)]
    for seed, p in enumerate(plans):
        assert (p.kind, p.noise_seed, p.shape_seed, p.share, p.partner, p.polygons) == _kohya_draw(seed)
    counts = {k: sum(p.kind == k for p in plans) for k in ("cloud", "polygon", "shape")}
    for kind, weight in (("cloud", 0.40), ("polygon", 0.35), ("shape", 0.25)):
        assert abs(counts[kind] / n - weight) < 4 * math.sqrt(weight * (1 - weight) / n), counts
    clouds = [p for p in plans if p.kind == "cloud"]
    joined = sum(p.partner is not None for p in clouds) / len(clouds)
    assert abs(joined - 0.33) < 4 * math.sqrt(0.33 * 0.67 / len(clouds))
    assert all(0.1 <= p.share <= 0.3 for p in clouds)
    assert {p.polygons for p in plans if p.kind == "polygon"} == {1, 2}


def test_each_kind_draws_the_pixels_its_rule_says():
    from sdcore.train.random_masks import cloud, polygons, random_mask, shape, shape_box

    w, h = 96, 64
    for seed in range(20):
        share = 0.1 + 0.01 * seed
        m = cloud(w, h, share, seed)
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert share - 1 / (w * h) <= m.mean() < share + 0.02  # the 1 - share quantile cut (one pixel of slack)
        # the shape: exactly its (inclusive) box for a rectangle, inside it for an ellipse; the box's sides in
        # [int(side * sqrt 0.1), int(side * sqrt 0.6)]
        (x1, y1, x2, y2), ellipse = shape_box(w, h, seed)
        assert int(w * math.sqrt(0.1)) <= x2 - x1 <= int(w * math.sqrt(0.6))
        assert int(h * math.sqrt(0.1)) <= y2 - y1 <= int(h * math.sqrt(0.6))
        s = shape(w, h, seed)
        ys, xs = np.nonzero(s)
        assert xs.min() >= x1 and xs.max() <= x2 and ys.min() >= y1 and ys.max() <= y2
        if not ellipse:
            assert s.sum() == (x2 - x1 + 1) * (y2 - y1 + 1)
        else:  # an ellipse fills about pi/4 of its box
            assert 0.7 < s.sum() / ((x2 - x1 + 1) * (y2 - y1 + 1)) < 0.85
        # a polygon lies within its largest circle: at most 0.6 of the area (plus rasterised edges)
        assert 0 < polygons(w, h, 1, seed).mean() <= 0.6 + 0.05
        assert np.array_equal(random_mask(w, h, seed), random_mask(w, h, seed))  # reproducible
    assert len({random_mask(w, h, s).tobytes() for s in range(20)}) == 20  # and new for each seed


def test_the_sample_mask_is_one_blob_of_about_a_fifth():
    from sdcore.train.random_masks import wobbly_ellipse

    shares = [wobbly_ellipse(128, 128, seed).mean() for seed in range(30)]
    assert 0.12 < float(np.mean(shares)) < 0.3
    assert np.array_equal(wobbly_ellipse(64, 64, 7), wobbly_ellipse(64, 64, 7))


def _sd1_inpainting(tmp_path: Path) -> Path:
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1", variant="inpainting")  # conv_in takes 9 channels
    return Path(bundle.save(tmp_path / "sd1-inpainting.safetensors"))


def test_the_conditioning_is_the_random_mask_and_its_masked_image(tmp_path):
    """Each sample's mask input is its own draw's random mask shrunk to latent size, and its masked-image latents
    the VAE mean of its pixels with that hole blanked; another epoch's draw of the same image gets another mask."""
    from sdcore.models.load import load_model
    from sdcore.testing.contract import contract_options
    from sdcore.train.data import SampleRef
    from sdcore.train.inpainting import encode_mean, latent_mask, masked_pixels
    from sdcore.train.loop import TrainSession
    from sdcore.train.random_masks import random_mask
    from sdplugin_lora.method import LoraMethod

    bundle = load_model(_sd1_inpainting(tmp_path))
    o = contract_options(LoraMethod, tmp_path, {"inpainting_masks": "random", "cache_latents": False, "seed": 7})
    session = TrainSession(LoraMethod(o), bundle=bundle)
    session.setup()
    refs = [SampleRef(0, 0, 0), SampleRef(1, 0, 0), SampleRef(0, 0, 1)]
    batch = session.make_batch(refs)
    assert batch.inpainting_mask is not None and batch.masked_latents is not None
    h, w = batch.latents.shape[-2:]
    maker = session.batches
    for i, ref in enumerate(refs):
        pixel = random_mask(w * 8, h * 8, ref.seed(7, "inpainting-mask"))
        assert torch.equal(batch.inpainting_mask[i].cpu(), latent_mask(pixel, (h, w), "unet"))
        pixels, _, _ = maker.pixels(ref.entry, maker.data.view_of(ref))
        expected = bundle.normalize_latents(encode_mean(bundle, masked_pixels(torch.from_numpy(pixels), pixel)[None]))
        assert torch.allclose(batch.masked_latents[i].cpu(), expected[0], atol=1e-5)
    assert not torch.equal(batch.inpainting_mask[0], batch.inpainting_mask[2])  # a new mask for each draw
    again = session.make_batch(refs)
    assert torch.equal(again.inpainting_mask, batch.inpainting_mask)  # reproducible from the run's seed


def _load(path: Path, cls_name: str = "lora", notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=notes if notes is not None else [])


def test_kohya_toml_and_gui_train_inpainting_import(tmp_path):
    model = _sd1_inpainting(tmp_path)
    toml = tmp_path / "kohya.toml"
    toml.write_text(f'pretrained_model_name_or_path = "{model}"\nnetwork_dim = 4\ntrain_inpainting = true\n')
    notes: list[str] = []
    o = _load(toml, notes=notes)
    assert (o.inpainting_masks, o.cache_latents) == ("random", False)  # kohya does not cache by default
    # the note gives the reason that applies here (it named only random_crop/color_aug/face_crop_aug_range)
    assert any("latents are not cached unless --cache_latents" in n and "train_inpainting" in n for n in notes)
    toml.write_text(f'pretrained_model_name_or_path = "{model}"\nnetwork_dim = 4\ntrain_inpainting = false\n')
    assert _load(toml).inpainting_masks == "dataset"
    from sdcore.train.kohya import flag_names, is_kohya_name

    assert is_kohya_name("train_inpainting") and "train_inpainting" in flag_names()
    # the kohya_ss GUI (#3527) never passes --cache_latents with --train_inpainting
    gui = {"LoRA_type": "Standard", "network_dim": 8, "network_alpha": 4, "learning_rate": 1e-4,
           "optimizer": "AdamW", "max_resolution": "512,512", "lr_warmup": 0, "train_inpainting": True,
           "cache_latents": True, "cache_latents_to_disk": True, "pretrained_model_name_or_path": str(model)}  # fmt: skip
    path = tmp_path / "gui.json"
    path.write_text(json.dumps(gui), encoding="utf-8")
    notes = []
    o = _load(path, notes=notes)
    assert (o.inpainting_masks, o.cache_latents, o.cache_latents_to_disk) == ("random", False, False)
    assert any("cache_latents and cache_latents_to_disk left out" in n for n in notes)
    path.write_text(json.dumps({**gui, "train_inpainting": False}), encoding="utf-8")
    o = _load(path)
    assert (o.inpainting_masks, o.cache_latents) == ("dataset", True)


def _colours(root: Path, n: int) -> Path:
    from PIL import Image

    data = root / "data" / "1_colours"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (64, 64, 3)).copy()).save(
            data / f"c{i}.png"
        )
        (data / f"c{i}.txt").write_text("a colour", encoding="utf-8")
    return data.parent


def test_sdcore_train_lora_with_kohyas_random_masks(tmp_path, sd_cli, pm):
    """`sdcore train lora --inpainting-masks random` trains on a tiny SD1 inpainting model; a kohya TOML with
    train_inpainting and cache_latents stops before loading with kohya's refusal, and one on a plain model with
    one line saying it has no mask input."""
    from sdplugin_lora.format import read_lora

    model = _sd1_inpainting(tmp_path)
    data = _colours(tmp_path, 2)
    out = tmp_path / "inpaint.safetensors"
    args = ["train", "lora", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "2",
            "--resolution", "64", "--min-bucket-reso", "64", "--no-progress", "--save-dtype", "fp32", "--seed", "0",
            "--rank", "2", "--lr", "1e-2", "--inpainting-masks", "random", "--no-cache-latents"]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    lora = read_lora(out)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in lora.modules
    assert any(float(m.up.abs().max()) > 0 for m in lora.modules.values())
    toml = tmp_path / "kohya.toml"
    base = (f'pretrained_model_name_or_path = "{model}"\ntrain_data_dir = "{data}"\noutput_dir = "{tmp_path}"\n'
            'output_name = "k"\nresolution = "64,64"\nnetwork_module = "networks.lora"\nnetwork_dim = 2\n'
            'max_train_steps = 1\ntrain_inpainting = true\n')  # fmt: skip
    toml.write_text(base + "cache_latents = true\n", encoding="utf-8")
    result = sd_cli(["train", "lora", "--config", str(toml), "--no-progress"], pm=pm)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "latents cannot be cached (kohya refuses --cache_latents with --train_inpainting too)" in result.output
    toml.write_text(base.replace(str(model), "tiny:sd1"), encoding="utf-8")
    result = sd_cli(["train", "lora", "--config", str(toml), "--no-progress"], pm=pm)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--inpainting-masks random (kohya's --train_inpainting) trains an inpainting model's mask input" in (
        result.output
    )
