"""Method files beside the images (DreamArtist's ``<stem>_att.png``) are no training images: the dataset
summary must not count them among the images without a caption."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.data import build_train_data
from sdcore.train.options import TrainOptions, apply_model_defaults
from sdcore.train.preflight import _build_unverified


@pytest.mark.parametrize("verified", [True, False], ids=["pre-flight", "run start"])
def test_an_attention_map_is_not_counted_as_an_uncaptioned_image(tmp_path, verified):
    root = make_tiny_dataset(tmp_path / "data", n=2, size=64, captions=False)
    folder = root / "1_sks"
    (folder / "000.png").rename(folder / "000_att.png")  # one image becomes the other's attention map
    (folder / "001.png").rename(folder / "000.png")
    options = TrainOptions(model="tiny:sd1", data=str(root), min_bucket_reso=64)
    apply_model_defaults(options)
    method = SimpleNamespace(
        is_auxiliary_file=lambda p: p.stem.endswith("_att"), capabilities=lambda: SimpleNamespace(balance_class=False)
    )
    if verified:
        data = build_train_data(options, balance_class=False, auxiliary=method.is_auxiliary_file)
    else:  # the run's own pre-flight skips the per-image check (the runtime does it next)
        data = _build_unverified(options, method)
    index = data.index
    assert [p.name for p in index.auxiliary_files] == ["000_att.png"]
    assert [p.name for p in index.class_token_captions] == ["000.png"]
    summary = index.summary()
    assert "1 training images" in summary and "1 method files" in summary
    assert "1 without caption file: captioned with class tokens" in summary


def test_a_method_file_captioned_from_its_name_is_not_counted_either(tmp_path):
    """With --filename-captions a map without a caption file is captioned from its name like an image: claimed, it
    leaves that count too (the summary's and `sdcore data check --method`'s, one rule: claim_method_files)."""
    root = make_tiny_dataset(tmp_path / "data", n=2, size=64, captions=False)
    folder = root / "1_sks"
    (folder / "000.png").rename(folder / "000_att.png")
    (folder / "001.png").rename(folder / "000.png")
    options = TrainOptions(model="tiny:sd1", data=str(root), min_bucket_reso=64, filename_captions="stem")
    apply_model_defaults(options)
    data = build_train_data(options, balance_class=False, auxiliary=lambda p: p.stem.endswith("_att"))
    assert [p.name for p in data.index.filename_captions] == ["000.png"]
    assert "1 without caption file: captioned from their file names" in data.index.summary()
