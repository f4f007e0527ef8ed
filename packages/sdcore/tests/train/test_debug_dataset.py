"""``--debug-dataset`` (kohya's ``--debug_dataset``): the run's own samples, without a model."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_methods import ConvOutMethod, ConvOutOptions
from sdcore.errors import ConfigError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.batches import BatchMaker
from sdcore.train.cli import build_train_command
from sdcore.train.config import load_options
from sdcore.train.debug_dataset import debug_dataset
from sdcore.train.loop import train

TAGS = ["sks", "red circle", "blue square", "green", "big", "small", "shiny", "matte"]


def _dataset(root):
    """Four 96x64 images (wider than their 64x64 bucket: random crops move), two repeats, eight-tag
    captions (shuffles and drops show), one image with an alpha channel (a mask)."""
    data = make_tiny_dataset(root, n=4, size=(96, 64), repeats=2)
    folder = data / "2_sks"
    for i, caption in enumerate(folder.glob("*.txt")):
        caption.write_text(", ".join(TAGS[:4] + TAGS[4 + i % 4 :]), encoding="utf-8")
    return data


def _values(tmp_path, **kw):
    values = {
        "data": str(_dataset(tmp_path / "d")),
        "batch_size": 2,
        "gradient_accumulation": 2,
        "max_steps": 3,
        "resolution": 64,
        "min_bucket_reso": 64,
        "max_bucket_reso": 64,
        "buckets": False,
        "flip": True,
        "random_crop": True,
        "color_aug": True,
        "cache_latents": False,
        "shuffle_caption": True,
        "keep_tokens": 1,
        "tag_dropout": 0.3,
        "caption_dropout": 0.2,
        "seed": 77,
    }
    values.update(kw)
    return values


@pytest.mark.parametrize("text_cache", [False, True])
def test_what_it_shows_is_what_the_trainer_trains_on(tmp_path, monkeypatch, text_cache):
    """The trainer's own batches (captured from BatchMaker) hold the captions, crops, sizes, flips and
    pixels the debug walk printed and wrote, step for step."""
    values = _values(tmp_path, cache_text_encoder_outputs=text_cache)
    shown = debug_dataset(ConvOutMethod(contract_options(ConvOutMethod, tmp_path, values)))
    assert len(shown) == 3 * 2 * 2  # steps x micro-batches x batch size
    assert {s.step for s in shown} == {1, 2, 3}

    seen: list[tuple[int, str, tuple[int, int], tuple[int, int], bool, np.ndarray]] = []
    real_make, real_pixels = BatchMaker.make_batch, BatchMaker.pixels
    pixels: list[np.ndarray] = []

    def pixels_spy(self, entry, view):
        found = real_pixels(self, entry, view)
        pixels.append(found[0])
        return found

    def make_spy(self, refs, *, with_conditioning=True, step=0):
        pixels.clear()
        batch = real_make(self, refs, with_conditioning=with_conditioning, step=step)
        for i, ref in enumerate(refs):
            flip = self.data.view_of(ref).flip
            seen.append((step + 1, batch.captions[i], batch.crop_coords[i], batch.original_sizes[i], flip, pixels[i]))
        return batch

    monkeypatch.setattr(BatchMaker, "make_batch", make_spy)
    monkeypatch.setattr(BatchMaker, "pixels", pixels_spy)
    train(
        ConvOutMethod(contract_options(ConvOutMethod, tmp_path, values, tag="train")), bundle=create_tiny_bundle("sd1")
    )
    assert len(seen) == len(shown)
    for sample, (step, caption, crop, original, flip, array) in zip(shown, seen, strict=True):
        assert (sample.step, sample.caption, sample.crop, sample.original, sample.flip) == (
            step,
            caption,
            crop,
            original,
            flip,
        )
        written = np.asarray(Image.open(sample.image_file)).astype(np.float64)
        want = np.clip(np.rint((array.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255)
        assert np.array_equal(written, want)
    # the options really drew: different crops, both flips, shuffled/dropped captions
    assert len({s.crop for s in shown}) > 1 and {s.flip for s in shown} == {True, False}
    assert len({s.caption for s in shown}) > 4
    assert any(s.color is not None for s in shown)


def test_no_model_is_opened(tmp_path, monkeypatch):
    """A model path that does not exist works, and the loader is never called."""
    import sdcore.train.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loop, "load_bundle", refuse)
    values = _values(tmp_path, model=str(tmp_path / "no-such-model.safetensors"))
    o = contract_options(ConvOutMethod, tmp_path, values)
    lines: list[str] = []
    shown = debug_dataset(ConvOutMethod(o), say=lines.append, steps=2)
    assert len(shown) == 2 * 2 * 2
    folder = tmp_path / "run" / "debug_dataset"
    assert sorted(p.name for p in folder.iterdir()) == sorted(s.image_file.name for s in shown)
    assert any(f'caption: "{shown[0].caption}"' in line for line in lines)
    assert not (tmp_path / "run" / "result.safetensors").exists()


def test_masks_are_written_with_the_image_geometry(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n=1, size=64, repeats=1)
    path = data / "1_sks" / "000.png"
    rgba = np.array(Image.open(path).convert("RGBA"))
    rgba[..., 3] = 255
    rgba[:, :16, 3] = 0  # the left quarter is transparent
    Image.fromarray(rgba, "RGBA").save(path)
    values = {"data": str(data), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64}
    o = contract_options(ConvOutMethod, tmp_path, {**values, "alpha_mask": True, "flip": True, "max_steps": 4})
    shown = debug_dataset(ConvOutMethod(o), steps=4)
    assert {s.flip for s in shown} == {True, False}
    for sample in shown:
        assert sample.mask_file is not None
        mask = np.asarray(Image.open(sample.mask_file))
        transparent = mask[:, 48:] if sample.flip else mask[:, :16]
        assert (transparent == 0).all() and (mask == 0).sum() == 64 * 16


def test_cli_prints_samples_and_trains_nothing(tmp_path):
    command = build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod"))
    out = tmp_path / "out"
    args = [
        "--model",
        str(tmp_path / "missing"),
        "--data",
        str(_dataset(tmp_path / "d")),
        "--output",
        str(out / "r.st"),
    ]
    args += [
        "--resolution",
        "64",
        "--debug-dataset",
        "--debug-dataset-steps",
        "2",
        "--debug-dataset-dir",
        str(tmp_path / "dbg"),
    ]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("step ") >= 2 and 'caption: "' in result.output
    assert len(list((tmp_path / "dbg").glob("*.png"))) == 2  # batch 1, two steps
    assert not out.exists()


def test_kohya_name_and_python_train_refuses(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text('pretrained_model_name_or_path = "x"\ndebug_dataset = true\n', encoding="utf-8")
    o = load_options(ConvOutOptions, cfg, notes=[])
    assert o.debug_dataset is True
    with pytest.raises(ConfigError, match="trains nothing"):
        train(ConvOutMethod(contract_options(ConvOutMethod, tmp_path, {"debug_dataset": True})))


def test_native_resolution_needs_the_model_or_resolution(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {"model": str(tmp_path / "none"), "resolution": 0})
    with pytest.raises(ConfigError, match="give --resolution"):
        debug_dataset(ConvOutMethod(o))


@pytest.mark.parametrize("kind", ["red", "segmentation"])
def test_a_mask_image_is_previewed_as_its_mask_kind_trains_it(tmp_path, kind):
    """A --masked-loss mask image (top left red, top right blue, bottom black): ``mask_kind red`` trains its R
    channel (kohya), so the preview is the red quadrant alone; ``segmentation`` trains 1 wherever a pixel is not
    black (SimpleTuner's ``mask > 0``), so the preview is the whole top half in white, not the channels' grey
    mean (85 for the blue quadrant) the loader hands over before the binarisation."""
    data = make_tiny_dataset(tmp_path / "d", n=1, size=64, repeats=1)
    masks = tmp_path / "masks"
    masks.mkdir()
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[:32, :32] = (255, 0, 0)
    rgb[:32, 32:] = (0, 0, 255)
    Image.fromarray(rgb, "RGB").save(masks / "000.png")
    values = {"data": str(data), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64, "max_steps": 1}
    extra = {"masked_loss": True, "conditioning_data_dir": str(masks), "mask_kind": kind}
    (sample,) = debug_dataset(ConvOutMethod(contract_options(ConvOutMethod, tmp_path, {**values, **extra})), steps=1)
    assert sample.mask_file is not None
    preview = np.asarray(Image.open(sample.mask_file))
    assert preview.shape == (64, 64) and (preview[32:] == 0).all() and (preview[:32, :32] == 255).all()
    assert (preview[:32, 32:] == (255 if kind == "segmentation" else 0)).all()
