"""SimpleTuner's conditioning datasets (FLUX.1 Kontext's reference images) as sdcore's control folders.

The facts are SimpleTuner's (bghira/SimpleTuner bc8e6ab; AGPL-3.0, so nothing of it is copied here):
``helpers/data_backend/factory.py`` (``_configure_single_data_backend``: a ``conditioning_type`` makes a backend a
conditioning dataset; ``_connect_conditioning_datasets``: ``conditioning_data`` must name one, else "Conditioning
data backend ... not found"; a model that ``requires_conditioning_dataset`` stops without one),
``helpers/multiaspect/sampler.py`` (``get_conditioning_sample``: the training image's base name joined to the
conditioning dataset's folder: same name, same extension), ``helpers/training/collate.py``
(a missing pair stops the step), ``helpers/models/flux/model.py`` (Kontext is ``model_flavour kontext``; ``control``
forces ControlNet LoRA targets) and ``documentation/quickstart/FLUX_KONTEXT.md``, ``DATALOADER.md``.
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


def _kontext_run(tmp_path: Path, *, reference: dict | None = None, **extra: object) -> tuple[Path, Path, Path]:
    """A FLUX.1 Kontext LoRA config (model_flavour kontext) whose edit dataset names a reference dataset in
    conditioning_data (FLUX_KONTEXT.md's layout): returns the config, the edit images' and the references' folders."""
    edits = make_tiny_dataset(tmp_path / "edits", n=3, size=64) / "1_sks"
    refs = write_inverted_controls(edits, tmp_path / "refs")
    backend = _write(
        tmp_path / "multidatabackend.json",
        [
            {"id": "edited", "type": "local", "instance_data_dir": str(edits), "caption_strategy": "textfile",
             "resolution": 64, "resolution_type": "pixel_area", "conditioning_data": ["references"],
             "cache_dir_vae": "cache/vae/edited"},
            {"id": "references", "type": "local", "instance_data_dir": str(refs), "dataset_type": "conditioning",
             "conditioning_type": "reference_strict", "resolution": 64, "resolution_type": "pixel_area",
             "caption_strategy": None, "cache_dir_vae": "cache/vae/references", **(reference or {})},
            {"id": "embeds", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "te"},
        ],
    )  # fmt: skip
    config = {
        "model_family": "flux", "model_flavour": "kontext", "model_type": "lora",
        "pretrained_model_name_or_path": "tiny:flux", "data_backend_config": str(backend),
        "output_dir": str(tmp_path / "out"), "max_train_steps": 2, "lora_rank": 4, "lora_dropout": 0,
        "learning_rate": 1e-4, "train_batch_size": 1, "seed": 7, "mixed_precision": "no",
        "gradient_checkpointing": False, "conditioning_multidataset_sampling": "random",
        "resolution": 64, "resolution_type": "pixel_area",
        **extra,
    }  # fmt: skip
    return _write(tmp_path / "config.json", config), edits, refs


def _lora(path: Path, notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=[] if notes is None else notes)


def _backends(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "multidatabackend.json").read_text())


def _rewrite(tmp_path: Path, backends: list[dict]) -> None:
    _write(tmp_path / "multidatabackend.json", backends)


