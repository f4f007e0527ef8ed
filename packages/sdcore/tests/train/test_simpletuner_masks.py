"""SimpleTuner's mask datasets (``conditioning_type mask``) as sdcore's mask folders with ``--masked-loss``.

The facts are SimpleTuner's (bghira/SimpleTuner bc8e6ab; AGPL-3.0, so nothing of it is copied here):
``documentation/DREAMBOOTH.md`` "Masked loss" (a ``dataset_type conditioning`` dataset with ``conditioning_type
mask`` named by the image dataset's ``conditioning_data``; every image must have a mask),
``helpers/training/collate.py`` (mask datasets' pixels are ``prepare_like`` the training image: its crop and size;
they go to the loss, reference datasets to the model's input; a missing pair stops the step),
``helpers/models/common.py`` ``loss`` (mask: the red channel of the pixels in [-1, 1], ``interpolate(mode="area")``
to the loss's size, ``/ 2 + 0.5``, times the loss, the plain mean; segmentation: the mean of the channels, binarised
``> 0``, with probability ``masked_loss_probability``; the flow-matching families go through the same ``loss``) and
``helpers/multiaspect/sampler.py`` (``get_conditioning_sample``: the image's file name in the mask folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdcore.errors import ConfigError
from sdcore.testing.datasets import make_tiny_dataset, write_inverted_controls


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _masks(images: Path, folder: Path, fill: object = "left") -> Path:
    """A mask per image under its file name: ``left``: the left half white, else a constant grey level, or an
    ``[H, W, 3]`` array."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(images.glob("*.png")):
        if isinstance(fill, np.ndarray):
            pixels = fill
        else:
            pixels = np.zeros((64, 64, 3), dtype=np.uint8)
            if fill == "left":
                pixels[:, :32] = 255
            else:
                pixels[:] = int(fill)  # type: ignore[call-overload]
        Image.fromarray(pixels).save(folder / image.name)
    return folder


def _run(tmp_path: Path, *, family: str = "sd1x", mask: dict | None = None, **extra: object) -> tuple[Path, Path, Path]:
    """An SD 1.x LoRA config (DREAMBOOTH.md's masked-loss layout) whose image dataset names a mask dataset, beside a
    second image dataset without one: returns the config, the images' and the masks' folders."""
    images = make_tiny_dataset(tmp_path / "images", n=3, size=64) / "1_sks"
    other = make_tiny_dataset(tmp_path / "other", n=2, size=64) / "1_sks"
    masks = _masks(images, tmp_path / "masks")
    backend = _write(
        tmp_path / "multidatabackend.json",
        [
            {"id": "subject", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
             "resolution": 64, "resolution_type": "pixel_area", "conditioning_data": "subject-masks"},
            {"id": "subject-masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
             "instance_data_dir": str(masks), **(mask or {})},
            {"id": "style", "type": "local", "instance_data_dir": str(other), "caption_strategy": "textfile",
             "resolution": 64, "resolution_type": "pixel_area"},
            {"id": "embeds", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "te"},
        ],
    )  # fmt: skip
    config = {
        "model_family": family, "model_type": "lora", "pretrained_model_name_or_path": {"sd1x": "tiny:sd1"}.get(family, f"tiny:{family}"),
        "data_backend_config": str(backend), "output_dir": str(tmp_path / "out"), "max_train_steps": 2,
        "lora_rank": 4, "lora_dropout": 0, "learning_rate": 1e-3, "train_batch_size": 1, "seed": 7,
        "mixed_precision": "no", "gradient_checkpointing": False, "resolution": 64, "resolution_type": "pixel_area",
        **extra,
    }  # fmt: skip
    return _write(tmp_path / "config.json", config), images, masks


def _backends(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "multidatabackend.json").read_text())


def _rewrite(tmp_path: Path, backends: list[dict]) -> None:
    _write(tmp_path / "multidatabackend.json", backends)


def _lora(path: Path, notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=[] if notes is None else notes)


def _cli(*args: str):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return CliRunner().invoke(build_cli(get_plugin_manager()), ["train", "lora", *args, "--no-progress"])


