"""SimpleTuner's segmentation datasets (``conditioning_type segmentation``) and ``masked_loss_probability``.

The facts are SimpleTuner's (bghira/SimpleTuner; AGPL-3.0, so nothing of it is copied here): ``helpers/models/common.py``
``loss``: for a batch whose loss-mask type is segmentation, ``if random.random() < masked_loss_probability`` the
conditioning pixels (``ToTensor`` + ``Normalize(0.5, 0.5)``: [-1, 1]) are summed over the three channels and
divided by 3, area-interpolated to the loss's size, ``/ 2 + 0.5``, then ``> 0`` as a float multiplies the loss,
followed by the plain mean; one draw per loss call; a ``mask`` dataset ignores the probability.
``helpers/training/collate.py``: segmentation pixels are ``prepare_like`` the training image, as a mask's.
The formula is written out below, in the tests, as it reads there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_simpletuner_masks import _backends, _cli, _lora, _masks, _rewrite, _run, _ups, _write


def _segmentation(tmp_path: Path, **extra: object) -> tuple[Path, Path, Path]:
    """The masks test's config (an image dataset with a mask dataset, a second one without) with the mask dataset
    a segmentation dataset."""
    return _run(tmp_path, mask={"conditioning_type": "segmentation"}, **extra)


def _maker(options):
    """The run's batch maker over its data, without a model (the masks need none)."""
    from sdcore.train.batches import BatchMaker
    from sdcore.train.data import build_train_data
    from sdplugin_lora.method import LoraMethod

    method = LoraMethod(options)
    caps = method.capabilities()
    data = build_train_data(options, balance_class=caps.balance_class)
    return BatchMaker(data, method, caps, options, None, "cpu"), data


def _colourful() -> np.ndarray:
    """A 64x64 segmentation mask whose channels differ: random colours, pure black pixels among them, the
    latent cells (8x8 blocks) of the top row all black, and four cells of the second row black but for one pixel
    a step above black in one channel (its cell's area mean is a hair above black: SimpleTuner's ``> 0`` keeps
    it), one cell black but for a bright pixel."""
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    pixels[rng.random((64, 64)) < 0.2] = 0  # scattered pure black pixels
    pixels[:8] = 0  # the top row of cells: black
    pixels[8:16] = 0
    pixels[9, 3] = (1, 0, 0)
    pixels[12, 13] = (0, 1, 0)
    pixels[15, 22] = (0, 0, 1)
    pixels[8, 31] = (1, 1, 1)
    pixels[10, 36] = (200, 30, 90)
    return pixels


def _simpletuners_loss(pixels: np.ndarray, loss, *, masked: bool):
    """models/common.py ``loss`` for a segmentation batch of one, written out."""
    import torch
    import torch.nn.functional as F

    if not masked:
        return loss.mean(dim=list(range(1, loss.ndim))).mean()
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0  # ToTensor
    tensor = (tensor - 0.5) / 0.5  # Normalize([0.5], [0.5])
    mask = torch.sum(tensor, dim=1, keepdim=True) / 3
    mask = F.interpolate(mask, size=loss.shape[2:], mode="area")
    mask = mask / 2 + 0.5
    mask = (mask > 0).to(dtype=loss.dtype)
    weighted = loss * mask
    return weighted.mean(dim=list(range(1, weighted.ndim))).mean(), mask


