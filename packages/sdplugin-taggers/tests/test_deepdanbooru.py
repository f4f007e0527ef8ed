"""DeepDanbooru: the resnet_custom_v3 layout, safe loading, and tagging with a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sdcore.errors import ModelFormatError, UnsafeFileError
from sdplugin_taggers.deepdanbooru import DeepDanbooruTagger, build_model, conv_layout, load_deepdanbooru
from sdplugin_taggers.images import fit_edge_pad
from wdmodels import save_image

TAGS = ["1girl", "long_hair", "smile", "hatsune_miku", "rating:general", "rating:explicit"]


def test_full_layout_matches_torchdeepdanbooru_names_and_shapes() -> None:
    plan, blocks = conv_layout()
    assert len(plan) == 179 and len(blocks) == 3 + 8 + 20 + 20 + 3 + 3
    shapes = {i: (role, cin, cout, k, s) for i, (role, cin, cout, k, s) in enumerate(plan)}
    assert shapes[0] == ("stem", 3, 64, 7, 2)
    assert shapes[1] == ("short", 64, 256, 1, 1) and shapes[2] == ("a", 64, 64, 1, 1)
    assert shapes[11] == ("short", 256, 512, 1, 2) and shapes[13] == ("b", 128, 128, 3, 2)
    assert shapes[36] == ("short", 512, 1024, 1, 2)
    assert shapes[98] == ("b", 256, 256, 3, 2) and shapes[100] == ("short", 1024, 1024, 1, 2)
    assert shapes[158] == ("short", 1024, 2048, 1, 2) and shapes[168] == ("short", 2048, 4096, 1, 2)
    assert shapes[178] == ("head", 4096, 9176, 1, 1)
    with torch.device("meta"):
        model = build_model()
    state = model.state_dict()
    assert "n_Conv_178.bias" not in state and state["n_Conv_177.weight"].shape == (4096, 1024, 1, 1)
    assert len([k for k in state if k.endswith(".weight")]) == 179


@pytest.fixture
def tiny_pt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(width_div=16, n_tags=len(TAGS))
    state = {k: v for k, v in model.state_dict().items()}
    with torch.no_grad():
        state["n_Conv_178.weight"] = torch.zeros_like(state["n_Conv_178.weight"])
        state["n_Conv_178.weight"][0] += 0.05  # 1girl > 0.5 (features after relu are >= 0)
        state["n_Conv_178.weight"][4] += 0.05  # rating:general
        state["n_Conv_178.weight"][5] -= 0.05  # rating:explicit < 0.5
    path = tmp_path / "model-resnet_custom_v3.pt"
    torch.save({**state, "tags": TAGS}, path)
    return path


def test_load_and_output_shape(tiny_pt: Path) -> None:
    model, tags = load_deepdanbooru(tiny_pt)
    assert tags == TAGS
    out = model(torch.rand(2, 512, 512, 3))
    assert out.shape == (2, len(TAGS)) and bool(((out > 0) & (out < 1)).all())


def test_tagger_known_outputs(tiny_pt: Path, tmp_path: Path) -> None:
    images = [save_image(tmp_path / "img" / f"{i}.png", (40 * i, 90, 200), size=(40, 24)) for i in range(3)]
    tagger = DeepDanbooruTagger(tiny_pt, device="cpu", batch_size=2, workers=1)
    results = tagger.tag(images)
    for result in results:
        assert result.error is None
        assert result.general["long_hair"] == pytest.approx(0.5) and result.general["smile"] == pytest.approx(0.5)
        assert result.general["1girl"] > 0.5
        assert set(result.rating) == {"general", "explicit"} and result.rating["explicit"] < 0.5
        assert result.tags()[0] == "1girl"
        assert set(result.tags()) == {"1girl", "long hair", "smile", "hatsune miku"}
    # the tagger's probabilities are the model's on the same preprocessing
    batch = np.stack([fit_edge_pad(p, 512)[0] for p in images])
    direct = tagger.model(torch.from_numpy(batch)).detach().numpy()
    assert results[1].general["1girl"] == pytest.approx(float(direct[1, 0]), abs=1e-5)
    strict = DeepDanbooruTagger(tiny_pt, device="cpu", threshold=0.51, workers=0)
    assert strict.tag(images[:1])[0].tags() == ["1girl"]


def test_fit_edge_pad_replicates_edges() -> None:
    from PIL import Image

    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 1))  # top row blue: padding above must be blue
    array, size = fit_edge_pad(image, 40)
    assert size == (20, 10) and array.shape == (40, 40, 3)
    assert array[0, 20].tolist() == [0.0, 0.0, 1.0] and array[39, 20].tolist() == [1.0, 0.0, 0.0]


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"n_Conv_0.weight": torch.zeros(1), "payload": Evil(), "tags": ["a"]}, path)
    with pytest.raises(UnsafeFileError, match=re.escape("evil.pt")):
        load_deepdanbooru(path)
    assert not marker.exists()


def test_wrong_files_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelFormatError, match=re.escape("junk.pt")):
        load_deepdanbooru(tmp_path / "junk.pt")
    torch.save({"n_Conv_0.weight": torch.zeros(4, 3, 7, 7)}, tmp_path / "notags.pt")
    with pytest.raises(ModelFormatError, match="tags"):
        load_deepdanbooru(tmp_path / "notags.pt")
    torch.save({"n_Conv_0.weight": torch.zeros(4, 3, 7, 7), "tags": ["a"]}, tmp_path / "partial.pt")
    with pytest.raises(ModelFormatError, match="resnet_custom_v3"):
        load_deepdanbooru(tmp_path / "partial.pt")


def test_deepdanbooru_command(tiny_pt: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from sdplugin_taggers.commands import deepdanbooru_command

    folder = tmp_path / "imgs"
    save_image(folder / "x.png", (1, 2, 3))
    args = [str(folder), "--model", str(tiny_pt), "--device", "cpu", "--ratings", "first", "--no-progress"]
    result = CliRunner().invoke(deepdanbooru_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (folder / "x.txt").read_text(encoding="utf-8").startswith("general, 1girl, ")
    assert "tagged: 1" in result.output