def test_a_mask_dataset_is_its_image_datasets_mask_folder_with_masked_loss(tmp_path):
    """The image dataset's subset reads the mask dataset's folder as its conditioning_data_dir, each image paired
    with the mask of its file name; the run has --masked-loss; the dataset without a mask keeps none (SimpleTuner's
    batches of it carry no mask); the mask dataset trains nothing itself."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.train.data import has_dataset_mask, mask_image_path

    path, images, masks = _run(tmp_path)
    o = _lora(path)
    assert o.masked_loss is True
    assert (o.masked_loss_unmasked_weight, o.masked_loss_normalize, o.alpha_mask) == (0.0, False, False)
    index = scan_dataset(o)
    assert len(index.entries) == 5
    by_dir = {e.path: e for e in index.entries}
    subject = [e for p, e in by_dir.items() if p.parent == images]
    assert {e.path.name: mask_image_path(e) for e in subject} == {f"{i:03d}.png": masks / f"{i:03d}.png"
                                                                  for i in range(3)}  # fmt: skip
    assert all(e.subset.control_dir is None for e in index.entries)
    others = [e for p, e in by_dir.items() if p.parent != images]
    assert len(others) == 2 and not any(has_dataset_mask(e) for e in others)
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "5 training images" in result.output


def test_without_a_mask_dataset_the_run_has_no_masked_loss(tmp_path):
    path, _, _ = _run(tmp_path)
    backends = _backends(tmp_path)
    backends[0].pop("conditioning_data")
    _rewrite(tmp_path, backends)
    notes: list[str] = []
    assert _lora(path, notes).masked_loss is False
    assert any("(subject-masks): a conditioning dataset no training dataset names" in n for n in notes), notes


def test_sdcores_mask_weighs_the_loss_as_simpletuners_formula(tmp_path):
    """sdcore's runtime mask (load_mask, mask_to_latent, clamp_unmasked and weigh_by_mask with the translated
    options, as BatchMaker.sample_mask and the step use them) against models/common.py's formula written out:
    ToTensor + Normalize(0.5, 0.5) pixels, the red channel, area interpolation to the latent size, / 2 + 0.5, the
    loss times the mask and the mean over every element. The mask's channels differ, so another channel, a
    greyscale, a binarisation or a division by the mask's area would give other numbers."""
    import torch
    import torch.nn.functional as F
    from sdcore.train.data import (
        build_train_data,
        clamp_unmasked,
        load_mask,
        mask_filter,
        mask_to_latent,
        normalize_mask_area,
        weigh_by_mask,
    )

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path, images, masks = _run(tmp_path)
    _masks(images, masks, pixels)
    o = _lora(path)
    data = build_train_data(o, balance_class=False)
    i = next(k for k, e in enumerate(data.entries) if e.path == images / "001.png")
    entry, assignment = data.entries[i], data.assignments[i]
    assert (assignment.bucket, assignment.resized, assignment.crop) == ((64, 64), (64, 64), (0, 0))  # no resize or crop
    latent = (8, 8)
    loss = torch.rand(1, 4, *latent, generator=torch.Generator().manual_seed(0))

    mask = mask_to_latent(load_mask(entry, assignment, flip=False), latent, mask_filter(entry))
    mask = clamp_unmasked(mask, o.masked_loss_unmasked_weight)
    if o.masked_loss_normalize:
        mask = normalize_mask_area(mask)
    ours = weigh_by_mask(loss, mask[None]).mean()

    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0  # ToTensor
    tensor = (tensor - 0.5) / 0.5  # Normalize([0.5], [0.5]): SimpleTuner's conditioning_pixel_values
    red = F.interpolate(tensor[:, 0].unsqueeze(1), size=latent, mode="area") / 2 + 0.5
    theirs = (loss * red).mean()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    grey = F.interpolate(tensor.mean(1, keepdim=True), size=latent, mode="area") / 2 + 0.5
    assert abs(float((loss * grey).mean()) - float(theirs)) > 1e-3  # the channel matters for these pixels


def _ups(weights: dict) -> list:
    """The LoRA's up (B) matrices, zero when training starts (kohya's lora_up names for SD 1.x)."""
    return [t for k, t in weights.items() if "lora_up" in k or "lora_B" in k]


def test_a_run_through_the_config_trains_and_black_masks_learn_nothing(tmp_path):
    """The translated run trains (two steps, the LoRA saved where SimpleTuner saves it, its up matrices moved); with every
    image's mask black (SimpleTuner: the loss times 0) and only that dataset, the loss and its gradient are zero, so
    the up matrices (zero at the start; weight decay keeps zero at zero) do not move."""
    from safetensors.torch import load_file

    path, images, masks = _run(tmp_path)
    run = _cli("--config", str(path))
    assert run.exit_code == 0, run.output
    weights = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(float(t.abs().max()) > 0 for t in _ups(weights))

    _masks(images, masks, 0)
    backends = _backends(tmp_path)
    del backends[2]  # the dataset without masks
    _rewrite(tmp_path, backends)
    config = json.loads(path.read_text())
    config["output_dir"] = str(tmp_path / "black")
    _write(path, config)
    run = _cli("--config", str(path))
    assert run.exit_code == 0, run.output
    weights = load_file(str(tmp_path / "black" / "pytorch_lora_weights.safetensors"))
    ups = _ups(weights)
    assert ups and all(float(t.abs().max()) == 0 for t in ups)