def test_a_segmentation_dataset_is_a_segmentation_mask_folder_with_its_probability(tmp_path):
    """The image dataset's subset reads the segmentation dataset's folder as its conditioning_data_dir with
    mask_kind segmentation; the run has --masked-loss and SimpleTuner's masked_loss_probability; the other dataset
    has no mask."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.train.data import has_dataset_mask, is_segmentation

    path, images, masks = _segmentation(tmp_path, masked_loss_probability=0.25)
    notes: list[str] = []
    o = _lora(path, notes)
    assert (o.masked_loss, o.masked_loss_probability, o.mask_kind) == (True, 0.25, "red")
    assert not any("masked_loss_probability" in n for n in notes), notes
    entries = scan_dataset(o).entries
    subject = [e for e in entries if e.path.parent == images]
    assert len(subject) == 3
    assert all(e.subset.conditioning_data_dir == masks and e.subset.mask_kind == "segmentation" for e in subject)
    assert all(is_segmentation(e) for e in subject)
    others = [e for e in entries if e.path.parent != images]
    assert len(others) == 2 and not any(has_dataset_mask(e) or is_segmentation(e) for e in others)
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output


def test_the_segmentation_loss_is_simpletuners_formula(tmp_path):
    """The runtime's masks (BatchMaker.loss_masks, as the step gets them) times a loss map, the plain mean, against
    common.py's formula written out, on a mask whose channels differ, with pure black pixels and near-black
    cells that area interpolation makes fractional. The red channel alone, the grey mean without the binarisation,
    or a binarisation before the area mean would give other masks."""
    import torch
    import torch.nn.functional as F
    from sdcore.train.data import SampleRef, weigh_by_mask

    pixels = _colourful()
    path, images, masks = _segmentation(tmp_path)
    _masks(images, masks, pixels)
    maker, data = _maker(_lora(path))
    i = next(k for k, e in enumerate(data.entries) if e.path == images / "001.png")
    assert (data.assignments[i].bucket, data.assignments[i].resized) == ((64, 64), (64, 64))
    ref = SampleRef(i, 0, 0)
    assert maker.data.view_of(ref).flip is False
    latent = (8, 8)
    ours = maker.loss_masks([ref], latent)
    loss = torch.rand(1, 4, *latent, generator=torch.Generator().manual_seed(0))
    theirs, their_mask = _simpletuners_loss(pixels, loss, masked=True)
    assert torch.equal(ours, their_mask)
    assert float(weigh_by_mask(loss, ours).mean()) == pytest.approx(float(theirs), rel=1e-6)
    # the cells the mask is about: black ones out, near-black ones in
    assert ours[0, 0, 0].tolist() == [0.0] * 8
    assert ours[0, 0, 1].tolist() == [1.0] * 5 + [0.0] * 3
    assert 0 < float(ours.mean()) < 1
    tensor = (torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0 - 0.5) / 0.5
    red = F.interpolate(tensor[:, :1], size=latent, mode="area") / 2 + 0.5
    grey = F.interpolate(tensor.mean(1, keepdim=True), size=latent, mode="area") / 2 + 0.5
    early = F.interpolate((tensor.mean(1, keepdim=True) > -1).float(), size=latent, mode="area")
    for other in (red, grey, (red > 0).float(), early):
        assert abs(float((loss * other).mean()) - float(theirs)) > 1e-3


def test_masked_loss_probability_draws_once_per_batch_from_the_runs_seed(tmp_path):
    """p=1 masks every batch, p=0 none (the loss unweighted: no masks at all), 0.5 about half of 400 batches;
    the draws are the batch's own (its first sample's seed), so a second maker with the same seed draws the same
    and another seed draws otherwise; a batch mixing samples with and without a segmentation mask weighs only the
    former."""
    import dataclasses

    import torch
    from sdcore.train.data import SampleRef, is_segmentation

    path, _, _ = _segmentation(tmp_path)
    base = _lora(path)
    maker, data = _maker(base)
    seg = [k for k, e in enumerate(data.entries) if is_segmentation(e)]
    plain = [k for k, e in enumerate(data.entries) if not is_segmentation(e)]
    assert len(seg) == 3 and len(plain) == 2
    batches = [[SampleRef(seg[n % 3], 0, n), SampleRef(plain[n % 2], 0, n)] for n in range(400)]
    masked_mask = maker.sample_mask(seg[0], data.view_of(batches[0][0]), (8, 8))
    assert 0 < float(masked_mask.mean()) < 1  # the left half of each mask is white

    def drawn(probability: float, seed: int = base.seed) -> list[bool]:
        o = dataclasses.replace(base, masked_loss_probability=probability, seed=seed)
        m, _ = _maker(o)
        out = []
        for refs in batches:
            got = m.loss_masks(refs, (8, 8))
            if got is None:
                out.append(False)
                continue
            assert torch.equal(got[1], torch.ones(1, 8, 8))  # the plain sample is never weighed
            out.append(not torch.equal(got[0], torch.ones(1, 8, 8)))
        return out

    assert all(drawn(1.0))
    assert maker.loss_masks(batches[0], (8, 8)) is not None
    assert not any(drawn(0.0))
    half = drawn(0.5)
    assert 160 <= sum(half) <= 240, sum(half)
    assert drawn(0.5) == half
    assert drawn(0.5, seed=base.seed + 1) != half
    assert 0 < sum(drawn(0.1)) < sum(half)


def test_a_run_through_the_config_with_black_segmentation_masks(tmp_path):
    """Every segmentation mask black and only that dataset: with masked_loss_probability 1 the loss and its gradient
    are zero, so the LoRA's up matrices (zero at the start) do not move; with 0 every batch trains unmasked and
    they move."""
    from safetensors.torch import load_file

    path, images, masks = _segmentation(tmp_path)
    _masks(images, masks, 0)
    backends = _backends(tmp_path)
    del backends[2]  # the dataset without masks
    _rewrite(tmp_path, backends)
    ups = {}
    for probability in (1.0, 0.0):
        config = json.loads(path.read_text())
        config["output_dir"] = str(tmp_path / f"p{probability:g}")
        config["masked_loss_probability"] = probability
        _write(path, config)
        run = _cli("--config", str(path))
        assert run.exit_code == 0, run.output
        ups[probability] = _ups(load_file(str(tmp_path / f"p{probability:g}" / "pytorch_lora_weights.safetensors")))
    assert ups[1.0] and all(float(t.abs().max()) == 0 for t in ups[1.0])
    assert ups[0.0] and any(float(t.abs().max()) > 0 for t in ups[0.0])


def test_masked_loss_probability_stays_a_note_for_mask_datasets_and_a_problem_without_segmentation(tmp_path):
    """SimpleTuner draws it for segmentation only: with a mask dataset it is a note and the run keeps 1; given to
    sdcore directly without segmentation masks it is a pre-flight problem."""
    path, _, _ = _run(tmp_path, masked_loss_probability=0.5)
    notes: list[str] = []
    assert _lora(path, notes).masked_loss_probability == 1.0
    assert any("draws it for segmentation masks only" in n for n in notes), notes
    result = _cli("--config", str(path), "--masked-loss-probability", "0.5", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "--masked-loss-probability 0.5 draws whether segmentation masks weigh a batch" in result.output
    result = _cli("--config", str(path), "--masked-loss-probability", "1.5", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "--masked-loss-probability must be in [0, 1]" in result.output


def test_mask_kind_in_a_kohya_dataset_toml(tmp_path):
    """sdcore's own dataset TOML key (beside --mask-kind): a subset reads its mask images as segmentation masks;
    another value is an error naming the choices."""
    from sdcore.data.dataset import load_toml_dataset_config
    from sdcore.errors import DataError
    from sdcore.testing.datasets import make_tiny_dataset

    images = make_tiny_dataset(tmp_path / "images", n=2, size=64) / "1_sks"
    masks = _masks(images, tmp_path / "masks", np.full((64, 64, 3), 7, dtype=np.uint8))
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
        f'conditioning_data_dir = "{masks}"\nmask_kind = "segmentation"\n',
        encoding="utf-8",
    )
    (subset,) = load_toml_dataset_config(toml)
    assert (subset.mask_kind, subset.conditioning_data_dir) == ("segmentation", masks)
    toml.write_text(toml.read_text().replace('"segmentation"', '"grey"'), encoding="utf-8")
    with pytest.raises(DataError, match="'mask_kind' must be one of red, segmentation, got 'grey'"):
        load_toml_dataset_config(toml)


def test_segmentation_beside_alpha_masks_is_a_problem(tmp_path):
    """--mask-kind segmentation acts on mask images; on alpha_mask subsets it would silently do nothing."""
    from sdcore.testing.datasets import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    for image in (data / "1_sks").glob("*.png"):
        Image.open(image).convert("RGBA").save(image)
    result = _cli("--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "out.safetensors"),
                  "--alpha-mask", "--masked-loss", "--mask-kind", "segmentation", "--resolution", "64",
                  "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "mask_kind segmentation reads mask images of a conditioning_data_dir" in result.output


def test_mask_kind_segmentation_without_mask_images_is_a_problem(tmp_path):
    """--mask-kind segmentation acts on conditioning_data_dir mask images only; without any it would do nothing."""
    from sdcore.testing.datasets import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    args = ["--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "out.safetensors"),
            "--resolution", "64", "--dry-run"]  # fmt: skip
    assert _cli(*args).exit_code == 0
    result = _cli(*args, "--mask-kind", "segmentation")
    assert result.exit_code == 2, result.output
    assert "mask_kind segmentation" in result.output and "but no subset has them" in result.output


def test_segmentation_masks_with_a_tread_route_keep_simpletuners_tokens(tmp_path):
    """SimpleTuner's Flux force-keeps, under tread_config, the tokens whose mask image (the RGB mean of pixels in
    [-1, 1], ``(sum / 3 + 1) / 2``, area-shrunk to the token grid) is above 0.5, for mask and segmentation datasets
    alike (flux/model.py). sdcore's routing reads the mask the loss reads: for a segmentation mask that is the
    same grey mean, so a pure red region (grey 1/3) is not force-kept there, where a red-channel mask keeps it."""
    import numpy as np
    import torch
    from sdcore.train.data import mask_to_latent, segmentation_grey
    from sdcore.train.token_routing import token_keep_mask

    routes = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]}
    path, _, _ = _segmentation(tmp_path, family="flux", tread_config=routes)
    result = _cli("--config", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "--tread-route with loss masks: the image tokens inside a sample's mask" in result.output

    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half pure red
    pixels[:32, 32:] = (255, 255, 255)  # top right white
    grey = torch.from_numpy(segmentation_grey(pixels))
    keep = token_keep_mask(mask_to_latent(grey, (8, 8), "area")[None], 2)[0].reshape(4, 4)
    rgb = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255 * 2 - 1  # SimpleTuner's pixels
    simpletuner = (torch.nn.functional.interpolate((rgb.sum(1, keepdim=True) / 3 + 1) / 2, size=(4, 4), mode="area")
                   > 0.5).reshape(4, 4)  # fmt: skip
    assert torch.equal(keep, simpletuner)
    assert not keep[:, :2].any() and keep[:2, 2:].all() and not keep[2:, 2:].any()


def test_segmentation_masks_on_an_inpainting_model_are_a_problem(tmp_path):
    """An inpainting model takes the dataset's masks as its mask input; a segmentation mask only weighs the loss."""
    from types import SimpleNamespace

    from sdcore.data.dataset import scan_dataset
    from sdcore.train.inpainting import inpainting_problems

    path, _, _ = _segmentation(tmp_path)
    o = _lora(path)
    layout = SimpleNamespace(inpainting=True, family="sd1", configs={}, source="tiny:sd1-inpainting")
    index = scan_dataset(o)
    assert any("mask_kind segmentation" in p for p in inpainting_problems(o, layout, index))  # type: ignore[arg-type]
    plain, _, _ = _run(tmp_path / "red")
    red = _lora(plain)
    assert not any("mask_kind" in p for p in inpainting_problems(red, layout, scan_dataset(red)))  # type: ignore[arg-type]


def test_the_inpainting_unmasked_draw_is_unchanged_by_the_shared_helper():
    """unmasked_draw now goes through seeded_draw; every draw is the one it made before (``p > 0`` and the seed's
    first ``random()`` below ``p``), p=0 and p=1 included."""
    import random

    from sdcore.train.inpainting import unmasked_draw

    for seed in range(300):
        for p in (0.0, 1e-9, 0.3, 0.5, 0.999, 1.0):
            assert unmasked_draw(seed, p) == (p > 0 and random.Random(seed).random() < p)