def _dry_run(path: Path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    return CliRunner().invoke(cli, ["train", "lora", "--config", str(path), "--dry-run", "--no-progress"])


def test_conditioning_data_is_the_training_datasets_control_folder(tmp_path):
    """The edit dataset is one subset whose control folder is the reference dataset's instance_data_dir; the
    reference dataset trains nothing itself; every image pairs with the reference of its own file name."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.train.kontext_data import control_image_path

    path, edits, refs = _kontext_run(tmp_path)
    notes: list[str] = []
    o = _lora(path, notes)
    index = scan_dataset(o)
    assert {e.subset.image_dir for e in index.entries} == {edits}  # the references are no training images
    assert len(index.entries) == 3
    assert all(e.subset.control_dir == refs for e in index.entries)
    assert {e.path.name: control_image_path(e) for e in index.entries} == {
        f"{i:03d}.png": refs / f"{i:03d}.png" for i in range(3)
    }
    # the reference dataset's own sizes and captions are the edit dataset's in SimpleTuner (one dataset: its captions)
    assert any("resolution, resolution_type, caption_strategy: not read" in n for n in notes), notes
    result = _dry_run(path)
    assert result.exit_code == 0, result.output
    assert f"FLUX.1 Kontext: every sample paired with its control image from {refs}" in result.output


def test_conditioning_type_alone_makes_a_conditioning_dataset_and_one_nothing_names_is_not_read(tmp_path):
    """factory.py: a backend with a conditioning_type is a conditioning dataset whatever its dataset_type (the
    quickstart's reference dataset gives none); one no training dataset names is configured and never drawn."""
    from sdcore.train.simpletuner_config import load_datasets

    path, edits, refs = _kontext_run(tmp_path)
    backends = _backends(tmp_path)
    del backends[1]["dataset_type"]
    spare = write_inverted_controls(edits, tmp_path / "spare")
    backends.append({"id": "spare", "type": "local", "instance_data_dir": str(spare), "dataset_type": "conditioning"})
    _rewrite(tmp_path, backends)
    notes: list[str] = []
    _lora(path, notes)
    subsets = load_datasets(path, None)
    assert [(s.image_dir, s.control_dir) for s in subsets] == [(edits, refs)]
    assert any("(spare): a conditioning dataset no training dataset names in conditioning_data: not read" in n
               for n in notes), notes  # fmt: skip


def test_an_unpaired_image_is_the_preflights_missing_control_image(tmp_path):
    """SimpleTuner stops at the step whose image has no reference (collate.py); sdcore lists it before loading."""
    path, edits, refs = _kontext_run(tmp_path)
    (refs / "001.png").unlink()
    result = _dry_run(path)
    assert result.exit_code == 2, result.output
    assert (
        "control images: 1 image(s) without a control image of the same name in their control folder: "
        f"{edits / '001.png'}" in result.output
    )


def test_a_reference_sdcore_would_pair_by_stem_but_simpletuner_by_name_is_refused(tmp_path):
    """SimpleTuner joins the training image's file name (extension included) to the reference folder: 000.png finds
    no 000.jpg there, and 001.png takes 001.png where sdcore's stem search would take 001.jpg (sorted first)."""
    path, _, refs = _kontext_run(tmp_path)
    Image.open(refs / "000.png").convert("RGB").save(refs / "000.jpg")
    (refs / "000.png").unlink()
    Image.open(refs / "001.png").convert("RGB").save(refs / "001.jpg")
    with pytest.raises(ConfigError) as caught:
        _lora(path)
    text = str(caught.value)
    assert "SimpleTuner pairs a training image with the file of the same name and extension" in text
    assert "000.png -> 000.jpg, 001.png -> 001.jpg (rename them" in text


def test_reference_loose_is_noted_and_refused_for_references_of_another_aspect_ratio(tmp_path):
    """reference_loose: SimpleTuner buckets and crops a reference on its own; sdcore fits it to the training image's
    crop. Same aspect ratio (here twice the size): the same bucket, a note. Another aspect ratio: a problem."""
    path, _, refs = _kontext_run(tmp_path, reference={"conditioning_type": "reference_loose"})
    for image in refs.glob("*.png"):
        Image.open(image).resize((128, 128)).save(image)
    notes: list[str] = []
    _lora(path, notes)
    assert any("conditioning_type reference_loose: SimpleTuner buckets and crops these references on their own" in n
               for n in notes), notes  # fmt: skip
    wide = np.zeros((64, 128, 3), dtype=np.uint8)
    Image.fromarray(wide).save(refs / "002.png")
    with pytest.raises(ConfigError, match=r"changes their aspect ratio: 002\.png \(64x64\) -> 002\.png \(128x64\)"):
        _lora(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"controlnet": True}, "controlnet = True: SimpleTuner trains a ControlNet"),
        ({"control": True}, "control = True: SimpleTuner's channel-wise control training"),
        ({"model_flavour": "dev"}, "sdcore reads reference conditioning datasets as FLUX.1 Kontext's reference"),
    ],
)
def test_controlnet_control_and_a_non_kontext_run_stay_refused(tmp_path, change, expected):
    path, _, _ = _kontext_run(tmp_path, **change)
    with pytest.raises(ConfigError) as caught:
        _lora(path)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda b: b[0].update(conditioning_data=["references", "more"]) or b.append(dict(b[1], id="more")),
         "several conditioning datasets"),
        (lambda b: b[0].update(conditioning_data="embeds"), "conditioning_data 'embeds': no enabled dataset of that id"),
        (lambda b: b[1].update(type="huggingface", dataset_name="x/y"), "type 'huggingface': sdcore reads local"),
        (lambda b: b[1].update(conditioning_type="mask"), "model_flavour kontext with a loss mask and no reference"),
        (lambda b: b[1].update(source_dataset_id="other"), "source_dataset_id 'other', but conditioning_data of"),
        (lambda b: b[0].pop("conditioning_data"), "model_flavour kontext trains on pairs: SimpleTuner needs a"),
    ],
    ids=["several", "not-conditioning", "remote", "mask", "other-source", "none"],
)  # fmt: skip
def test_conditioning_setups_sdcore_cannot_reproduce_are_one_line_each(tmp_path, edit, expected):
    path, _, _ = _kontext_run(tmp_path)
    backends = _backends(tmp_path)
    edit(backends)
    _rewrite(tmp_path, backends)
    with pytest.raises(ConfigError) as caught:
        _lora(path)
    assert expected in str(caught.value)