def test_missing_masks_and_a_missing_mask_folder_are_reported_together_before_loading(tmp_path):
    """DREAMBOOTH.md: every image must have a mask (collate.py stops the step without one); a mask folder that is
    not there. Both in one pre-flight, before any model loads."""
    path, images, masks = _run(tmp_path)
    (masks / "001.png").unlink()
    backends = _backends(tmp_path)
    backends[2]["conditioning_data"] = "style-masks"
    backends.insert(3, dict(backends[1], id="style-masks", instance_data_dir=str(tmp_path / "nowhere")))
    _rewrite(tmp_path, backends)
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    assert (
        "--masked-loss: 1 image(s) without a mask image of the same name in their conditioning_data_dir: "
        f"{images / '001.png'}" in result.output
    )
    assert f"conditioning_data_dir {tmp_path / 'nowhere'}: not a folder" in result.output


def test_mask_files_no_image_pairs_with_are_left_alone_as_simpletuner_does(tmp_path):
    """SimpleTuner looks each image's mask up by name and never reads the others (kohya refuses them)."""
    path, _, masks = _run(tmp_path)
    Image.new("RGB", (64, 64), "white").save(masks / "spare.png")
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output


def test_a_mask_sdcore_would_pair_by_stem_but_simpletuner_by_name_is_refused(tmp_path):
    """SimpleTuner joins the image's file name (extension included) to the mask folder: 000.png finds no 000.jpg."""
    path, _, masks = _run(tmp_path)
    Image.open(masks / "000.png").save(masks / "000.jpg")
    (masks / "000.png").unlink()
    with pytest.raises(ConfigError, match=r"sdcore pairs by file stem and would take another file: 000\.png -> 000"):
        _lora(path)


def test_masked_loss_probability_is_a_note_for_masks(tmp_path):
    """common.py draws masked_loss_probability for segmentation masks only: a mask weighs every step."""
    path, _, _ = _run(tmp_path, masked_loss_probability=0.5)
    notes: list[str] = []
    assert _lora(path, notes).masked_loss is True
    assert any("masked_loss_probability 0.5: SimpleTuner draws it for segmentation masks only" in n for n in notes)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_families_read_the_mask_the_same_way(tmp_path, family):
    """SD3 and FLUX.1 compute the same common.py loss with the mask: the translation is the same."""
    from sdcore.data.dataset import scan_dataset

    path, images, masks = _run(tmp_path, family=family)
    o = _lora(path)
    assert o.masked_loss is True
    assert {e.subset.conditioning_data_dir for e in scan_dataset(o).entries if e.path.parent == images} == {masks}
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output


def test_several_masks_are_refused_by_name_a_segmentation_beside_a_mask_too(tmp_path):
    """sdcore weighs each image's loss by one mask image; SimpleTuner's collate.py picks one loss-mask type per
    batch (mask before segmentation) and stacks both datasets' pixels."""
    path, _, _ = _run(tmp_path)
    backends = _backends(tmp_path)
    backends[0]["conditioning_data"] = ["subject-masks", "more-masks"]
    backends.append(dict(backends[1], id="more-masks", conditioning_type="segmentation"))
    _rewrite(tmp_path, backends)
    with pytest.raises(ConfigError, match=r"several mask datasets \(subject-masks, more-masks\)"):
        _lora(path)


def _kontext(tmp_path: Path, sampling: str) -> tuple[Path, Path, Path, Path]:
    """A FLUX.1 Kontext config whose edit dataset names a reference and a mask dataset."""
    path, images, masks = _run(tmp_path, family="flux", model_flavour="kontext",
                               conditioning_multidataset_sampling=sampling)  # fmt: skip
    refs = write_inverted_controls(images, tmp_path / "refs")
    backends = _backends(tmp_path)
    del backends[2]  # Kontext pairs every image
    backends[0]["conditioning_data"] = ["references", "subject-masks"]
    backends.insert(2, {"id": "references", "type": "local", "dataset_type": "conditioning",
                        "conditioning_type": "reference_strict", "instance_data_dir": str(refs)})  # fmt: skip
    _rewrite(tmp_path, backends)
    return path, images, masks, refs


