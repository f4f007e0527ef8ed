"""WD14Tagger against tiny ONNX graphs with known outputs (v3 dynamic batch, v2 fixed batch)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdcore.errors import ConfigError, ModelFormatError
from sdplugin_taggers.images import wd_preprocess
from sdplugin_taggers.onnx_session import parse_providers, resolve_providers
from sdplugin_taggers.tags import TagFormat
from sdplugin_taggers.wd14 import WD14Tagger
from wdmodels import TAGS, make_wd_model, save_image

EXPECTED = ["hatsune miku (vocaloid)", "1girl", "long hair", "^_^", 'don\'t say "lazy"']


def test_v3_reads_names_size_and_dynamic_batch(wd_v3: Path, image_dir: Path) -> None:
    tagger = WD14Tagger(wd_v3, providers="cpu", batch_size=2, workers=2)
    assert (tagger.input_name, tagger.output_name, tagger.size) == ("input", "output", 32)
    assert tagger.fixed_batch is None and tagger.batch_size == 2
    assert tagger.provider == "CPUExecutionProvider"
    results = tagger.tag(sorted(image_dir.iterdir()))
    assert [Path(r.path).name for r in results] == ["a.png", "b.jpg", "c.webp"]
    for result in results:
        assert result.error is None
        assert result.tags() == EXPECTED
        assert result.rating["general"] == pytest.approx(0.7)
        assert result.general["1girl"] == pytest.approx(0.95)
        assert result.size == (16, 16)


def test_v2_names_and_fixed_batch(wd_v2: Path, image_dir: Path) -> None:
    tagger = WD14Tagger(wd_v2, providers="cpu", batch_size=8)
    assert (tagger.input_name, tagger.output_name) == ("input_1:0", "predictions_sigmoid")
    assert tagger.fixed_batch == 1 and tagger.batch_size == 1
    assert any("fixed batch size of 1" in m for m in tagger.messages)
    assert [r.tags() for r in tagger.tag(sorted(image_dir.iterdir()))] == [EXPECTED] * 3


def test_mcut_and_output_options(wd_v3: Path, image_dir: Path) -> None:
    fmt = TagFormat(underscores=True, escape=True, ratings="first", exclude=("1girl",), include_first=("trig",))
    tagger = WD14Tagger(wd_v3, providers="cpu", mcut=True, fmt=fmt)
    result = tagger.tag([image_dir / "a.png"])[0]
    assert result.tags() == ["general", "trig", "hatsune_miku_\\(vocaloid\\)", "other_char"]
    thresholds = WD14Tagger(wd_v3, providers="cpu", general_threshold=0.55, character_threshold=0.4)
    assert thresholds.tag([image_dir / "a.png"])[0].tags() == [
        "hatsune miku (vocaloid)",
        "other char",
        "1girl",
        "long hair",
    ]


def test_mean_pixel_graph_sees_canonical_preprocessing(tmp_path: Path) -> None:
    # probability of tag 4 = mean pixel / 255: white padding and white-composited alpha count.
    weights = [0.0] * len(TAGS)
    weights[4] = 1.0
    tags = [(n, c, 0.0 if i == 4 else p) for i, (n, c, p) in enumerate(TAGS)]
    model = make_wd_model(tmp_path / "m", tags=tags, weights=weights)
    black_wide = save_image(tmp_path / "wide.png", (0, 0, 0), size=(32, 16))
    clear = save_image(tmp_path / "clear.png", (0, 0, 0, 0), size=(8, 8), mode="RGBA")
    black = save_image(tmp_path / "black.png", (0, 0, 0), size=(20, 20))
    tagger = WD14Tagger(model, providers="cpu", general_threshold=0.0)
    got = {Path(r.path).name: r.general.get("1girl", 0.0) for r in tagger.tag([black_wide, clear, black])}
    assert got["wide.png"] == pytest.approx(0.5, abs=1e-4)  # half white padding
    assert got["clear.png"] == pytest.approx(1.0, abs=1e-4)  # transparent -> white
    assert got["black.png"] == pytest.approx(0.0, abs=1e-4)


def test_preprocess_matches_reference_and_is_bgr(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(30, 50, 4), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)
    # the reference algorithm spelled out: composite on white, pad centred, bicubic, BGR
    image = Image.open(path).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    rgb = canvas.convert("RGB")
    square = Image.new("RGB", (50, 50), (255, 255, 255))
    square.paste(rgb, (0, 10))
    reference = np.asarray(square.resize((32, 32), Image.BICUBIC), dtype=np.float32)[:, :, ::-1]
    array, size = wd_preprocess(path, 32)
    assert size == (50, 30) and array.shape == (32, 32, 3) and array.dtype == np.float32
    np.testing.assert_array_equal(array, reference)
    red, _ = wd_preprocess(Image.new("RGB", (32, 32), (255, 0, 0)), 32)
    assert red[0, 0].tolist() == [0.0, 0.0, 255.0]


def test_unreadable_images_are_reported_in_order(wd_v3: Path, image_dir: Path) -> None:
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg at all")
    truncated = image_dir / "trunc.png"
    truncated.write_bytes((image_dir / "a.png").read_bytes()[:40])
    tagger = WD14Tagger(wd_v3, providers="cpu", batch_size=2)
    results = tagger.tag(sorted(image_dir.iterdir()))
    names = [Path(r.path).name for r in results]
    assert names == ["a.png", "b.jpg", "broken.jpg", "c.webp", "trunc.png"]
    errors = {Path(r.path).name for r in results if r.error}
    assert errors == {"broken.jpg", "trunc.png"}
    assert all(r.tags() == EXPECTED for r in results if not r.error)


def test_inline_decoding_gives_same_results(wd_v3: Path, image_dir: Path) -> None:
    a = WD14Tagger(wd_v3, providers="cpu", workers=0).tag(sorted(image_dir.iterdir()))
    b = WD14Tagger(wd_v3, providers="cpu", workers=3, batch_size=3).tag(sorted(image_dir.iterdir()))
    assert [r.general for r in a] == [r.general for r in b]


def test_csv_problems_raise_clear_errors(tmp_path: Path) -> None:
    missing = make_wd_model(tmp_path / "nocsv")
    (missing / "selected_tags.csv").unlink()
    with pytest.raises(ModelFormatError, match=re.escape("selected_tags.csv")):
        WD14Tagger(missing, providers="cpu")
    short = make_wd_model(tmp_path / "short", csv_rows=TAGS[:-2])
    with pytest.raises(ModelFormatError, match=re.escape("lists 11 tags but model.onnx outputs 13")):
        WD14Tagger(short, providers="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match=re.escape("model.onnx")):
        WD14Tagger(tmp_path / "empty", providers="cpu")
    corrupt = make_wd_model(tmp_path / "corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFormatError, match="cannot load"):
        WD14Tagger(corrupt, providers="cpu")


def test_providers_prefer_accelerators_and_warn() -> None:
    assert parse_providers("cpu,cuda") == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    chosen, warnings = resolve_providers(
        ["CPUExecutionProvider", "CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert chosen == ["CUDAExecutionProvider", "CPUExecutionProvider"] and warnings == []
    chosen, warnings = resolve_providers(["CPUExecutionProvider", "CUDAExecutionProvider"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"] and "onnxruntime-gpu" in warnings[0]
    with pytest.raises(ConfigError):
        resolve_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"])
    with pytest.raises(ConfigError):
        parse_providers("gpu-please")


def test_default_providers_fall_back_to_cpu(wd_v3: Path) -> None:
    import onnxruntime as ort

    tagger = WD14Tagger(wd_v3)
    explicit = WD14Tagger(wd_v3, providers="cpu,cuda")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert tagger.provider == explicit.provider == "CUDAExecutionProvider"
    else:
        assert tagger.provider == explicit.provider == "CPUExecutionProvider"
        assert tagger.messages == []  # the automatic default falls back quietly
        assert any("CUDAExecutionProvider" in m for m in explicit.messages)  # an explicit request is warned about
        assert tagger.batch_size == 1 and tagger.workers == 1


def test_fast_decode_stays_close_to_canonical(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8))
    path = tmp_path / "big.jpg"
    small.resize((1024, 768), Image.Resampling.BICUBIC).save(path, quality=95)
    exact, size = wd_preprocess(path, 64)
    fast, fast_size = wd_preprocess(path, 64, fast_decode=True)
    assert size == fast_size == (1024, 768) and fast.shape == exact.shape
    assert float(np.abs(fast - exact).mean()) < 3.0


def test_tags_pil_images_directly(wd_v3: Path) -> None:
    results = WD14Tagger(wd_v3, providers="cpu").tag([Image.new("RGBA", (20, 10), (0, 0, 0, 0))])
    assert results[0].path is None and results[0].size == (20, 10) and results[0].tags() == EXPECTED


def test_fixed_batch_larger_than_one_pads_the_last_batch(tmp_path: Path) -> None:
    weights = [0.0] * len(TAGS)
    weights[4] = 1.0
    tags = [(n, c, 0.0 if i == 4 else p) for i, (n, c, p) in enumerate(TAGS)]
    model = make_wd_model(tmp_path / "m", tags=tags, weights=weights, v2=True, fixed_batch=4)
    images = [save_image(tmp_path / "i" / f"{i}.png", (v, v, v)) for i, v in enumerate((0, 51, 102, 153, 204, 255))]
    tagger = WD14Tagger(model, providers="cpu", general_threshold=-1.0)
    assert tagger.batch_size == 4
    got = [r.general["1girl"] for r in tagger.tag(images)]
    assert got == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], abs=1e-4)


def test_images_go_through_sdcores_reader(tmp_path: Path) -> None:
    """EXIF rotation is applied, 16-bit PNGs are scaled, and declared-huge images are refused."""
    import numpy as np
    from PIL import Image
    from sdcore.data.images import ImageError
    from sdplugin_taggers.images import open_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.new("RGB", (16, 8), (200, 10, 10)).save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (8, 16)

    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert open_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)

    huge = Image.new("L", (1, 1))
    huge.save(tmp_path / "bomb.png")
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    data[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR width/height
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"bomb|too large|pixel limit"):
        open_image(tmp_path / "bomb.png")


def _kohya_preprocess_no_resize(path: Path) -> np.ndarray:
    """kohya's ``preprocess_image`` (sd-scripts finetune/tag_images_by_wd14_tagger.py:37-65) for an image whose
    long side already is the model size: RGBA (also LA and palette transparency) pasted on white through its
    alpha, RGB -> BGR, padded centred to a square with 255 (its resize step is then a no-op)."""
    image = Image.open(path)
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    array = np.array(image)[:, :, ::-1]
    size = max(array.shape[:2])
    pad_x, pad_y = size - array.shape[1], size - array.shape[0]
    array = np.pad(
        array,
        ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
        mode="constant",
        constant_values=255,
    )
    return array.astype(np.float32)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB", "L"])
def test_preprocess_equals_kohyas_when_no_resize_is_needed(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, size=(21, 32, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert(mode) if mode not in ("P",) else rgba.convert("RGB").quantize(16)
    if mode == "P":
        image.info["transparency"] = 3  # one palette entry transparent
    path = tmp_path / f"im_{mode}.png"
    image.save(path, **({"transparency": 3} if mode == "P" else {}))
    array, _ = wd_preprocess(path, 32)
    np.testing.assert_array_equal(array, _kohya_preprocess_no_resize(path))