def test_two_step_kontext_run_through_the_config(tmp_path):
    """The translated run trains FLUX.1 Kontext: two steps with each edit paired with its reference, a LoRA saved
    where SimpleTuner saves it."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    path, _, _ = _kontext_run(tmp_path)
    run = CliRunner().invoke(build_cli(get_plugin_manager()), ["train", "lora", "--config", str(path), "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "FLUX.1 Kontext: every sample paired with its control image" in run.output
    weights = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)


def _second_edit_dataset(tmp_path: Path, backends: list[dict], *, with_reference: bool) -> tuple[Path, Path]:
    """A second edit dataset (and its own reference dataset, named in its conditioning_data or not)."""
    edits = make_tiny_dataset(tmp_path / "edits2", n=2, size=64) / "1_sks"
    refs = write_inverted_controls(edits, tmp_path / "refs2")
    second = dict(backends[0], id="edited2", instance_data_dir=str(edits))
    second.pop("conditioning_data")
    if with_reference:
        second["conditioning_data"] = "references2"
    backends[2:2] = [second, dict(backends[1], id="references2", instance_data_dir=str(refs))]
    return edits, refs


def test_two_training_datasets_each_pair_with_their_own_conditioning_dataset(tmp_path):
    """Each training dataset's conditioning_data is its own subset's control folder (a list or a plain id)."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.train.kontext_data import control_image_path

    path, edits, refs = _kontext_run(tmp_path)
    backends = _backends(tmp_path)
    edits2, refs2 = _second_edit_dataset(tmp_path, backends, with_reference=True)
    _rewrite(tmp_path, backends)
    index = scan_dataset(_lora(path))
    pairs = {(e.subset.image_dir, control_image_path(e).parent) for e in index.entries}  # type: ignore[union-attr]
    assert pairs == {(edits, refs), (edits2, refs2)}
    assert len(index.entries) == 5


def test_a_kontext_training_dataset_without_conditioning_data_beside_one_with_is_refused_by_name(tmp_path):
    """SimpleTuner needs one conditioning dataset in all and trains the other dataset's batches without a
    reference (text-to-image steps); sdcore's Kontext run pairs every image, so the config names the dataset."""
    path, _, _ = _kontext_run(tmp_path)
    backends = _backends(tmp_path)
    _second_edit_dataset(tmp_path, backends, with_reference=False)
    _rewrite(tmp_path, backends)
    with pytest.raises(ConfigError) as caught:
        _lora(path)
    text = str(caught.value)
    assert "(edited2): no reference in conditioning_data while" in text and "(edited) names one" in text, text
    assert "SimpleTuner needs a conditioning dataset" not in text


def test_a_refused_conditioning_data_is_not_also_reported_as_missing(tmp_path):
    """Several conditioning datasets are one problem; the dataset does name conditioning data, so the Kontext run's
    'needs a conditioning dataset' line would be false."""
    path, _, _ = _kontext_run(tmp_path)
    backends = _backends(tmp_path)
    backends[0]["conditioning_data"] = ["references", "more"]
    backends.append(dict(backends[1], id="more"))
    _rewrite(tmp_path, backends)
    with pytest.raises(ConfigError) as caught:
        _lora(path)
    text = str(caught.value)
    assert "several conditioning datasets" in text
    assert "SimpleTuner needs a conditioning dataset" not in text, text