def test_a_kontext_run_takes_a_reference_and_a_loss_mask_with_combined_sampling(tmp_path):
    """collate.py: with combined sampling each image gets both; the reference feeds the model (Kontext's
    conditioning latents), the mask the loss. sdcore: the control folder and the mask folder of one subset; two
    steps train."""
    from sdcore.data.dataset import scan_dataset

    path, _, masks, refs = _kontext(tmp_path, "combined")
    o = _lora(path)
    assert o.masked_loss is True
    index = scan_dataset(o)
    assert {(e.subset.control_dir, e.subset.conditioning_data_dir) for e in index.entries} == {(refs, masks)}
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "FLUX.1 Kontext: every sample paired with its control image" in result.output
    run = _cli("--config", str(path))
    assert run.exit_code == 0, run.output
    from safetensors.torch import load_file

    assert any(
        float(t.abs().max()) > 0 for t in _ups(load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")))
    )


def test_kontext_masks_sdcore_cannot_reproduce_are_refused(tmp_path):
    """Random sampling takes the reference or the mask per image and epoch; a mask alone leaves SimpleTuner's
    Kontext model training text-to-image steps."""
    path, _, _, _ = _kontext(tmp_path, "random")
    with pytest.raises(ConfigError, match="a reference and a mask dataset with conditioning_multidataset_sampling"):
        _lora(path)
    backends = _backends(tmp_path)
    backends[0]["conditioning_data"] = "subject-masks"
    _rewrite(tmp_path, backends)
    with pytest.raises(ConfigError) as caught:
        _lora(path)
    text = str(caught.value)
    assert "model_flavour kontext with a loss mask and no reference image" in text
    assert "SimpleTuner needs a conditioning dataset" not in text


def test_a_reference_dataset_on_a_run_that_is_not_kontext_stays_refused(tmp_path):
    path, _, _ = _run(tmp_path)
    backends = _backends(tmp_path)
    backends[1]["conditioning_type"] = "reference_strict"
    _rewrite(tmp_path, backends)
    with pytest.raises(ConfigError, match=r"sdcore reads reference conditioning datasets as FLUX\.1 Kontext's"):
        _lora(path)


def _nest(images: Path, name: str = "001.png") -> Path:
    """Move one training image (and its caption) into a sub-folder ``sub`` of its dataset."""
    sub = images / "sub"
    sub.mkdir()
    (images / name).rename(sub / name)
    caption = (images / name).with_suffix(".txt")
    if caption.is_file():
        caption.rename((sub / name).with_suffix(".txt"))
    return sub / name


def test_an_image_in_a_sub_folder_pairs_with_the_mask_of_its_name_at_the_mask_folders_top(tmp_path):
    """sampler.py get_conditioning_sample: the image's path after instance_data_dir ("/sub/001.png") reads as
    absolute, so only its file name is joined to the mask folder: masks/001.png, as sdcore's stem search."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.train.data import mask_image_path

    path, images, masks = _run(tmp_path)
    nested = _nest(images)
    entry = next(e for e in scan_dataset(_lora(path)).entries if e.path == nested)
    assert mask_image_path(entry) == masks / "001.png"
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output


def test_an_instance_data_dir_ending_in_a_slash_pairs_sub_folders_by_their_path(tmp_path):
    """With instance_data_dir ".../images/" the path after it ("sub/001.png") is relative: SimpleTuner reads
    masks/sub/001.png, which sdcore's search at the folder's top does not find: a problem naming the file, not
    the pre-flight's "without a mask"."""
    path, images, masks = _run(tmp_path)
    _nest(images)
    (masks / "sub").mkdir()
    (masks / "001.png").rename(masks / "sub" / "001.png")
    backends = _backends(tmp_path)
    backends[0]["instance_data_dir"] = str(images) + "/"
    _rewrite(tmp_path, backends)
    with pytest.raises(ConfigError, match=r"SimpleTuner reads .*sub/001\.png for sub/001\.png"):
        _lora(path)


def test_a_mask_of_an_extension_sdcores_mask_search_skips_is_named(tmp_path):
    """SimpleTuner reads a training image's mask under the image's own file name, a .tif too; sdcore's mask search
    (kohya's extensions) does not read .tif: the problem names the file instead of calling it missing."""
    path, images, masks = _run(tmp_path)
    Image.open(images / "000.png").save(images / "005.tif")
    Image.open(masks / "000.png").save(masks / "005.tif")
    with pytest.raises(ConfigError, match=r"SimpleTuner reads .*005\.tif for 005\.tif"):
        _lora(path)
